# ScyllaDB: nodes from the official image, configured through its user
# data as one cluster (fixed addresses, the first three as seeds,
# Ec2Snitch: a datacenter per region, a rack per zone). The keyspace and
# tables are created by the engines on their first connect
# (engine/src/store/scylla.cql).

data "aws_vpc" "this" {
  id = var.vpc_id
}

data "aws_subnet" "node" {
  count = length(var.private_subnet_ids)
  id    = var.private_subnet_ids[count.index]
}

data "aws_ami" "scylla" {
  count       = var.ami_id == null ? 1 : 0
  most_recent = true
  owners      = [var.ami_owner]
  filter {
    name   = "name"
    values = [var.ami_name]
  }
  filter {
    name   = "architecture"
    values = [var.architecture]
  }
}

locals {
  tags    = merge(var.tags, { "tiercast:role" = "scylla" })
  subnets = length(var.private_subnet_ids)
  ips = [
    for i in range(var.db_nodes) :
    cidrhost(data.aws_subnet.node[i % local.subnets].cidr_block, var.first_host + floor(i / local.subnets))
  ]
  seeds = slice(local.ips, 0, min(3, var.db_nodes))
}

resource "aws_security_group" "scylla" {
  name        = "${var.name}-scylla"
  description = "Tiercast ScyllaDB: CQL from the VPC, gossip between nodes"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-scylla" })
}

resource "aws_vpc_security_group_ingress_rule" "cql" {
  for_each          = toset(["9042", "19042"])
  security_group_id = aws_security_group.scylla.id
  description       = "CQL (and its shard-aware port) from the engines"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value)
  to_port           = tonumber(each.value)
  cidr_ipv4         = data.aws_vpc.this.cidr_block
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "metrics" {
  security_group_id = aws_security_group.scylla.id
  description       = "Prometheus metrics from the VPC"
  ip_protocol       = "tcp"
  from_port         = 9180
  to_port           = 9180
  cidr_ipv4         = data.aws_vpc.this.cidr_block
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "peers" {
  for_each                     = toset(["7000", "7001", "10000"])
  security_group_id            = aws_security_group.scylla.id
  description                  = "Gossip, internode TLS and the REST API between nodes"
  ip_protocol                  = "tcp"
  from_port                    = tonumber(each.value)
  to_port                      = tonumber(each.value)
  referenced_security_group_id = aws_security_group.scylla.id
  tags                         = local.tags
}

resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.scylla.id
  description       = "Peers and updates"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
  tags              = local.tags
}

# Nodes read nothing from AWS: a role without permissions, so that every
# instance of the fleet has a profile and none has rights it does not use.
resource "aws_iam_role" "node" {
  name = "${var.name}-scylla"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
  tags = local.tags
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name}-scylla"
  role = aws_iam_role.node.name
  tags = local.tags
}

resource "aws_instance" "node" {
  count                  = var.db_nodes
  ami                    = var.ami_id != null ? var.ami_id : data.aws_ami.scylla[0].id
  instance_type          = var.instance_type
  subnet_id              = var.private_subnet_ids[count.index % local.subnets]
  private_ip             = local.ips[count.index]
  vpc_security_group_ids = [aws_security_group.scylla.id]
  iam_instance_profile   = aws_iam_instance_profile.node.name
  # The official image reads its configuration from user data.
  user_data = jsonencode({
    scylla_yaml = {
      cluster_name    = coalesce(var.cluster_name, var.name)
      endpoint_snitch = "Ec2Snitch"
      seed_provider = [{
        class_name = "org.apache.cassandra.locator.SimpleSeedProvider"
        parameters = [{ seeds = join(",", local.seeds) }]
      }]
    }
    start_scylla_on_first_boot = true
  })
  metadata_options {
    http_tokens = "required"
  }
  root_block_device {
    encrypted = true
  }
  tags = merge(local.tags, { Name = "${var.name}-scylla-${count.index}" })
}
