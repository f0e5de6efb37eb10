output "endpoint" {
  description = "The cluster's configuration endpoint, host:port: backplane.redis.nodes (with TLS and the AUTH token)."
  value       = "${aws_elasticache_replication_group.redis.configuration_endpoint_address}:6379"
}

output "security_group_id" {
  description = "The backplane's security group."
  value       = aws_security_group.redis.id
}
