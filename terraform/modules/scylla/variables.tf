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
  description = "Subnets of the nodes, one per availability zone (Ec2Snitch makes each zone a rack); nodes are spread over them in turn."
  type        = list(string)
  validation {
    condition     = length(var.private_subnet_ids) >= 1
    error_message = "private_subnet_ids: at least one."
  }
}

variable "db_nodes" {
  description = "ScyllaDB nodes, from `tiercast loadgen plan --tfvars`."
  type        = number
  validation {
    condition     = var.db_nodes >= 3 && var.db_nodes <= 200 && floor(var.db_nodes) == var.db_nodes
    error_message = "db_nodes: a whole number, 3-200 (replication factor 3 needs three nodes)."
  }
}

variable "instance_type" {
  description = "Node instance type, with local NVMe (i4i on x86_64, i4g on arm64)."
  type        = string
  default     = "i4i.2xlarge"
}

variable "architecture" {
  description = "CPU architecture of the nodes and of the image looked up: x86_64 or arm64."
  type        = string
  default     = "x86_64"
  validation {
    condition     = contains(["arm64", "x86_64"], var.architecture)
    error_message = "architecture: arm64 or x86_64."
  }
}

variable "ami_id" {
  description = "Image of the nodes. Null: the newest official ScyllaDB image matching `ami_name` of `architecture`, from `ami_owner`."
  type        = string
  default     = null
}

variable "ami_owner" {
  description = "AWS account that publishes the official ScyllaDB images."
  type        = string
  default     = "797456418907"
}

variable "ami_name" {
  description = "Name pattern of the ScyllaDB image to look up."
  type        = string
  default     = "ScyllaDB 2025.*"
}

variable "first_host" {
  description = "Host number, in each subnet, of the first node there: nodes get fixed addresses (cidrhost) so the seeds are known before they boot."
  type        = number
  default     = 50
  validation {
    condition     = var.first_host >= 4 && var.first_host <= 200
    error_message = "first_host: 4-200 (AWS keeps the first four addresses of a subnet)."
  }
}

variable "cluster_name" {
  description = "ScyllaDB cluster name. Null: the fleet's name."
  type        = string
  default     = null
}
