output "quic_endpoint" {
  description = "Where devices connect: the load balancer's name and UDP port."
  value       = "${aws_lb.quic.dns_name}:${var.public_port}"
}

output "load_balancer_arn" {
  description = "The internet-facing UDP load balancer."
  value       = aws_lb.quic.arn
}

output "autoscaling_group_name" {
  description = "The edges' autoscaling group (start an instance refresh on it to roll a new image)."
  value       = aws_autoscaling_group.edge.name
}

output "instance_type" {
  description = "The size chosen for the plan's cores and memory."
  value       = local.instance_type
}

output "security_group_id" {
  description = "The edges' security group."
  value       = aws_security_group.edge.id
}

output "instance_role_arn" {
  description = "The edges' instance role."
  value       = aws_iam_role.edge.arn
}

output "boot_script" {
  description = "The edges' user data (it names the SSM parameters; it holds no secret)."
  value       = base64decode(aws_launch_template.edge.user_data)
}
