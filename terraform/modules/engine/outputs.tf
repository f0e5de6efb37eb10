output "api_url" {
  description = "The engines' HTTP API behind their internal load balancer: where backend publishers send."
  value       = "http://${aws_lb.api.dns_name}:${var.http_port}"
}

output "autoscaling_group_name" {
  description = "The engines' autoscaling group."
  value       = aws_autoscaling_group.engine.name
}

output "security_group_id" {
  description = "The engines' security group."
  value       = aws_security_group.engine.id
}

output "instance_role_arn" {
  description = "The engines' instance role."
  value       = aws_iam_role.engine.arn
}

output "boot_script" {
  description = "The engines' user data (it names the SSM parameters; it holds no secret)."
  value       = base64decode(aws_launch_template.engine.user_data)
}

output "desired_count" {
  description = "Engines the group keeps running."
  value       = aws_autoscaling_group.engine.desired_capacity
}
