# The backplane: ElastiCache for Redis OSS 7 in cluster mode (sharded
# pub/sub, routes, leases, read-marker streams), TLS in transit and at
# rest, AUTH required, a replica of every shard in another zone.

data "aws_vpc" "this" {
  id = var.vpc_id
}

data "aws_ssm_parameter" "auth" {
  name            = var.auth_token_parameter
  with_decryption = true
}

locals {
  tags = merge(var.tags, { "tiercast:role" = "backplane" })
}

resource "aws_security_group" "redis" {
  name        = "${var.name}-redis"
  description = "Tiercast backplane: Redis (TLS) from the fleet"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-redis" })
}

resource "aws_vpc_security_group_ingress_rule" "redis" {
  for_each          = toset(coalesce(var.allowed_cidr_blocks, [data.aws_vpc.this.cidr_block]))
  security_group_id = aws_security_group.redis.id
  description       = "Redis (TLS) from the edges and engines"
  ip_protocol       = "tcp"
  from_port         = 6379
  to_port           = 6379
  cidr_ipv4         = each.value
  tags              = local.tags
}

resource "aws_elasticache_subnet_group" "redis" {
  name       = "${var.name}-redis"
  subnet_ids = var.private_subnet_ids
  tags       = local.tags
}

resource "aws_elasticache_replication_group" "redis" {
  replication_group_id       = "${var.name}-backplane"
  description                = "Tiercast backplane (sharded pub/sub, routes, leases, read-marker streams)"
  engine                     = "redis"
  engine_version             = var.engine_version
  node_type                  = var.node_type
  port                       = 6379
  num_node_groups            = var.redis_shards
  replicas_per_node_group    = var.replicas_per_shard
  automatic_failover_enabled = true
  multi_az_enabled           = true
  parameter_group_name       = "default.redis7.cluster.on"
  subnet_group_name          = aws_elasticache_subnet_group.redis.name
  security_group_ids         = [aws_security_group.redis.id]
  transit_encryption_enabled = true
  at_rest_encryption_enabled = true
  auth_token                 = data.aws_ssm_parameter.auth.value
  auth_token_update_strategy = "ROTATE"
  apply_immediately          = false
  tags                       = local.tags
}
