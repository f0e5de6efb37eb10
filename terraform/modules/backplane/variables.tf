variable "name" {
  description = "Name prefix of every resource of this fleet."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name: 2-21 characters, lowercase letters, digits and dashes, starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "vpc_id" {
  description = "The VPC of the fleet."
  type        = string
}

variable "private_subnet_ids" {
  description = "Subnets of the Redis nodes, one per availability zone."
  type        = list(string)
  validation {
    condition     = length(var.private_subnet_ids) >= 2
    error_message = "private_subnet_ids: at least two availability zones (replicas in another zone)."
  }
}

variable "redis_shards" {
  description = "Shards (node groups) of the Redis cluster, from `tiercast loadgen plan --tfvars`: sharded pub/sub spreads the channels over them."
  type        = number
  validation {
    condition     = var.redis_shards >= 1 && var.redis_shards <= 500 && floor(var.redis_shards) == var.redis_shards
    error_message = "redis_shards: a whole number, 1-500 (ElastiCache's limit)."
  }
}

variable "replicas_per_shard" {
  description = "Replicas of each shard (failover targets)."
  type        = number
  default     = 1
  validation {
    condition     = var.replicas_per_shard >= 1 && var.replicas_per_shard <= 5
    error_message = "replicas_per_shard: 1-5 (at least one, for failover)."
  }
}

variable "node_type" {
  description = "ElastiCache node type."
  type        = string
  default     = "cache.r7g.large"
  validation {
    condition     = startswith(var.node_type, "cache.")
    error_message = "node_type: an ElastiCache node type (cache.*)."
  }
}

variable "engine_version" {
  description = "Redis OSS version (7.0 or later: sharded pub/sub)."
  type        = string
  default     = "7.1"
  validation {
    condition     = can(regex("^7\\.", var.engine_version))
    error_message = "engine_version: 7.x (sharded pub/sub needs Redis 7)."
  }
}

variable "auth_token_parameter" {
  description = "SSM SecureString parameter holding the AUTH token (16-128 printable characters). Terraform reads it to configure the cluster, so it is in the state: keep the state encrypted."
  type        = string
  validation {
    condition     = startswith(var.auth_token_parameter, "/")
    error_message = "auth_token_parameter: an SSM parameter name, starting with /."
  }
}

variable "allowed_cidr_blocks" {
  description = "Who may reach Redis (the edges' and engines' subnets). Null: the VPC's CIDR."
  type        = list(string)
  default     = null
}
