# The backplane module alone, with a mocked AWS provider.
#   terraform test   (in terraform/modules/backplane)

mock_provider "aws" {
  mock_data "aws_vpc" {
    defaults = { cidr_block = "10.0.0.0/16" }
  }
  mock_data "aws_ssm_parameter" {
    defaults = { value = "redis-auth-token-that-must-not-leak-0123456789" }
  }
  mock_resource "aws_elasticache_replication_group" {
    defaults = { configuration_endpoint_address = "clustercfg.mock.cache.amazonaws.com" }
  }
}

variables {
  name                 = "tiercast"
  vpc_id               = "vpc-0123456789abcdef0"
  private_subnet_ids   = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2"]
  redis_shards         = 6
  auth_token_parameter = "/tiercast/redis_auth"
}

run "redis_cluster_with_tls_and_auth" {
  command = apply
  assert {
    condition     = aws_elasticache_replication_group.redis.num_node_groups == 6
    error_message = "the plan's shards"
  }
  assert {
    condition     = aws_elasticache_replication_group.redis.transit_encryption_enabled && aws_elasticache_replication_group.redis.at_rest_encryption_enabled
    error_message = "TLS in transit and encryption at rest"
  }
  assert {
    condition     = aws_elasticache_replication_group.redis.auth_token != null && aws_elasticache_replication_group.redis.parameter_group_name == "default.redis7.cluster.on"
    error_message = "AUTH required, cluster mode"
  }
  assert {
    condition     = output.endpoint == "clustercfg.mock.cache.amazonaws.com:6379"
    error_message = "the configuration endpoint, host:port"
  }
  assert {
    condition     = !strcontains(jsonencode(output.endpoint), "must-not-leak")
    error_message = "the token is in no output"
  }
}

run "redis_6_is_refused" {
  command = plan
  variables {
    engine_version = "6.2"
  }
  expect_failures = [var.engine_version]
}
