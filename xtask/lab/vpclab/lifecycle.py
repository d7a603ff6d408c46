"""`lab up` and `lab down`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import client, fabric, netns
from .config import LabConfig

LAB_DIR = Path(__file__).resolve().parent.parent
BPFFS_LAB = Path("/sys/fs/bpf")


class UpError(Exception):
    pass


def spawn(cfg: LabConfig, name: str, argv: list[str]) -> int:
    """Starts a long-running lab process in the aws namespace, detached from this one."""
    log = open(cfg.run_dir / f"{name}.log", "ab")
    env = dict(os.environ, PYTHONPATH=str(LAB_DIR), PYTHONUNBUFFERED="1")
    p = subprocess.Popen(["ip", "netns", "exec", cfg.ns("aws")] + argv, stdout=log,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                         start_new_session=True, cwd=str(LAB_DIR))
    (cfg.run_dir / f"{name}.pid").write_text(str(p.pid))
    return p.pid


def up(cfg: LabConfig, timeout: float = 60) -> dict:
    cfg.validate()
    if client.alive(cfg.control_socket):
        running = LabConfig.load(cfg.run_dir / "config.json")
        if (running.nodes, running.instance_type, running.zones) != (
                cfg.nodes, cfg.instance_type, cfg.zones):
            raise UpError(
                f"lab {cfg.prefix} is already up with {running.nodes} x {running.instance_type} "
                f"in {running.zones} zone(s); "
                f"run `cargo xtask lab down` first to change it")
        return client.call(cfg.control_socket, "GET", "/status")
    down(cfg.prefix)  # leftovers of a crashed lab
    started = time.monotonic()
    path = cfg.save()
    fabric.build_core(cfg)
    # Namespaces are made here, not by labd: `ip netns exec` gives labd a private (slave)
    # mount namespace, so bind mounts it made under /run/netns would be invisible outside.
    for i in range(1, cfg.nodes + 1):
        netns.add(cfg.node_ns(i))
    spawn(cfg, "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                        "-p", str(cfg.moto_port)])
    labd = spawn(cfg, "labd", [sys.executable, "-m", "vpclab", "daemon", "--config", str(path)])
    deadline = time.monotonic() + timeout
    while not client.alive(cfg.control_socket):
        if not _running(labd) or time.monotonic() > deadline:
            tail = (cfg.run_dir / "labd.log").read_text(errors="replace")[-3000:]
            raise UpError(f"labd did not become ready; its log ends with:\n{tail}")
        time.sleep(0.1)
    status = client.call(cfg.control_socket, "GET", "/status")
    status["up_seconds"] = round(time.monotonic() - started, 2)
    return status


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours still "exists"; reap it if it exited.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _kill(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                live.append(pid)
            except ProcessLookupError:
                pass
        if not live:
            return
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_running(p) for p in live):
            time.sleep(0.05)
        pids = [p for p in live if _running(p)]


def down(prefix: str) -> list[str]:
    """Removes every namespace, process, pinned object and file of lab `prefix`. Safe to
    run any number of times; returns what it removed."""
    cfg = LabConfig(prefix=prefix)
    removed = []
    if client.alive(cfg.control_socket):
        try:
            client.call(cfg.control_socket, "POST", "/shutdown", {}, timeout=3)
        except (OSError, RuntimeError):
            pass
    pids = []
    if cfg.run_dir.exists():
        for pidfile in cfg.run_dir.glob("*.pid"):
            try:
                pids.append(int(pidfile.read_text()))
            except ValueError:
                pass
    spaces = netns.list_with_prefix(f"{prefix}-")
    for ns in spaces:
        pids += netns.pids(ns)
    containers = _container_cgroups(cfg.run_dir)
    for cg in containers:
        pids += _cgroup_pids(cg)
    _kill(sorted(set(pids)))
    for cg in containers:
        try:
            cg.rmdir()
            removed.append(f"cgroup {cg}")
        except OSError:
            pass
    for ns in spaces:
        netns.delete(ns)
        removed.append(f"netns {ns}")
    for pinned in BPFFS_LAB.glob(f"vpc-ebpf-lab-{prefix}-*"):
        shutil.rmtree(pinned, ignore_errors=True)
        removed.append(f"bpffs {pinned}")
    for cg in _lab_cgroups(prefix):
        removed.append(f"cgroup {cg}")
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        removed.append(f"dir {cfg.run_dir}")
    return removed


def _container_cgroups(run_dir: Path) -> list[Path]:
    """The cgroups of the lab nodes' containers. containerd puts them under `/k8s.io/<id>`
    of every hierarchy (the kubelet gives no parent when it runs without QoS cgroups), out
    of the lab's own cgroup, and their processes live in pod namespaces the node's mount
    namespace hid: found by the ids in each node's containerd state, which stays readable
    on the machine."""
    ids = set()
    for tasks in run_dir.glob("nodes/*/run-containerd/io.containerd.runtime.v2.task/k8s.io"):
        ids.update(p.name for p in tasks.iterdir())
    return [cg for hierarchy in Path("/sys/fs/cgroup").iterdir() for i in sorted(ids)
            if (cg := hierarchy / "k8s.io" / i).is_dir()]


def _cgroup_pids(cg: Path) -> list[int]:
    try:
        return [int(x) for x in (cg / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _lab_cgroups(prefix: str) -> list[Path]:
    """Removes the lab cluster's node cgroups (deepest first; their processes are gone)."""
    gone = []
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        parent = hierarchy / "vpc-ebpf-lab"
        for node in parent.glob(f"{prefix}-node*") if parent.is_dir() else []:
            dirs = sorted((p for p in node.rglob("*") if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True)
            for d in dirs + [node]:
                try:
                    d.rmdir()
                except OSError:
                    pass
            if not node.exists():
                gone.append(node)
    return gone
