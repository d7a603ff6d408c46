"""`lab up` is quick and `lab down` leaves nothing behind, however often it runs."""

from __future__ import annotations

import os

from vpclab import client, lifecycle, netns
from vpclab.config import LabConfig


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read()
    return stat.split(")")[-1].split()[0] != "Z"


def test_up_then_down_leaves_nothing(tmp_path):
    assert os.geteuid() == 0, "needs root (network namespaces)"
    cfg = LabConfig(prefix=f"vd{os.getpid() % 100000}", nodes=1)
    try:
        status = lifecycle.up(cfg)
        assert status["up_seconds"] < 20
        again = lifecycle.up(cfg)  # idempotent: the running lab answers
        assert again["nodes"][0]["instance_id"] == status["nodes"][0]["instance_id"]
        pids = [int(p.read_text()) for p in cfg.run_dir.glob("*.pid")]
        pids += [p for ns in netns.list_with_prefix(f"{cfg.prefix}-") for p in netns.pids(ns)]
        assert len(pids) >= 2  # moto and labd at least
    finally:
        removed = lifecycle.down(cfg.prefix)
    assert any(r.startswith("netns") for r in removed)
    assert netns.list_with_prefix(f"{cfg.prefix}-") == []
    assert not [p for p in pids if running(p)], "a lab process survived down"
    assert not cfg.run_dir.exists()
    assert not client.alive(cfg.control_socket)
    assert lifecycle.down(cfg.prefix) == []
