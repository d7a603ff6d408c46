"""The lab's Kubernetes cluster: a real control plane in a namespace on the VPC fabric and
real kubelets, containerd and kube-proxy in every node, as on EKS. See `up.py`."""
