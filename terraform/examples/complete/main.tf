# A whole Tiercast fleet sized by `tiercast loadgen plan --tfvars`: edges
# behind a public UDP load balancer, stateless engines behind an internal
# one, ElastiCache for the backplane and a ScyllaDB cluster for the store.

provider "aws" {
  region = var.region
  default_tags {
    tags = merge(var.tags, { "tiercast:fleet" = var.name })
  }
}

locals {
  p = var.parameter_prefix
}

module "backplane" {
  source               = "../../modules/backplane"
  name                 = var.name
  tags                 = var.tags
  vpc_id               = var.vpc_id
  private_subnet_ids   = var.private_subnet_ids
  redis_shards         = var.redis_shards
  auth_token_parameter = "${local.p}redis_auth"
}

module "scylla" {
  source             = "../../modules/scylla"
  name               = var.name
  tags               = var.tags
  vpc_id             = var.vpc_id
  private_subnet_ids = var.private_subnet_ids
  db_nodes           = var.db_nodes
}

module "engine" {
  source                 = "../../modules/engine"
  name                   = var.name
  tags                   = var.tags
  vpc_id                 = var.vpc_id
  private_subnet_ids     = var.private_subnet_ids
  engine_count           = var.engine_count
  package_bucket         = var.package_bucket
  package_key            = var.package_key
  token_secret_parameter = "${local.p}token_secret"
  redis_auth_parameter   = "${local.p}redis_auth"
  redis_endpoint         = module.backplane.endpoint
  scylla_contact_points  = module.scylla.contact_points
}

module "edge" {
  source                    = "../../modules/edge"
  name                      = var.name
  tags                      = var.tags
  vpc_id                    = var.vpc_id
  private_subnet_ids        = var.private_subnet_ids
  public_subnet_ids         = var.public_subnet_ids
  edge_count                = var.edge_count
  edge_cores                = var.edge_cores
  edge_memory_gib           = var.edge_memory_gib
  edge_max_connections      = var.edge_max_connections
  package_bucket            = var.package_bucket
  package_key               = var.package_key
  token_secret_parameter    = "${local.p}token_secret"
  tls_certificate_parameter = "${local.p}tls_cert"
  tls_key_parameter         = "${local.p}tls_key"
  redis_auth_parameter      = "${local.p}redis_auth"
  redis_endpoint            = module.backplane.endpoint
  scylla_contact_points     = module.scylla.contact_points
}
