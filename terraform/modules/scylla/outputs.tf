output "contact_points" {
  description = "CQL contact points, host:port: the engines' scylla.nodes."
  value       = [for ip in local.ips : "${ip}:9042"]
}

output "seeds" {
  description = "The nodes the others join through."
  value       = local.seeds
}

output "security_group_id" {
  description = "The nodes' security group."
  value       = aws_security_group.scylla.id
}
