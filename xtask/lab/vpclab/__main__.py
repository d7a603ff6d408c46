"""python3 -m vpclab {up,down,status,check,daemon}"""

from __future__ import annotations

import argparse
import json
import sys

from . import checks, client, lifecycle
from .config import ConfigError, LabConfig


def parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--agent-env {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def print_status(s: dict) -> None:
    print(f"lab {s['prefix']}: VPC {s['vpc_cidr']} ({s['vpc_id']}), subnet {s['subnet_cidr']}")
    print(f"  EC2 endpoint {s['ec2_endpoint']} (in namespace {s['ec2_namespace']}), "
          f"IMDS at 169.254.169.254 in each node, lag {s['imds_lag_seconds']}s")
    print(f"  router namespace {s['router_namespace']}, internet namespace "
          f"{s['internet_namespace']} with {s['public_test_ip']}")
    for n in s["nodes"]:
        print(f"  {n['name']}: {n['instance_id']} {n['instance_type']} netns {n['netns']} "
              f"ip {n['primary_ip']}")
        for e in n["enis"]:
            extra = e["secondary_ips"] + e["prefixes"]
            print(f"    {e['iface']} {e['id']} {e['mac']} {e['primary_ip']}"
                  + (f" + {', '.join(extra)}" if extra else ""))
    if s.get("faults"):
        print(f"  pending faults: {s['faults']}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cargo xtask lab")
    p.add_argument("--prefix", default="vpcl", help="namespace/name prefix (default vpcl)")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="bring the lab up (idempotent)")
    u.add_argument("--nodes", type=int, default=2)
    u.add_argument("--instance-type", default="m5.large")
    u.add_argument("--imds-lag", type=float, default=1.0)
    u.add_argument("--zones", type=int, default=1, help="zones the nodes are spread over (1-3)")
    u.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE")
    u.add_argument("--json", action="store_true")
    sub.add_parser("down", help="remove everything the lab made (idempotent)")
    st = sub.add_parser("status", help="nodes, ENIs, addresses, endpoints")
    st.add_argument("--json", action="store_true")
    sub.add_parser("check", help="check every path; exit 0 only if all pass")
    f = sub.add_parser("fault", help="make the next N calls of an EC2 action fail or hang")
    f.add_argument("--action", required=True, help="EC2 action, e.g. AssignPrivateIpAddresses, or *")
    f.add_argument("--code", help="EC2 error code, e.g. RequestLimitExceeded, InternalError, "
                   "UnauthorizedOperation, InsufficientFreeAddressesInSubnet")
    f.add_argument("--count", type=int, default=1)
    f.add_argument("--delay", type=float, default=0.0, help="seconds to hang before answering")
    sub.add_parser("clear-faults", help="drop every pending fault")
    sn = sub.add_parser("subnet", help="add a subnet to the VPC (prints its id)")
    sn.add_argument("--cidr", required=True)
    sn.add_argument("--az", required=True)
    sn.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    tg = sub.add_parser("tag", help="set or remove tags of an EC2 resource")
    tg.add_argument("--resource", required=True)
    tg.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    tg.add_argument("--remove", action="append", default=[], metavar="KEY")
    fe = sub.add_parser("foreign-eni", help="attach an ENI vpc-ebpf must not manage "
                        "(tagged no_manage, or trunk/efa)")
    fe.add_argument("--node", type=int, required=True)
    fe.add_argument("--device-index", type=int, required=True,
                    help="-1: create it detached (an ENI a terminated node leaked)")
    fe.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    fe.add_argument("--interface-type")
    vc = sub.add_parser("vpc-cidr", help="associate another CIDR block with the VPC")
    vc.add_argument("--cidr", required=True)
    c = sub.add_parser("cluster", help="the Kubernetes cluster on the running lab")
    c.add_argument("action", choices=["all", "up", "push", "install", "check", "bench-pods",
                                         "stop-apiserver", "start-apiserver"])
    c.add_argument("--kube-bin", help="directory of the Kubernetes binaries")
    c.add_argument("--images", help="directory of the OCI image layouts")
    c.add_argument("--tag", help="the images' tag")
    c.add_argument("--chart", help="the Helm chart's directory")
    c.add_argument("--testsrv", help="the workload's client binary, for checks from outside")
    c.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--helm-set", action="append", default=[], metavar="PATH=VALUE",
                   help="install: a chart value (helm --set)")
    c.add_argument("--pods", type=int, default=30, help="bench-pods: pods per round")
    c.add_argument("--rounds", type=int, default=3, help="bench-pods: rounds per plugin")
    c.add_argument("--json", help="bench-pods: write the results here")
    d = sub.add_parser("daemon", help=argparse.SUPPRESS)
    d.add_argument("--config", required=True)
    args = p.parse_args(argv)

    try:
        if args.cmd == "daemon":
            from . import labd
            labd.main(args.config)
            return 0
        if args.cmd == "up":
            cfg = LabConfig(prefix=args.prefix, nodes=args.nodes,
                            instance_type=args.instance_type, imds_lag=args.imds_lag,
                            zones=args.zones,
                            agent_env=parse_env(args.agent_env))
            status = lifecycle.up(cfg)
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                print_status(status)
                if "up_seconds" in status:
                    print(f"lab up in {status['up_seconds']} s")
            return 0
        if args.cmd == "down":
            for what in lifecycle.down(args.prefix):
                print(f"removed {what}")
            return 0
        cfg = LabConfig.load(LabConfig(prefix=args.prefix).run_dir / "config.json") \
            if (LabConfig(prefix=args.prefix).run_dir / "config.json").exists() else None
        if cfg is None or not client.alive(cfg.control_socket):
            print(f"lab {args.prefix} is not up: run `cargo xtask lab up`", file=sys.stderr)
            return 1
        status = client.call(cfg.control_socket, "GET", "/status")
        if args.cmd == "status":
            print(json.dumps(status, indent=2)) if args.json else print_status(status)
            return 0
        if args.cmd == "fault":
            if not args.code and not args.delay:
                raise ConfigError("fault: give --code, --delay or both")
            print(json.dumps(client.call(cfg.control_socket, "POST", "/faults", {
                "action": args.action, "code": args.code, "count": args.count,
                "delay": args.delay}), indent=2))
            return 0
        if args.cmd == "cluster":
            from .cluster import main as cluster_main
            return cluster_main.run(cfg, status, args)
        if args.cmd == "subnet":
            print(client.call(cfg.control_socket, "POST", "/subnets", {
                "cidr": args.cidr, "az": args.az, "tags": parse_env(args.tag)})["subnet_id"])
            return 0
        if args.cmd == "tag":
            client.call(cfg.control_socket, "POST", "/tags", {
                "resource": args.resource, "tags": parse_env(args.tag), "remove": args.remove})
            return 0
        if args.cmd == "foreign-eni":
            print(client.call(cfg.control_socket, "POST", "/enis", {
                "node": args.node, "device_index": args.device_index,
                "tags": parse_env(args.tag), "interface_type": args.interface_type})["eni_id"])
            return 0
        if args.cmd == "vpc-cidr":
            client.call(cfg.control_socket, "POST", "/vpc-cidrs", {"cidr": args.cidr})
            return 0
        if args.cmd == "clear-faults":
            client.call(cfg.control_socket, "DELETE", "/faults")
            return 0
        if args.cmd == "check":
            results = checks.run_checks(cfg, status)
            for name, ok, detail in results:
                print(f"{'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f": {detail}"))
            failed = sum(not ok for _, ok, _ in results)
            print(f"{len(results) - failed} passed, {failed} failed")
            return 1 if failed else 0
    except (ConfigError, lifecycle.UpError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
