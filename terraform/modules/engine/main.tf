# Engines: stateless, in an autoscaling group behind an internal load
# balancer; every engine uses the ScyllaDB cluster as its store, so a
# message published through any of them is where every edge reads.

data "aws_region" "current" {}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_vpc" "this" {
  id = var.vpc_id
}

data "aws_ami" "ubuntu" {
  count       = var.ami_id == null ? 1 : 0
  most_recent = true
  owners      = ["099720109477"] # Canonical
  filter {
    name   = "name"
    values = ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-${var.architecture == "arm64" ? "arm64" : "amd64"}-server-*"]
  }
  filter {
    name   = "architecture"
    values = [var.architecture]
  }
}

locals {
  tags   = merge(var.tags, { "tiercast:role" = "engine" })
  ami_id = var.ami_id != null ? var.ami_id : data.aws_ami.ubuntu[0].id
  # Ec2Snitch names the datacenter after the region (eu-west-1 -> eu-west).
  replication = coalesce(var.scylla_replication,
  "{'class': 'NetworkTopologyStrategy', '${replace(data.aws_region.current.name, "/-[0-9]+$/", "")}': 3}")
  parameters = [var.token_secret_parameter, var.redis_auth_parameter]
  parameter_arns = [
    for p in local.parameters :
    "arn:${data.aws_partition.current.partition}:ssm:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:parameter${p}"
  ]
}

resource "aws_iam_role" "engine" {
  name = "${var.name}-engine"
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

resource "aws_iam_role_policy" "engine" {
  name = "${var.name}-engine"
  role = aws_iam_role.engine.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat([
      {
        Sid      = "ReadOwnParameters"
        Effect   = "Allow"
        Action   = ["ssm:GetParameter"]
        Resource = local.parameter_arns
      },
      {
        Sid      = "FetchPackage"
        Effect   = "Allow"
        Action   = ["s3:GetObject"]
        Resource = ["arn:${data.aws_partition.current.partition}:s3:::${var.package_bucket}/${var.package_key}"]
      },
      ], var.kms_key_arn == null ? [] : [{
        Sid      = "DecryptParameters"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = [var.kms_key_arn]
    }])
  })
}

resource "aws_iam_instance_profile" "engine" {
  name = "${var.name}-engine"
  role = aws_iam_role.engine.name
  tags = local.tags
}

resource "aws_security_group" "engine" {
  name        = "${var.name}-engine"
  description = "Tiercast engines: the HTTP API from the VPC (publishers, health checks)"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-engine" })
}

resource "aws_vpc_security_group_ingress_rule" "api" {
  security_group_id = aws_security_group.engine.id
  description       = "HTTP API, health checks and metrics from the VPC"
  ip_protocol       = "tcp"
  from_port         = var.http_port
  to_port           = var.http_port
  cidr_ipv4         = data.aws_vpc.this.cidr_block
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.engine.id
  description       = "ScyllaDB, Redis, SSM, S3 and package mirrors"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
  tags              = local.tags
}

resource "aws_lb" "api" {
  name               = "${var.name}-engine"
  load_balancer_type = "network"
  internal           = true
  subnets            = var.private_subnet_ids
  tags               = local.tags
}

resource "aws_lb_target_group" "api" {
  name                 = "${var.name}-engine"
  port                 = var.http_port
  protocol             = "TCP"
  vpc_id               = var.vpc_id
  target_type          = "instance"
  deregistration_delay = 30
  health_check {
    protocol            = "HTTP"
    port                = tostring(var.http_port)
    path                = "/readyz"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }
  tags = local.tags
}

resource "aws_lb_listener" "api" {
  load_balancer_arn = aws_lb.api.arn
  port              = var.http_port
  protocol          = "TCP"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
  tags = local.tags
}

resource "aws_launch_template" "engine" {
  name_prefix   = "${var.name}-engine-"
  image_id      = local.ami_id
  instance_type = var.instance_type
  user_data = base64encode(templatefile("${path.module}/boot.sh.tftpl", {
    region                 = data.aws_region.current.name
    package_bucket         = var.package_bucket
    package_key            = var.package_key
    token_secret_parameter = var.token_secret_parameter
    redis_auth_parameter   = var.redis_auth_parameter
    redis_endpoint         = var.redis_endpoint
    scylla_nodes           = jsonencode(var.scylla_contact_points)
    scylla_keyspace        = var.scylla_keyspace
    scylla_replication     = local.replication
    http_port              = var.http_port
  }))
  iam_instance_profile {
    arn = aws_iam_instance_profile.engine.arn
  }
  vpc_security_group_ids = [aws_security_group.engine.id]
  metadata_options {
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  block_device_mappings {
    device_name = "/dev/sda1"
    ebs {
      volume_size = 20
      volume_type = "gp3"
      encrypted   = true
    }
  }
  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = "${var.name}-engine" })
  }
  tags = local.tags
}

resource "aws_autoscaling_group" "engine" {
  name                      = "${var.name}-engine"
  vpc_zone_identifier       = var.private_subnet_ids
  desired_capacity          = var.engine_count
  min_size                  = var.engine_count
  max_size                  = var.engine_count + 1
  target_group_arns         = [aws_lb_target_group.api.arn]
  health_check_type         = "ELB"
  health_check_grace_period = 120

  launch_template {
    id      = aws_launch_template.engine.id
    version = aws_launch_template.engine.latest_version
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
      instance_warmup        = 60
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = "${var.name}-engine" })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = false
    }
  }
}
