variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "name" {
  type    = string
  default = "tiercast"
}

variable "vpc_id" {
  type = string
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets, one per availability zone."
}

variable "ami_id" {
  type        = string
  description = "An image with the tiercast binary installed (e.g. built by Packer)."
}

# Sizes: written by `tiercast loadgen plan --tfvars terraform.tfvars.json`.
variable "edge_count" {
  type = number
}

variable "redis_shards" {
  type = number
}

variable "db_nodes" {
  type = number
}

variable "edge_cores" {
  type    = number
  default = 16
}

variable "edge_memory_gib" {
  type    = number
  default = 32
}

variable "engine_count" {
  type    = number
  default = 3
}

variable "redis_replicas_per_shard" {
  type    = number
  default = 1
}

variable "redis_node_type" {
  type    = string
  default = "cache.r7g.large"
}

variable "db_instance_type" {
  type    = string
  default = "i4i.2xlarge"
}

variable "engine_instance_type" {
  type    = string
  default = "c7g.2xlarge"
}

variable "token_secret_ssm_parameter" {
  type        = string
  description = "SSM parameter holding node.token_secret (never in state)."
  default     = "/tiercast/token_secret"
}
