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
  description = "Subnets of the engines and their internal load balancer, one per availability zone."
  type        = list(string)
  validation {
    condition     = length(var.private_subnet_ids) >= 2
    error_message = "private_subnet_ids: at least two availability zones."
  }
}

variable "engine_count" {
  description = "Engines to run. They are stateless (the store is ScyllaDB): any of them serves any publish or store call."
  type        = number
  default     = 3
  validation {
    condition     = var.engine_count >= 2 && var.engine_count <= 200 && floor(var.engine_count) == var.engine_count
    error_message = "engine_count: a whole number, 2-200 (one engine is a single point of failure)."
  }
}

variable "architecture" {
  description = "CPU architecture of the engines: arm64 or x86_64."
  type        = string
  default     = "arm64"
  validation {
    condition     = contains(["arm64", "x86_64"], var.architecture)
    error_message = "architecture: arm64 or x86_64."
  }
}

variable "instance_type" {
  description = "Engine instance type; it must be of `architecture`."
  type        = string
  default     = "c7g.2xlarge"
}

variable "ami_id" {
  description = "Image of the engines. Null: the newest Ubuntu 24.04 of `architecture`."
  type        = string
  default     = null
}

variable "package_bucket" {
  description = "S3 bucket holding the tiercast .deb."
  type        = string
}

variable "package_key" {
  description = "Key of the .deb in `package_bucket`."
  type        = string
  default     = "tiercast.deb"
}

variable "token_secret_parameter" {
  description = "SSM SecureString parameter holding node.token_secret."
  type        = string
  validation {
    condition     = startswith(var.token_secret_parameter, "/")
    error_message = "token_secret_parameter: an SSM parameter name, starting with /."
  }
}

variable "redis_auth_parameter" {
  description = "SSM SecureString parameter holding the Redis AUTH token."
  type        = string
  validation {
    condition     = startswith(var.redis_auth_parameter, "/")
    error_message = "redis_auth_parameter: an SSM parameter name, starting with /."
  }
}

variable "kms_key_arn" {
  description = "KMS key of the SecureString parameters, if not the AWS-managed aws/ssm key."
  type        = string
  default     = null
}

variable "redis_endpoint" {
  description = "The backplane's cluster configuration endpoint, host:port (TLS)."
  type        = string
}

variable "scylla_contact_points" {
  description = "ScyllaDB contact points, host:port (the scylla module's output)."
  type        = list(string)
  validation {
    condition     = length(var.scylla_contact_points) >= 1
    error_message = "scylla_contact_points: at least one."
  }
}

variable "scylla_keyspace" {
  description = "The keyspace the engines create (if missing) and use."
  type        = string
  default     = "tiercast"
}

variable "scylla_replication" {
  description = "The keyspace's replication (CQL map). Null: NetworkTopologyStrategy with 3 replicas in the region's datacenter."
  type        = string
  default     = null
}

variable "http_port" {
  description = "TCP port of the engines' HTTP API (publish, store API, /healthz, /readyz, /metrics)."
  type        = number
  default     = 7481
}
