"""vpc-ebpf installed into the lab cluster as an EKS user installs it: `helm install` of
`charts/vpc-ebpf`, its image from the lab's registry, the lab's EC2 endpoint and
throw-away credentials (moto accepts any) in `env:`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from . import helm
from . import up as cluster

RELEASE = "vpc-ebpf"
NAMESPACE = "kube-system"


def lab_values(cfg, tag: str, env: dict[str, str]) -> list[str]:
    sets = [f"image.repository={cluster.REGISTRY}/vpc-ebpf", f"image.tag={tag}"]
    base = {"AWS_EC2_ENDPOINT": cfg.ec2_endpoint, "AWS_ACCESS_KEY_ID": "lab",
            "AWS_SECRET_ACCESS_KEY": "lab", "AWS_REGION": cfg.region}
    for k, v in {**base, **env}.items():
        sets += [f"env.{k}={v}"]
    return sets


def helm_cmd(c: cluster.Cluster, *args: str) -> list[str]:
    return c.in_cp([str(helm.ensure()), "--kubeconfig",
                    str(c.dir / "pki" / "admin.kubeconfig"), *args])


def install(c: cluster.Cluster, chart: Path, tag: str, env: dict[str, str],
            upgrade: bool = False, timeout: int = 180, sets: list[str] = ()) -> None:
    argv = ["upgrade", "--install"] if upgrade else ["install"]
    argv += [RELEASE, str(chart), "-n", NAMESPACE]
    for s in lab_values(c.cfg, tag, env):
        argv += ["--set-string", s]
    for s in sets:
        argv += ["--set", s]
    p = subprocess.run(helm_cmd(c, *argv), capture_output=True, text=True)
    if p.returncode != 0:
        raise cluster.ClusterError(f"helm {argv[0]}: {p.stderr.strip()}")
    wait_rollout(c, timeout)


def wait_rollout(c: cluster.Cluster, timeout: int = 180) -> None:
    try:
        c.kubectl("-n", NAMESPACE, "rollout", "status", f"daemonset/{RELEASE}",
                  f"--timeout={timeout}s")
    except cluster.ClusterError as e:
        raise cluster.ClusterError(f"{e}\n{why_not_rolled_out(c)}") from None


def why_not_rolled_out(c: cluster.Cluster) -> str:
    """What a user would look at when the DaemonSet does not come up: its pods, the
    namespace's recent events and the tail of each agent's log."""
    out = []
    for args in (["get", "pods", "-o", "wide"],
                 ["get", "events", "--sort-by=.lastTimestamp"]):
        out.append(f"--- kubectl -n {NAMESPACE} {' '.join(args)}")
        out.append(c.kubectl("-n", NAMESPACE, *args, check=False)[-6000:])
    for pod in agent_pods(c):
        name = pod["metadata"]["name"]
        for container in ("vpc-ebpf-init", "vpc-ebpf"):
            out.append(f"--- logs {name} {container}")
            out.append(c.kubectl("-n", NAMESPACE, "logs", name, "-c", container,
                                 "--tail=40", check=False))
    return "\n".join(out)


def uninstall(c: cluster.Cluster) -> None:
    p = subprocess.run(helm_cmd(c, "uninstall", RELEASE, "-n", NAMESPACE),
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise cluster.ClusterError(f"helm uninstall: {p.stderr.strip()}")


def agent_pods(c: cluster.Cluster) -> list[dict]:
    return json.loads(c.kubectl("-n", NAMESPACE, "get", "pods", "-l",
                                "app.kubernetes.io/name=vpc-ebpf", "-o", "json"))["items"]
