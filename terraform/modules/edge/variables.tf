variable "name" {
  description = "Name prefix of every resource of this fleet."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name: 2-21 characters, lowercase letters, digits and dashes, starting with a letter (it prefixes load balancer names, which AWS caps at 32)."
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
  description = "Subnets the edge instances run in, one per availability zone."
  type        = list(string)
  validation {
    condition     = length(var.private_subnet_ids) >= 2
    error_message = "private_subnet_ids: at least two availability zones."
  }
}

variable "public_subnet_ids" {
  description = "Public subnets (a route to an internet gateway) of the internet-facing QUIC load balancer, one per availability zone."
  type        = list(string)
  validation {
    condition     = length(var.public_subnet_ids) >= 2
    error_message = "public_subnet_ids: at least two availability zones."
  }
}

variable "client_cidr_blocks" {
  description = "Where devices connect from. The UDP load balancer keeps the client's address, so the edges' security group admits these."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "edge_count" {
  description = "Edges to run (desired capacity), from `tiercast loadgen plan --tfvars`."
  type        = number
  validation {
    condition     = var.edge_count >= 1 && var.edge_count <= 1000 && floor(var.edge_count) == var.edge_count
    error_message = "edge_count: a whole number, 1-1000."
  }
}

variable "edge_cores" {
  description = "vCPUs each edge needs, from the plan. The instance type is the smallest of `instance_families` with at least these vCPUs and `edge_memory_gib`."
  type        = number
  validation {
    condition     = var.edge_cores >= 1 && var.edge_cores <= 192
    error_message = "edge_cores: 1-192."
  }
}

variable "edge_memory_gib" {
  description = "Memory each edge needs, GiB, from the plan."
  type        = number
  validation {
    condition     = var.edge_memory_gib >= 1 && var.edge_memory_gib <= 1536
    error_message = "edge_memory_gib: 1-1536."
  }
}

variable "edge_max_connections" {
  description = "Connections each edge admits (edge.max_connections), from the plan: its share of the devices with one edge down."
  type        = number
  default     = 100000
  validation {
    condition     = var.edge_max_connections >= 1 && var.edge_max_connections <= 10000000
    error_message = "edge_max_connections: 1-10000000."
  }
}

variable "architecture" {
  description = "CPU architecture of the edges: arm64 (Graviton) or x86_64. The image and the instance families follow it."
  type        = string
  default     = "arm64"
  validation {
    condition     = contains(["arm64", "x86_64"], var.architecture)
    error_message = "architecture: arm64 or x86_64."
  }
}

variable "instance_families" {
  description = "Instance families to size from, in order of preference (compute first). Empty: c7g, m7g, r7g on arm64; c7i, m7i, r7i on x86_64."
  type        = list(string)
  default     = []
}

variable "ami_id" {
  description = "Image of the edges. Null: the newest Ubuntu 24.04 of `architecture` (the package is a .deb)."
  type        = string
  default     = null
}

variable "package_bucket" {
  description = "S3 bucket holding the tiercast .deb (built with `cargo deb -p tiercast`)."
  type        = string
}

variable "package_key" {
  description = "Key of the .deb in `package_bucket`."
  type        = string
  default     = "tiercast.deb"
}

variable "token_secret_parameter" {
  description = "SSM SecureString parameter holding node.token_secret (shared by the whole fleet; never in Terraform state)."
  type        = string
  validation {
    condition     = startswith(var.token_secret_parameter, "/")
    error_message = "token_secret_parameter: an SSM parameter name, starting with /."
  }
}

variable "tls_certificate_parameter" {
  description = "SSM parameter holding the edges' TLS certificate chain (PEM) for the name devices connect to; the edges never make their own."
  type        = string
  validation {
    condition     = startswith(var.tls_certificate_parameter, "/")
    error_message = "tls_certificate_parameter: an SSM parameter name, starting with /."
  }
}

variable "tls_key_parameter" {
  description = "SSM SecureString parameter holding the private key of that certificate (PEM)."
  type        = string
  validation {
    condition     = startswith(var.tls_key_parameter, "/")
    error_message = "tls_key_parameter: an SSM parameter name, starting with /."
  }
}

variable "redis_auth_parameter" {
  description = "SSM SecureString parameter holding the Redis AUTH token (backplane.redis.password)."
  type        = string
  validation {
    condition     = startswith(var.redis_auth_parameter, "/")
    error_message = "redis_auth_parameter: an SSM parameter name, starting with /."
  }
}

variable "kms_key_arn" {
  description = "KMS key of the SecureString parameters, if not the AWS-managed aws/ssm key (the instance role may decrypt with it)."
  type        = string
  default     = null
}

variable "redis_endpoint" {
  description = "The backplane's cluster configuration endpoint, host:port (TLS)."
  type        = string
}

variable "scylla_contact_points" {
  description = "ScyllaDB contact points, host:port (the scylla module's output): the edges read and write the store directly."
  type        = list(string)
  validation {
    condition     = length(var.scylla_contact_points) >= 1
    error_message = "scylla_contact_points: at least one."
  }
}

variable "scylla_keyspace" {
  description = "The keyspace (the engines' too)."
  type        = string
  default     = "tiercast"
}

variable "quic_port" {
  description = "UDP port the edges listen on (edge.listen)."
  type        = number
  default     = 7443
}

variable "http_port" {
  description = "TCP port of each edge's /healthz, /readyz and /metrics (node.http_listen)."
  type        = number
  default     = 7481
}

variable "public_port" {
  description = "UDP port of the load balancer devices connect to."
  type        = number
  default     = 443
}

variable "drain_deadline_s" {
  description = "edge.drain_deadline_ms in seconds: how long a stopping edge gives its devices to move. The termination hook and the unit's stop timeout are sized from it."
  type        = number
  default     = 10
  validation {
    condition     = var.drain_deadline_s >= 1 && var.drain_deadline_s <= 600
    error_message = "drain_deadline_s: 1-600 (edge.drain_deadline_ms allows 600000)."
  }
}

variable "max_unavailable_percent" {
  description = "Share of the edges an instance refresh replaces at once (their devices move to the rest)."
  type        = number
  default     = 10
  validation {
    condition     = var.max_unavailable_percent >= 1 && var.max_unavailable_percent <= 50
    error_message = "max_unavailable_percent: 1-50."
  }
}
