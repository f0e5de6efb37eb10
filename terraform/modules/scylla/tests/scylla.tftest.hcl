# The ScyllaDB module alone, with a mocked AWS provider.
#   terraform test   (in terraform/modules/scylla)

mock_provider "aws" {
  mock_data "aws_vpc" {
    defaults = { cidr_block = "10.0.0.0/16" }
  }
  mock_data "aws_ami" {
    defaults = { id = "ami-0123456789abcdef0" }
  }
}

override_data {
  target = data.aws_subnet.node[0]
  values = { cidr_block = "10.0.1.0/24" }
}

override_data {
  target = data.aws_subnet.node[1]
  values = { cidr_block = "10.0.2.0/24" }
}

override_data {
  target = data.aws_subnet.node[2]
  values = { cidr_block = "10.0.3.0/24" }
}

variables {
  name               = "tiercast"
  vpc_id             = "vpc-0123456789abcdef0"
  private_subnet_ids = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2", "subnet-0aaaaaaaaaaaaaaa3"]
  db_nodes           = 5
}

run "one_cluster_with_known_seeds_across_the_zones" {
  command = apply
  assert {
    condition     = output.contact_points == ["10.0.1.50:9042", "10.0.2.50:9042", "10.0.3.50:9042", "10.0.1.51:9042", "10.0.2.51:9042"]
    error_message = "nodes take fixed addresses, spread over the zones in turn: ${jsonencode(output.contact_points)}"
  }
  assert {
    condition     = output.seeds == ["10.0.1.50", "10.0.2.50", "10.0.3.50"]
    error_message = "the first three nodes are the seeds"
  }
  assert {
    condition = alltrue([
      for n in aws_instance.node :
      jsondecode(n.user_data).scylla_yaml.seed_provider[0].parameters[0].seeds == "10.0.1.50,10.0.2.50,10.0.3.50" &&
      jsondecode(n.user_data).scylla_yaml.cluster_name == "tiercast"
    ])
    error_message = "every node is configured into the same cluster"
  }
  assert {
    condition     = alltrue([for n in aws_instance.node : n.iam_instance_profile == aws_iam_instance_profile.node.name])
    error_message = "every node has an instance profile"
  }
}

run "fewer_than_three_nodes_are_refused" {
  command = plan
  variables {
    db_nodes = 2
  }
  expect_failures = [var.db_nodes]
}
