# Sizes: written by `tiercast loadgen plan --tfvars terraform.tfvars.json`.

variable "edge_count" {
  description = "Edges, from the plan."
  type        = number
}

variable "redis_shards" {
  description = "Redis shards, from the plan."
  type        = number
}

variable "db_nodes" {
  description = "ScyllaDB nodes, from the plan."
  type        = number
}

variable "edge_cores" {
  description = "vCPUs per edge, from the plan."
  type        = number
}

variable "edge_memory_gib" {
  description = "Memory per edge, GiB, from the plan."
  type        = number
}

variable "edge_max_connections" {
  description = "Connections each edge admits, from the plan (its share with one edge down)."
  type        = number
  default     = 100000
}

variable "engine_count" {
  description = "Engines, from the plan."
  type        = number
  default     = 3
}

# Where and what: set these yourself.

variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Name prefix of every resource."
  type        = string
  default     = "tiercast"
}

variable "vpc_id" {
  description = "The VPC to deploy into."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets (edges, engines, Redis, ScyllaDB), one per availability zone."
  type        = list(string)
}

variable "public_subnet_ids" {
  description = "Public subnets of the internet-facing QUIC load balancer, one per availability zone."
  type        = list(string)
}

variable "package_bucket" {
  description = "S3 bucket holding the tiercast .deb (`cargo deb -p tiercast`)."
  type        = string
}

variable "package_key" {
  description = "Key of the .deb in the bucket."
  type        = string
  default     = "tiercast.deb"
}

variable "parameter_prefix" {
  description = "Prefix of the SSM parameters: token_secret, redis_auth (SecureString), tls_cert, tls_key (SecureString). Create them before applying."
  type        = string
  default     = "/tiercast/"
  validation {
    condition     = startswith(var.parameter_prefix, "/") && endswith(var.parameter_prefix, "/")
    error_message = "parameter_prefix: starts and ends with /."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
