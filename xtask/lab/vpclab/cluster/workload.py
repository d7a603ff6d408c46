"""The lab cluster's workload and the checks of every packet path through it, with real
Pods, Deployments and Services made with kubectl, the kubelet driving containerd driving
the plugin. What each check proves is in its name."""

from __future__ import annotations

import json
import subprocess
import time

from . import up as cluster

INTERNET = "198.51.100.10"
HOSTPORT = 30080


def manifests(node1: str, node2: str, tag: str) -> str:
    image = f"{cluster.REGISTRY}/workload:{tag}"
    ports = """
        ports:
        - {name: hello, containerPort: 8080}
        - {name: hello-udp, containerPort: 8081, protocol: UDP}
        - {name: echo, containerPort: 8082}
        - {name: http, containerPort: 8090}
        readinessProbe: {httpGet: {path: /healthz, port: http}, periodSeconds: 2}"""
    deploy = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: lab}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      terminationGracePeriodSeconds: 1
      containers:
      - name: srv
        image: {image}{ports}
"""
    service = """
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: lab}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: hello, port: 80, targetPort: hello}}]
"""
    docs = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: lab, labels: {kubernetes.io/metadata.name: lab}}\n",
        # Ten pods on node1: more than its primary ENI holds (9 on m5.large), so the agent
        # attaches a second ENI and some pods get its addresses.
        deploy.format(name="web-a", replicas=10, node=node1, image=image, ports=ports),
        deploy.format(name="web-b", replicas=1, node=node2, image=image, ports=ports),
        service.format(name="web-a"),
        service.format(name="web-b"),
        f"""
