output "quic_endpoint" {
  value = "${aws_lb.quic.dns_name}:443"
}

output "redis_configuration_endpoint" {
  value = local.redis_config_endpoint
}

output "engine_private_ips" {
  value = aws_instance.engine[*].private_ip
}

output "edge_count" {
  value = var.edge_count
}
