# The edge module alone, with a mocked AWS provider: what an infra team
# relies on when it applies it.
#   terraform test   (in terraform/modules/edge)

mock_provider "aws" {
  mock_data "aws_region" {
    defaults = { name = "eu-west-1" }
  }
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
  mock_data "aws_vpc" {
    defaults = { cidr_block = "10.0.0.0/16" }
  }
  mock_data "aws_ami" {
    defaults = { id = "ami-0123456789abcdef0" }
  }
  mock_resource "aws_iam_instance_profile" {
    defaults = { arn = "arn:aws:iam::123456789012:instance-profile/mock" }
  }
  mock_resource "aws_launch_template" {
    defaults = { id = "lt-0123456789abcdef0", latest_version = 1 }
  }
  mock_resource "aws_lb_target_group" {
    defaults = { arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/mock/0123456789abcdef" }
  }
  mock_resource "aws_lb" {
    defaults = {
      arn      = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/net/mock/0123456789abcdef"
      dns_name = "mock-lb.elb.eu-west-1.amazonaws.com"
    }
  }
}

variables {
  name                      = "tiercast"
  vpc_id                    = "vpc-0123456789abcdef0"
  private_subnet_ids        = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2"]
  public_subnet_ids         = ["subnet-0bbbbbbbbbbbbbbb1", "subnet-0bbbbbbbbbbbbbbb2"]
  edge_count                = 12
  edge_cores                = 8
  edge_memory_gib           = 16
  package_bucket            = "tiercast-releases"
  token_secret_parameter    = "/tiercast/token_secret"
  tls_certificate_parameter = "/tiercast/tls_cert"
  tls_key_parameter         = "/tiercast/tls_key"
  redis_auth_parameter      = "/tiercast/redis_auth"
  redis_endpoint            = "clustercfg.mock.cache.amazonaws.com:6379"
  scylla_contact_points     = ["10.0.1.50:9042", "10.0.2.50:9042", "10.0.3.50:9042"]
  drain_deadline_s          = 45
}

run "the_fleet_is_an_autoscaling_group_of_the_planned_size" {
  command = apply
  assert {
    condition     = aws_autoscaling_group.edge.desired_capacity == 12 && aws_autoscaling_group.edge.min_size == 12
    error_message = "12 edges planned"
  }
  assert {
    condition     = aws_autoscaling_group.edge.max_size > 12
    error_message = "room above the plan for a rolling refresh"
  }
  assert {
    condition     = aws_launch_template.edge.instance_type == "c7g.2xlarge"
    error_message = "8 cores and 16 GiB on arm64: c7g.2xlarge"
  }
  assert {
    condition     = one(aws_autoscaling_group.edge.instance_refresh).strategy == "Rolling"
    error_message = "a new image rolls through the edges"
  }
}

run "a_stopping_edge_drains_inside_its_termination_hook" {
  command = apply
  assert {
    condition     = one(aws_autoscaling_group.edge.initial_lifecycle_hook).lifecycle_transition == "autoscaling:EC2_INSTANCE_TERMINATING"
    error_message = "a termination hook"
  }
  assert {
    condition     = one(aws_autoscaling_group.edge.initial_lifecycle_hook).heartbeat_timeout > 45 + 20
    error_message = "the hook outlasts the drain deadline and the unit's stop timeout"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.edge.user_data), "TimeoutStopSec=%s") && strcontains(base64decode(aws_launch_template.edge.user_data), "\"65\"")
    error_message = "systemd waits the drain deadline plus a margin (45 + 20 s) before it kills the edge"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.edge.user_data), "TIERCAST_EDGE__DRAIN_DEADLINE_MS=45000")
    error_message = "the edge's drain deadline is the module's"
  }
}

run "the_health_check_is_admitted_and_the_balancer_is_public" {
  command = apply
  assert {
    condition     = aws_lb_target_group.quic.health_check[0].port == "7481" && aws_lb_target_group.quic.health_check[0].path == "/readyz"
    error_message = "the balancer checks /readyz on the HTTP port"
  }
  assert {
    condition     = aws_vpc_security_group_ingress_rule.health.from_port == 7481 && aws_vpc_security_group_ingress_rule.health.ip_protocol == "tcp" && aws_vpc_security_group_ingress_rule.health.cidr_ipv4 == "10.0.0.0/16"
    error_message = "the security group admits the health check from the VPC"
  }
  assert {
    condition     = aws_lb.quic.internal == false && toset(aws_lb.quic.subnets) == toset(var.public_subnet_ids)
    error_message = "the internet-facing balancer sits in the public subnets"
  }
  assert {
    condition     = toset(aws_autoscaling_group.edge.vpc_zone_identifier) == toset(var.private_subnet_ids)
    error_message = "the edges sit in the private subnets"
  }
}

run "every_edge_has_a_profile_that_reads_only_its_own_parameters" {
  command = apply
  assert {
    condition     = aws_launch_template.edge.iam_instance_profile[0].arn == aws_iam_instance_profile.edge.arn
    error_message = "the launch template carries the instance profile"
  }
  assert {
    condition = alltrue([
      for s in jsondecode(aws_iam_role_policy.edge.policy).Statement :
      alltrue([for r in flatten([s.Resource]) : r != "*"])
    ])
    error_message = "no statement grants on every resource"
  }
  assert {
    condition     = length(jsondecode(aws_iam_role_policy.edge.policy).Statement[0].Resource) == 4
    error_message = "the four parameters it needs, no more"
  }
  assert {
    condition     = aws_launch_template.edge.metadata_options[0].http_tokens == "required"
    error_message = "IMDSv2 only"
  }
  assert {
    condition     = !strcontains(aws_iam_role_policy.edge.policy, "internal_secret")
    error_message = "the edges use ScyllaDB directly: no store API credential"
  }
  assert {
    condition     = strcontains(base64decode(aws_launch_template.edge.user_data), "umask 077")
    error_message = "the boot script writes its files private"
  }
}

run "the_image_is_looked_up_for_the_architecture" {
  command = apply
  variables {
    architecture = "x86_64"
  }
  assert {
    condition     = aws_launch_template.edge.instance_type == "c7i.2xlarge"
    error_message = "x86_64 sizes from the c7i family"
  }
  assert {
    condition     = contains(one([for f in data.aws_ami.ubuntu[0].filter : f.values if f.name == "architecture"]), "x86_64")
    error_message = "the image lookup asks for the edges' architecture"
  }
}

run "a_plan_no_size_can_hold_is_refused_by_name" {
  command = plan
  variables {
    edge_cores      = 96
    edge_memory_gib = 100
  }
  expect_failures = [aws_launch_template.edge]
}
