output "quic_endpoint" {
  description = "Where devices connect (UDP)."
  value       = module.edge.quic_endpoint
}

output "api_url" {
  description = "The engines' HTTP API inside the VPC (publishers)."
  value       = module.engine.api_url
}

output "edge_instance_type" {
  description = "The edge size chosen for the plan."
  value       = module.edge.instance_type
}

output "redis_endpoint" {
  description = "The backplane's configuration endpoint."
  value       = module.backplane.endpoint
}

output "scylla_contact_points" {
  description = "The ScyllaDB nodes."
  value       = module.scylla.contact_points
}

output "engine_count" {
  description = "Engines running (desired), as planned."
  value       = module.engine.desired_count
}
