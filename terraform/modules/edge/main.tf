# Edges: an autoscaling group behind an internet-facing UDP network load
# balancer. Instances are replaced by rolling instance refresh; a stopping
# edge drains its devices (SIGTERM) inside a termination lifecycle hook.

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
  asg_name  = "${var.name}-edge"
  hook_name = "${var.name}-edge-drain"
  tags      = merge(var.tags, { "tiercast:role" = "edge" })

  # Sizes of the current families (vCPUs; memory is vCPUs x the family's
  # GiB per vCPU): the smallest that holds the plan's cores and memory,
  # compute before general purpose before memory optimised.
  families = length(var.instance_families) > 0 ? var.instance_families : (
    var.architecture == "arm64" ? ["c7g", "m7g", "r7g"] : ["c7i", "m7i", "r7i"]
  )
  gib_per_vcpu = { c = 2, m = 4, r = 8 }
  sizes = var.architecture == "arm64" ? {
    large = 2, xlarge = 4, "2xlarge" = 8, "4xlarge" = 16, "8xlarge" = 32, "12xlarge" = 48, "16xlarge" = 64
    } : {
    large = 2, xlarge = 4, "2xlarge" = 8, "4xlarge" = 16, "8xlarge" = 32, "12xlarge" = 48, "16xlarge" = 64, "24xlarge" = 96, "48xlarge" = 192
  }
  candidates = sort(flatten([
    for i, f in local.families : [
      for size, vcpus in local.sizes : format("%04d/%d/%s.%s", vcpus, i, f, size)
      if vcpus >= var.edge_cores && vcpus * lookup(local.gib_per_vcpu, substr(f, 0, 1), 2) >= var.edge_memory_gib
    ]
  ]))
  instance_type = length(local.candidates) > 0 ? split("/", local.candidates[0])[2] : null

  ami_id = var.ami_id != null ? var.ami_id : data.aws_ami.ubuntu[0].id

  parameters = [
    var.token_secret_parameter,
    var.tls_certificate_parameter,
    var.tls_key_parameter,
    var.redis_auth_parameter,
  ]
  parameter_arns = [
    for p in local.parameters :
    "arn:${data.aws_partition.current.partition}:ssm:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:parameter${p}"
  ]
}

# --- permissions: the parameters it reads, its package, its own hook ---

resource "aws_iam_role" "edge" {
  name = "${var.name}-edge"
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

resource "aws_iam_role_policy" "edge" {
  name = "${var.name}-edge"
  role = aws_iam_role.edge.id
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
      {
        Sid      = "CompleteOwnDrainHook"
        Effect   = "Allow"
        Action   = ["autoscaling:CompleteLifecycleAction"]
        Resource = ["arn:${data.aws_partition.current.partition}:autoscaling:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:*:autoScalingGroupName/${local.asg_name}"]
      },
      ], var.kms_key_arn == null ? [] : [{
        Sid      = "DecryptParameters"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = [var.kms_key_arn]
    }])
  })
}

resource "aws_iam_instance_profile" "edge" {
  name = "${var.name}-edge"
  role = aws_iam_role.edge.name
  tags = local.tags
}

# --- network ---

resource "aws_security_group" "edge" {
  name        = "${var.name}-edge"
  description = "Tiercast edges: QUIC from devices, health checks and metrics from the VPC"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-edge" })
}

