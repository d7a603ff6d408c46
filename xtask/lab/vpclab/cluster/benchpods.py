"""`cargo xtask bench pods`: pod start on the lab cluster, vpc-ebpf against Debian's
reference plugins (`bridge` + `host-local`) on the same cluster in the same run.

A round applies one Deployment of N pods (spread over the nodes, a TCP readiness probe
the kubelet runs) and times, per pod, `kubectl apply` → the API server reporting the pod
Ready, through a watch (no polling). Rounds alternate the plugins, and which goes first,
so neither gets the warmer machine. The reference plugins are switched in by writing a
conflist that sorts before vpc-ebpf's into each node's CNI config directory (containerd
uses the first); a round starts only once the previous round's sandboxes are all gone, so
every DEL goes to the plugin that did the ADD. vpc-ebpf runs as installed by the chart,
with its defaults (WARM_ENI_TARGET=1)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import up as cluster

NAMESPACE = "bench"
BRIDGE_CONF = "05-bench-bridge.conflist"


def deployment(pods: int, tag: str) -> str:
    return f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: start, namespace: {NAMESPACE}}}
spec:
  replicas: {pods}
  selector: {{matchLabels: {{app: start}}}}
  template:
    metadata: {{labels: {{app: start}}}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule,
          labelSelector: {{matchLabels: {{app: start}}}}}}
      containers:
      - name: srv
        image: {cluster.REGISTRY}/workload:{tag}
        ports: [{{name: hello, containerPort: 8080}}]
        readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
"""


def bridge_conflist(node: cluster.NodeInfo) -> str:
    return json.dumps({
        "cniVersion": "0.4.0",
        "name": "bench-bridge",
        "plugins": [{
            "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True,
            "hairpinMode": True,
            "ipam": {"type": "host-local",
                     "ranges": [[{"subnet": f"10.244.{node.index}.0/24"}]],
                     "routes": [{"dst": "0.0.0.0/0"}]},
        }],
    }, indent=2)


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


