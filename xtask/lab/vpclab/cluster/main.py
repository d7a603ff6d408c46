"""`python -m vpclab cluster ...`: the cluster steps over a running lab, and `all`, which
`cargo xtask lab` runs: cluster up, vpc-ebpf installed with helm, the workload deployed,
every packet path checked."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import LabConfig
from . import benchpods, install, workload
from . import up as cluster


def nodes_of(status: dict) -> list[cluster.NodeInfo]:
    return [cluster.NodeInfo(i + 1, n["netns"], n["instance_id"], n["primary_ip"])
            for i, n in enumerate(status["nodes"])]


def images_in(d: str) -> dict[str, Path]:
    return {p.name: p for p in sorted(Path(d).iterdir()) if (p / "index.json").exists()}


def parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise cluster.ClusterError(f"--agent-env {item!r}: expected KEY=VALUE")
        out[k] = v
    return out


# The lab's agent settings: enough addresses on node1 for ten pods and a second ENI.
LAB_ENV = {"WARM_IP_TARGET": "2", "MINIMUM_IP_TARGET": "12"}


def run(cfg: LabConfig, status: dict, args) -> int:
    c = cluster.Cluster(cfg, Path(args.kube_bin))
    nodes = nodes_of(status)
    env = {**LAB_ENV, **parse_env(args.agent_env)}
    if args.action == "up":
        out = c.up(nodes, images_in(args.images), args.tag, cluster.max_pods_for(3, 10))
        print(json.dumps(out, indent=2))
        return 0
    if args.action == "push":
        c.images_tag = args.tag
        for name, layout in images_in(args.images).items():
            print(f"{cluster.REGISTRY}/{name}:{args.tag} {c.push(layout, name, args.tag)}")
        return 0
    if args.action == "install":
        install.install(c, Path(args.chart), args.tag, env, upgrade=True, sets=args.helm_set)
        return 0
    if args.action == "stop-apiserver":
        c.stop("kube-apiserver")
        return 0
    if args.action == "start-apiserver":
        c.start_apiserver()
        return 0
    if args.action == "bench-pods":
        up = c.up(nodes, images_in(args.images), args.tag, cluster.max_pods_for(3, 10))
        print(f"cluster up in {up['up_seconds']} s", flush=True)
        # The chart's defaults: what a user's install runs.
        install.install(c, Path(args.chart), args.tag, parse_env(args.agent_env), upgrade=True)
        out = benchpods.run(c, nodes, args.tag, args.pods, args.rounds)
        benchpods.report(out)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
            print(f"  results: {args.json}")
        return 0
    if args.action == "check":
        print("checking the packet paths through the cluster's pods and services:")
        results = workload.Checks(c, status, args.testsrv).run(nodes)
        failed = sum(not ok for _, ok, _ in results)
        print(f"{len(results) - failed} of {len(results)} paths work")
        return 1 if failed else 0
    # all
    t0 = time.monotonic()
    up = c.up(nodes, images_in(args.images), args.tag, cluster.max_pods_for(3, 10))
    print(f"cluster up in {up['up_seconds']} s: API server {up['api_server']}, "
          f"registry {up['registry']}, nodes {', '.join(up['nodes'])}")
    t1 = time.monotonic()
    install.install(c, Path(args.chart), args.tag, env)
    print(f"helm install vpc-ebpf: DaemonSet rolled out on {len(nodes)} nodes in "
          f"{time.monotonic() - t1:.1f} s")
    took = workload.deploy(c, nodes, args.tag)
    print(f"workload: {workload.PODS} pods Ready in {took:.1f} s "
          "(10 on node1, beyond its primary ENI; 1 on node2; 1 with a hostPort)")
    print("\nchecking the packet paths through the cluster's pods and services:")
    results = workload.Checks(c, status, args.testsrv).run(nodes)
    failed = sum(not ok for _, ok, _ in results)
    print(f"\n{len(results) - failed} of {len(results)} paths work "
          f"({time.monotonic() - t0:.0f} s from a bare lab)")
    return 1 if failed else 0
