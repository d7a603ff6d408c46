"""vpc-ebpf's local VPC lab: EC2 (moto behind an AWS-faithful front), IMDSv2 per node, and a
network fabric of namespaces standing in for ENIs and the VPC router."""
