"""Watches a namespace's pods through the API server and prints one JSON line per change
of a pod's readiness: {"t": CLOCK_MONOTONIC seconds, "name", "ready", "ip", "node"}.
Run inside the control plane's namespace (`ip netns exec`); the monotonic clock is the
machine's, so its times compare with the caller's.

    python -m vpclab.cluster.podwatch PKI_DIR NAMESPACE
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
import time
from pathlib import Path

from .up import CP_IP


def ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions", []) or [])


def main(pki: Path, namespace: str) -> None:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    conn = http.client.HTTPSConnection(CP_IP, 6443, context=ctx, timeout=600)
    conn.request("GET", f"/api/v1/namespaces/{namespace}/pods?watch=1&timeoutSeconds=590")
    resp = conn.getresponse()
    if resp.status != 200:
        sys.exit(f"watch: HTTP {resp.status} {resp.read()[:200]!r}")
    print(json.dumps({"t": time.monotonic(), "watching": True}), flush=True)
    seen: dict[str, bool] = {}
    for line in resp:
        t = time.monotonic()
        ev = json.loads(line)
        pod = ev["object"]
        name = pod["metadata"]["name"]
        now = ev["type"] != "DELETED" and ready(pod)
        if seen.get(name) != now or ev["type"] == "DELETED":
            seen[name] = now
            print(json.dumps({"t": t, "type": ev["type"], "name": name, "ready": now,
                              "ip": pod.get("status", {}).get("podIP"),
                              "node": pod.get("spec", {}).get("nodeName")}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