class Bench:
    def __init__(self, c: cluster.Cluster, nodes: list[cluster.NodeInfo], tag: str,
                 pods: int):
        self.c, self.nodes, self.tag, self.pods = c, nodes, tag, pods
        # The nodes' own veths (their ENIs on the lab's fabric) stay.
        self.baseline = self.sandboxes()

    def prepull(self) -> None:
        """The workload image on every node before any round: an image pull would
        otherwise land in whichever round comes first."""
        image = f"{cluster.REGISTRY}/workload:{self.tag}"
        for n in self.nodes:
            p = subprocess.run(self.c.in_node(n, ["ctr", "-n", "k8s.io", "images", "pull",
                                                  "--plain-http", image]),
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise cluster.ClusterError(f"pulling {image} on {n.name}: {p.stderr.strip()}")

    def use(self, plugin: str) -> None:
        for n in self.nodes:
            d = self.c.node_dir(n)
            conf = d / "etc-cni-net.d" / BRIDGE_CONF
            if plugin == "bridge":
                for b in ("bridge", "host-local"):
                    dst = d / "opt-cni-bin" / b
                    if not dst.exists():
                        shutil.copy2(f"/usr/lib/cni/{b}", dst)
                conf.write_text(bridge_conflist(n))
            else:
                conf.unlink(missing_ok=True)
        # containerd reloads its CNI config on the directory's change.
        time.sleep(2)

    def sandboxes(self) -> int:
        """Veths on all nodes: the pods' host sides (bridge's and vpc-ebpf's alike) and
        the nodes' own."""
        total = 0
        for n in self.nodes:
            out = subprocess.run(["ip", "-n", n.netns, "-o", "link", "show", "type", "veth"],
                                 capture_output=True, text=True).stdout
            total += len(out.splitlines())
        return total

    def round(self, plugin: str) -> dict:
        self.use(plugin)
        watch = subprocess.Popen(
            self.c.in_cp([sys.executable, "-m", "vpclab.cluster.podwatch",
                          str(self.c.dir / "pki"), NAMESPACE]),
            stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        try:
            first = json.loads(watch.stdout.readline() or "{}")
            if not first.get("watching"):
                raise cluster.ClusterError("the pod watch did not start")
            t0 = time.monotonic()
            self.c.kubectl("apply", "-f", "-", input=deployment(self.pods, self.tag))
            ready: dict[str, float] = {}
            ips: dict[str, str] = {}
            deadline = t0 + 300
            while len(ready) < self.pods:
                line = watch.stdout.readline()
                if not line or time.monotonic() > deadline:
                    raise cluster.ClusterError(
                        f"{plugin}: {len(ready)} of {self.pods} pods Ready in 300 s")
                ev = json.loads(line)
                if ev.get("ready") and ev["name"] not in ready:
                    ready[ev["name"]] = ev["t"] - t0
                    ips[ev["name"]] = ev["ip"] or ""
            want = "10.244." if plugin == "bridge" else "10.0."
            wrong = [ip for ip in ips.values() if not ip.startswith(want)]
            if wrong:
                raise cluster.ClusterError(f"{plugin} round: pods got {wrong}, not {want}x")
            self.c.kubectl("-n", NAMESPACE, "delete", "deployment", "start", "--wait=true")
            self.c.wait("the round's pods gone",
                        lambda: not json.loads(self.c.kubectl(
                            "-n", NAMESPACE, "get", "pods", "-o", "json"))["items"],
                        timeout=120)
            self.c.wait("the round's sandboxes torn down", lambda: self.sandboxes() == self.baseline,
                        timeout=120)
        finally:
            watch.kill()
            watch.wait()
        times = sorted(ready.values())
        return {"plugin": plugin, "starts": times, "all_ready": times[-1]}

    def agent_memory(self) -> dict:
        """Each node's agent: the process in that node's network namespace."""
        out = {}
        pids = subprocess.run(["pgrep", "-x", "vpc-ebpf-agent"], capture_output=True,
                              text=True).stdout.split()
        for n in self.nodes:
            netns = os.stat(f"/run/netns/{n.netns}").st_ino
            mine = [p for p in pids if os.stat(f"/proc/{p}/ns/net").st_ino == netns]
            if not mine:
                continue
            status = Path(f"/proc/{mine[0]}/status").read_text()
            kib = {k: int(v.split()[0]) for k, v in
                   (line.split(":", 1) for line in status.splitlines())
                   if k in ("VmRSS", "VmHWM")}
            out[n.name] = {"rss_mib": round(kib["VmRSS"] / 1024, 1),
                           "peak_rss_mib": round(kib["VmHWM"] / 1024, 1)}
        return out


def run(c: cluster.Cluster, nodes: list[cluster.NodeInfo], tag: str, pods: int,
        rounds: int) -> dict:
    b = Bench(c, nodes, tag, pods)
    b.prepull()
    results = []
    for r in range(rounds):
        order = ["vpc-ebpf", "bridge"] if r % 2 == 0 else ["bridge", "vpc-ebpf"]
        for plugin in order:
            res = b.round(plugin)
            results.append(res)
            print(f"round {r + 1} {plugin:9}: {pods} pods Ready, p50 "
                  f"{percentile(res['starts'], 50):.2f} s, last {res['all_ready']:.2f} s",
                  flush=True)
    b.use("vpc-ebpf")
    summary = {}
    # vpc-ebpf's first round starts from a fresh node's pool (the primary ENI's
    # addresses; an ENI attached during the round): said apart as well.
    for plugin, skip in (("vpc-ebpf", 0), ("bridge", 0), ("vpc-ebpf warm", 1)):
        name = plugin.split()[0]
        mine = [res for res in results if res["plugin"] == name][skip:]
        if not mine:
            continue
        starts = [t for res in mine for t in res["starts"]]
        summary[plugin] = {
            "pods": len(starts),
            "p50_s": round(percentile(starts, 50), 3),
            "p99_s": round(percentile(starts, 99), 3),
            "mean_s": round(statistics.fmean(starts), 3),
            "all_ready_median_s": round(statistics.median(res["all_ready"] for res in mine), 3),
        }
    memory = b.agent_memory()
    return {"pods_per_round": pods, "rounds": rounds, "summary": summary,
            "agent_memory": memory, "rounds_detail": results}


def report(out: dict) -> None:
    s = out["summary"]
    print(f"\npod start, kubectl apply → Ready ({out['pods_per_round']} pods × "
          f"{out['rounds']} rounds per plugin, same cluster, alternating):")
    print(f"  {'plugin':24} {'p50':>7} {'p99':>7} {'mean':>7} {'all Ready (median)':>19}")
    for plugin, label in (("vpc-ebpf", "vpc-ebpf"),
                          ("vpc-ebpf warm", "vpc-ebpf, 1st round out"),
                          ("bridge", "bridge + host-local")):
        if plugin not in s:
            continue
        r = s[plugin]
        print(f"  {label:24} {r['p50_s']:6.2f}s {r['p99_s']:6.2f}s {r['mean_s']:6.2f}s "
              f"{r['all_ready_median_s']:18.2f}s")
    for plugin in ("vpc-ebpf", "vpc-ebpf warm"):
        if plugin not in s:
            continue
        for q in ("p50_s", "p99_s"):
            ratio = s[plugin][q] / s["bridge"][q]
            verdict = "meets" if ratio <= 1.05 else "misses"
            print(f"  {plugin} {q[:3]} / reference {q[:3]} = {ratio:.3f} ({verdict} the goal: "
                  "no slower, within 5 % noise)")
    for node, m in out["agent_memory"].items():
        goal = "meets" if m["peak_rss_mib"] < 60 else "misses"
        print(f"  agent on {node}: RSS {m['rss_mib']} MiB, peak {m['peak_rss_mib']} MiB "
              f"({goal} the < 60 MiB goal)")
