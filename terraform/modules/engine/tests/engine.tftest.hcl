# The engine module alone, with a mocked AWS provider.
#   terraform test   (in terraform/modules/engine)

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
      dns_name = "engines.elb.internal"
    }
  }
}

variables {
  name                   = "tiercast"
  vpc_id                 = "vpc-0123456789abcdef0"
  private_subnet_ids     = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2"]
  package_bucket         = "tiercast-releases"
  token_secret_parameter = "/tiercast/token_secret"
  redis_auth_parameter   = "/tiercast/redis_auth"
  redis_endpoint         = "clustercfg.mock.cache.amazonaws.com:6379"
  scylla_contact_points  = ["10.0.1.50:9042", "10.0.2.50:9042", "10.0.3.50:9042"]
}

run "engines_are_stateless_behind_an_internal_balancer_on_scylla" {
  command = apply
  assert {
    condition     = aws_lb.api.internal && toset(aws_lb.api.subnets) == toset(var.private_subnet_ids)
    error_message = "the engines' balancer is internal, in the private subnets"
  }
  assert {
    condition     = aws_autoscaling_group.engine.desired_capacity == 3
    error_message = "three engines by default"
  }
  assert {
    condition     = output.api_url == "http://engines.elb.internal:7481"
    error_message = "publishers reach the engines through the balancer, not one engine"
  }
  assert {
    condition     = strcontains(output.boot_script, "TIERCAST_SCYLLA__NODES=[\"10.0.1.50:9042\",\"10.0.2.50:9042\",\"10.0.3.50:9042\"]")
    error_message = "every engine gets the ScyllaDB contact points"
  }
  assert {
    condition     = strcontains(output.boot_script, "'eu-west': 3")
    error_message = "replication 3 in the region's datacenter by default"
  }
  assert {
    condition     = aws_lb_target_group.api.health_check[0].path == "/readyz" && aws_vpc_security_group_ingress_rule.api.from_port == 7481
    error_message = "health checks on /readyz, admitted by the security group"
  }
  assert {
    condition     = aws_launch_template.engine.iam_instance_profile[0].arn == aws_iam_instance_profile.engine.arn
    error_message = "every engine has its instance profile"
  }
}

run "one_engine_is_refused" {
  command = plan
  variables {
    engine_count = 1
  }
  expect_failures = [var.engine_count]
}
