# Checks what an apply would build, with a mocked AWS provider (no
# account, no network): sizes from the plan's tfvars, health checks the
# security groups admit, a profile on every instance, no secret in user
# data or outputs, the public balancer in the public subnets, ScyllaDB
# nodes wired into the engines.
#   terraform test   (in terraform/examples/complete)

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
  mock_data "aws_subnet" {
    defaults = { cidr_block = "10.0.1.0/24" }
  }
  mock_data "aws_ami" {
    defaults = { id = "ami-0123456789abcdef0" }
  }
  mock_data "aws_ssm_parameter" {
    defaults = { value = "redis-auth-token-that-must-not-leak-0123456789" }
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
  mock_resource "aws_elasticache_replication_group" {
    defaults = { configuration_endpoint_address = "clustercfg.mock.cache.amazonaws.com" }
  }
}

# What `tiercast loadgen plan --tfvars` writes, plus where to deploy.
variables {
  edge_count           = 29
  redis_shards         = 6
  db_nodes             = 9
  edge_cores           = 16
  edge_memory_gib      = 32
  edge_max_connections = 99000
  engine_count         = 5
  vpc_id               = "vpc-0123456789abcdef0"
  private_subnet_ids   = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2", "subnet-0aaaaaaaaaaaaaaa3"]
  public_subnet_ids    = ["subnet-0bbbbbbbbbbbbbbb1", "subnet-0bbbbbbbbbbbbbbb2", "subnet-0bbbbbbbbbbbbbbb3"]
  package_bucket       = "tiercast-releases"
}

run "sizes_come_from_the_plan" {
  command = apply

  assert {
    condition     = module.edge.instance_type == "c7g.4xlarge"
    error_message = "16 cores and 32 GiB should be a c7g.4xlarge, got ${module.edge.instance_type}"
  }
  assert {
    condition     = output.edge_instance_type == "c7g.4xlarge"
    error_message = "the output names the chosen size"
  }
  assert {
    condition     = length(module.scylla.contact_points) == 9
    error_message = "one contact point per planned ScyllaDB node"
  }
  assert {
    condition     = module.engine.autoscaling_group_name != "" && output.engine_count == 5
    error_message = "the planned engines"
  }
  assert {
    condition     = strcontains(module.edge.boot_script, "TIERCAST_EDGE__MAX_CONNECTIONS=99000")
    error_message = "every edge admits what the plan put on it"
  }
}

run "a_large_plan_gets_a_large_edge_not_a_capped_one" {
  command = apply
  variables {
    edge_cores      = 64
    edge_memory_gib = 200
  }
  assert {
    condition     = module.edge.instance_type == "m7g.16xlarge"
    error_message = "64 cores and 200 GiB: m7g.16xlarge (a c7g.16xlarge has 128 GiB), got ${module.edge.instance_type}"
  }
}

run "secrets_stay_out_of_user_data_and_outputs" {
  command = apply
  assert {
    condition     = !strcontains(module.edge.boot_script, "redis-auth-token-that-must-not-leak")
    error_message = "the Redis AUTH token is in the edges' user data"
  }
  assert {
    condition     = !strcontains(module.engine.boot_script, "redis-auth-token-that-must-not-leak")
    error_message = "the Redis AUTH token is in the engines' user data"
  }
  assert {
    condition     = strcontains(module.edge.boot_script, "ssm get-parameter --with-decryption")
    error_message = "the edges read their secrets from SSM at boot"
  }
  assert {
    condition     = !strcontains(jsonencode([output.quic_endpoint, output.api_url, output.redis_endpoint, output.scylla_contact_points]), "must-not-leak")
    error_message = "a secret is in an output"
  }
}

run "scylla_nodes_are_wired_into_the_engines" {
  command = apply
  assert {
    condition     = alltrue([for cp in module.scylla.contact_points : strcontains(module.engine.boot_script, cp)])
    error_message = "every ScyllaDB contact point is in the engines' configuration"
  }
  assert {
    condition     = strcontains(module.engine.boot_script, "TIERCAST_NODE__STORE=scylla")
    error_message = "the engines use the ScyllaDB store"
  }
  assert {
    condition     = alltrue([for cp in module.scylla.contact_points : strcontains(module.edge.boot_script, cp)]) && strcontains(module.edge.boot_script, "TIERCAST_NODE__STORE=scylla")
    error_message = "the edges use the same ScyllaDB cluster directly"
  }
}
