terraform {
  required_version = ">= 1.6"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

provider "aws" {
  region = var.region
}

locals {
  # Edge instance type from the planned size (c7g: 2 GiB per vCPU).
  edge_instance_type = var.edge_cores >= 16 ? "c7g.4xlarge" : (var.edge_cores >= 8 ? "c7g.2xlarge" : "c7g.xlarge")
  redis_config_endpoint = aws_elasticache_replication_group.backplane.configuration_endpoint_address
}

resource "aws_security_group" "tiercast" {
  name   = "${var.name}-nodes"
  vpc_id = var.vpc_id

  ingress {
    description = "QUIC from clients"
    from_port   = 7443
    to_port     = 7443
    protocol    = "udp"
    cidr_blocks = ["0.0.0.0/0"]
  }

  ingress {
    description = "Everything between Tiercast nodes"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    self        = true
  }

  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_elasticache_subnet_group" "backplane" {
  name       = "${var.name}-redis"
  subnet_ids = var.subnet_ids
}

# Redis 7 in cluster mode: sharded pub/sub spreads channels over the shards.
resource "aws_elasticache_replication_group" "backplane" {
  replication_group_id       = "${var.name}-backplane"
  description                = "Tiercast backplane (sharded pub/sub, routes, leases, read-marker streams)"
  engine                     = "redis"
  engine_version             = "7.1"
  node_type                  = var.redis_node_type
  num_node_groups            = var.redis_shards
  replicas_per_node_group    = var.redis_replicas_per_shard
  automatic_failover_enabled = true
  multi_az_enabled           = true
  parameter_group_name       = "default.redis7.cluster.on"
  subnet_group_name          = aws_elasticache_subnet_group.backplane.name
  security_group_ids         = [aws_security_group.tiercast.id]
}

resource "aws_instance" "db" {
  count                  = var.db_nodes
  ami                    = var.ami_id
  instance_type          = var.db_instance_type
  subnet_id              = element(var.subnet_ids, count.index)
  vpc_security_group_ids = [aws_security_group.tiercast.id]
  tags = {
    Name = "${var.name}-scylla-${count.index}"
    Role = "scylla"
  }
}

resource "aws_instance" "engine" {
  count                  = var.engine_count
  ami                    = var.ami_id
  instance_type          = var.engine_instance_type
  subnet_id              = element(var.subnet_ids, count.index)
  vpc_security_group_ids = [aws_security_group.tiercast.id]
  user_data = templatefile("${path.module}/node.sh.tftpl", {
    role        = "engine"
    store_url   = ""
    redis       = local.redis_config_endpoint
    secret_path = var.token_secret_ssm_parameter
    region      = var.region
  })
  tags = {
    Name = "${var.name}-engine-${count.index}"
    Role = "engine"
  }
}

resource "aws_instance" "edge" {
  count                  = var.edge_count
  ami                    = var.ami_id
  instance_type          = local.edge_instance_type
  subnet_id              = element(var.subnet_ids, count.index)
  vpc_security_group_ids = [aws_security_group.tiercast.id]
  user_data = templatefile("${path.module}/node.sh.tftpl", {
    role        = "edge"
    store_url   = "http://${aws_instance.engine[0].private_ip}:7481"
    redis       = local.redis_config_endpoint
    secret_path = var.token_secret_ssm_parameter
    region      = var.region
  })
  tags = {
    Name = "${var.name}-edge-${count.index}"
    Role = "edge"
  }
}

# QUIC is UDP: a network load balancer spreads new connections; a
# connection stays on its edge (clients reconnect elsewhere when it drains).
resource "aws_lb" "quic" {
  name               = "${var.name}-quic"
  load_balancer_type = "network"
  internal           = false
  subnets            = var.subnet_ids
}

resource "aws_lb_target_group" "quic" {
  name        = "${var.name}-quic"
  port        = 7443
  protocol    = "UDP"
  vpc_id      = var.vpc_id
  target_type = "instance"
  health_check {
    protocol = "HTTP"
    port     = "7481"
    path     = "/healthz"
  }
}

resource "aws_lb_target_group_attachment" "edge" {
  count            = var.edge_count
  target_group_arn = aws_lb_target_group.quic.arn
  target_id        = aws_instance.edge[count.index].id
  port             = 7443
}

resource "aws_lb_listener" "quic" {
  load_balancer_arn = aws_lb.quic.arn
  port              = 443
  protocol          = "UDP"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.quic.arn
  }
}