resource "aws_vpc_security_group_ingress_rule" "quic" {
  for_each          = toset(var.client_cidr_blocks)
  security_group_id = aws_security_group.edge.id
  description       = "QUIC from devices (the UDP balancer keeps their addresses)"
  ip_protocol       = "udp"
  from_port         = var.quic_port
  to_port           = var.quic_port
  cidr_ipv4         = each.value
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "health" {
  security_group_id = aws_security_group.edge.id
  description       = "Load balancer health checks (/readyz) and Prometheus (/metrics) from the VPC"
  ip_protocol       = "tcp"
  from_port         = var.http_port
  to_port           = var.http_port
  cidr_ipv4         = data.aws_vpc.this.cidr_block
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.edge.id
  description       = "Redis, the engines, SSM, S3 and package mirrors"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
  tags              = local.tags
}

resource "aws_lb" "quic" {
  name               = "${var.name}-quic"
  load_balancer_type = "network"
  internal           = false
  subnets            = var.public_subnet_ids
  tags               = local.tags
}

resource "aws_lb_target_group" "quic" {
  name                 = "${var.name}-quic"
  port                 = var.quic_port
  protocol             = "UDP"
  vpc_id               = var.vpc_id
  target_type          = "instance"
  deregistration_delay = var.drain_deadline_s
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

resource "aws_lb_listener" "quic" {
  load_balancer_arn = aws_lb.quic.arn
  port              = var.public_port
  protocol          = "UDP"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.quic.arn
  }
  tags = local.tags
}

# --- instances ---

resource "aws_launch_template" "edge" {
  name_prefix   = "${var.name}-edge-"
  image_id      = local.ami_id
  instance_type = local.instance_type
  user_data = base64encode(templatefile("${path.module}/boot.sh.tftpl", {
    region                    = data.aws_region.current.name
    package_bucket            = var.package_bucket
    package_key               = var.package_key
    token_secret_parameter    = var.token_secret_parameter
    tls_certificate_parameter = var.tls_certificate_parameter
    tls_key_parameter         = var.tls_key_parameter
    redis_auth_parameter      = var.redis_auth_parameter
    redis_endpoint            = var.redis_endpoint
    scylla_nodes              = jsonencode(var.scylla_contact_points)
    scylla_keyspace           = var.scylla_keyspace
    quic_port                 = var.quic_port
    http_port                 = var.http_port
    drain_deadline_ms         = var.drain_deadline_s * 1000
    max_connections           = var.edge_max_connections
    stop_timeout_s            = var.drain_deadline_s + 20
    asg_name                  = local.asg_name
    hook_name                 = local.hook_name
  }))
  iam_instance_profile {
    arn = aws_iam_instance_profile.edge.arn
  }
  vpc_security_group_ids = [aws_security_group.edge.id]
  metadata_options {
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
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
    tags          = merge(local.tags, { Name = "${var.name}-edge" })
  }
  tag_specifications {
    resource_type = "volume"
    tags          = local.tags
  }
  tags = local.tags

  lifecycle {
    precondition {
      condition     = local.instance_type != null
      error_message = "No ${var.architecture} size of ${join(", ", local.families)} has ${var.edge_cores} vCPUs and ${var.edge_memory_gib} GiB: plan more, smaller edges, or use x86_64."
    }
  }
}

resource "aws_autoscaling_group" "edge" {
  name                      = local.asg_name
  vpc_zone_identifier       = var.private_subnet_ids
  desired_capacity          = var.edge_count
  min_size                  = var.edge_count
  max_size                  = var.edge_count + max(1, ceil(var.edge_count * var.max_unavailable_percent / 100))
  target_group_arns         = [aws_lb_target_group.quic.arn]
  health_check_type         = "ELB"
  health_check_grace_period = 120

  launch_template {
    id      = aws_launch_template.edge.id
    version = aws_launch_template.edge.latest_version
  }

  # A new image or size replaces the edges a few at a time: each stopping
  # edge drains (its devices reconnect to the others) before it goes.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 100 - var.max_unavailable_percent
      instance_warmup        = 60
    }
  }

  # Termination waits for the drain: the instance's tiercast-drain-hook
  # stops tiercast-edge (SIGTERM, the drain) and completes this hook.
  initial_lifecycle_hook {
    name                 = local.hook_name
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    default_result       = "CONTINUE"
    heartbeat_timeout    = var.drain_deadline_s + 60
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = "${var.name}-edge" })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = false
    }
  }
}