apiVersion: v1
kind: Pod
metadata: {{name: hostport, namespace: lab, labels: {{app: hostport}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {node2}}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: srv
    image: {image}
    ports:
    - {{name: hello, containerPort: 8080, hostPort: {HOSTPORT}}}
    - {{name: http, containerPort: 8090}}
    readinessProbe: {{httpGet: {{path: /healthz, port: http}}, periodSeconds: 2}}
""",
    ]
    return "---".join(docs)


class Checks:
    def __init__(self, c: cluster.Cluster, status: dict, testsrv: str):
        self.c = c
        self.status = status
        self.testsrv = testsrv
        self.results: list[tuple[str, bool, str]] = []

    def pods(self, app: str) -> list[dict]:
        out = json.loads(self.c.kubectl("-n", "lab", "get", "pods", "-l", f"app={app}",
                                        "-o", "json"))
        return out["items"]

    def exec(self, pod: str, *argv: str) -> tuple[bool, str]:
        p = subprocess.run(self.c.in_cp([str(self.c.bin / "kubectl"), "--kubeconfig",
                                         str(self.c.dir / "pki" / "admin.kubeconfig"),
                                         "-n", "lab", "exec", pod, "--", *argv]),
                           capture_output=True, text=True, timeout=60)
        return p.returncode == 0, (p.stdout + p.stderr).strip()

    def hello(self, pod: str, addr: str, kind: str = "tcp") -> str | None:
        ok, out = self.exec(pod, "vpc-ebpf-testsrv", kind, addr)
        if not ok:
            return None
        try:
            return json.loads(out.splitlines()[-1]).get("answer")
        except (ValueError, IndexError):
            return None

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok, detail))
        print(f"  {'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""),
              flush=True)
        return ok

    def node_sh(self, node: cluster.NodeInfo, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", node.netns, *argv],
                              capture_output=True, text=True).stdout

    def forward_count(self, node: cluster.NodeInfo) -> int:
        out = self.node_sh(node, "iptables", "-L", "FORWARD", "-v", "-n", "-x")
        for line in out.splitlines():
            if "vpc-ebpf-lab-count" in line:
                return int(line.split()[0])
        raise cluster.ClusterError(f"no counting rule on {node.name}")

    def run(self, nodes: list[cluster.NodeInfo]) -> list[tuple[str, bool, str]]:
        n1, n2 = nodes[0], nodes[1]
        a = self.pods("web-a")
        b = self.pods("web-b")[0]
        hp = self.pods("hostport")[0]
        a0, a1 = a[0]["metadata"]["name"], a[1]["metadata"]["name"]
        ip = lambda p: p["status"]["podIP"]  # noqa: E731
        ready = lambda p: any(c["type"] == "Ready" and c["status"] == "True"  # noqa: E731
                              for c in p["status"].get("conditions", []))
        self.check("every pod Ready through its kubelet HTTP readiness probe (node -> pod)",
                   all(ready(p) for p in a + [b, hp]))
        # Which addresses are on node1's secondary ENI, as EC2 has them now.
        from .. import client
        self.status = client.call(self.c.cfg.control_socket, "GET", "/status")
        node1 = next(n for n in self.status["nodes"] if n["netns"] == n1.netns)
        secondary = {addr for e in node1["enis"] if e["iface"] != "eth0"
                     for addr in e["secondary_ips"]}
        on_secondary = [p for p in a if ip(p) in secondary]
        self.check("pods on node1's secondary ENI (the agent attached it)", bool(on_secondary),
                   f"{len(on_secondary)} of {len(a)}")

        for line in self.node_sh(n1, "iptables", "-S", "FORWARD").splitlines():
            if "vpc-ebpf-lab-count" in line:
                break
        else:
            self.node_sh(n1, "iptables", "-I", "FORWARD", "1", "-m", "comment", "--comment",
                         "vpc-ebpf-lab-count")
        before = self.forward_count(n1)
        got = self.hello(a0, f"{ip(a[1])}:8080")
        self.check("pod -> pod, same node (the server sees the pod's own address)",
                   got == f"hello from {ip(a[0])}", str(got))
        self.check("same-node pod traffic skips the node's FORWARD chain",
                   self.forward_count(n1) == before, f"{self.forward_count(n1) - before} packets")
        got = self.hello(a0, f"{ip(b)}:8080")
        self.check("pod -> pod, across nodes (through the VPC router)",
                   got == f"hello from {ip(a[0])}", str(got))
        got = self.hello(a0, f"{ip(b)}:8081", "udp")
        self.check("pod -> pod UDP, across nodes", got == f"hello from {ip(a[0])}", str(got))
        if on_secondary:
            s = on_secondary[0]
            got = self.hello(s["metadata"]["name"], f"{ip(b)}:8080")
            self.check("secondary-ENI pod -> other node (leaves by its own ENI)",
                       got == f"hello from {ip(s)}", str(got))
            got = self.hello(b["metadata"]["name"], f"{ip(s)}:8080")
            self.check("other node -> secondary-ENI pod",
                       got == f"hello from {ip(b)}", str(got))
            ok, out = self.exec(s["metadata"]["name"], "ping", "-c", "2", "-W", "2", INTERNET)
            self.check("secondary-ENI pod -> internet through SNAT", ok, out.splitlines()[-1])
        ok, out = self.exec(a0, "ping", "-c", "2", "-W", "2", INTERNET)
        self.check("pod -> internet through SNAT (the internet answers only node addresses)",
                   ok, out.splitlines()[-1] if out else "")
        svc_a = self.c.kubectl("-n", "lab", "get", "svc", "web-a", "-o",
                               "jsonpath={.spec.clusterIP}")
        svc_b = self.c.kubectl("-n", "lab", "get", "svc", "web-b", "-o",
                               "jsonpath={.spec.clusterIP}")
        got = self.hello(b["metadata"]["name"], f"{svc_a}:80")
        self.check("pod -> ClusterIP -> backend on another node (the real kube-proxy)",
                   got == f"hello from {ip(b)}", str(got))
        got = self.hello(a0, f"{svc_b}:80")
        self.check("pod -> ClusterIP -> backend on another node, from node1",
                   got == f"hello from {ip(a[0])}", str(got))
        got = self.hello(a1, f"{svc_a}:80")
        self.check("pod -> ClusterIP -> a backend on the same node",
                   bool(got and got.startswith("hello from")), str(got))
        got = self.hello(a0, f"{n2.primary_ip}:{HOSTPORT}")
        self.check(f"hostPort {HOSTPORT} from a pod on another node",
                   bool(got and got.startswith("hello from")), str(got))
        p = subprocess.run(["ip", "netns", "exec", self.c.cfg.ns("inet"), self.testsrv, "tcp",
                            f"{n2.primary_ip}:{HOSTPORT}"], capture_output=True, text=True)
        got = json.loads(p.stdout.splitlines()[-1]).get("answer") if p.stdout else None
        self.check(f"hostPort {HOSTPORT} from the internet (the pod sees the client)",
                   got == f"hello from {self.c.cfg.inet_link_inet}", str(got))
        ok, neigh = self.exec(a0, "ip", "neigh", "show", "169.254.1.1")
        self.check("no static ARP in pods: the dataplane answers for 169.254.1.1",
                   ok and "PERMANENT" not in neigh, neigh)
        ours = [line for n in nodes for line in self.node_sh(n, "iptables-save").splitlines()
                if line.startswith(("-A", ":")) and "KUBE-" not in line
                and "vpc-ebpf-lab-count" not in line
                and not line.startswith((":INPUT", ":OUTPUT", ":FORWARD", ":PREROUTING",
                                         ":POSTROUTING"))]
        self.check("no netfilter rules of ours on the nodes (only kube-proxy's)", not ours,
                   "; ".join(ours[:3]))
        return self.results


PODS = 12


def deploy(c: cluster.Cluster, nodes: list[cluster.NodeInfo], tag: str,
           timeout: float = 180) -> float:
    """Applies the workload and waits until its pods are Ready; how long that took."""
    t0 = time.monotonic()
    c.kubectl("apply", "-f", "-", input=manifests(nodes[0].name, nodes[1].name, tag))

    def all_ready() -> bool:
        items = json.loads(c.kubectl("-n", "lab", "get", "pods", "-o", "json"))["items"]
        return len(items) == PODS and all(
            any(k["type"] == "Ready" and k["status"] == "True"
                for k in p["status"].get("conditions", [])) for p in items)
    c.wait(f"the {PODS} workload pods Ready", all_ready, timeout=timeout, every=1)
    return time.monotonic() - t0
