"""The lab's image registry (Debian's `docker-registry`, a real OCI distribution server) in
the control-plane namespace, as ECR serves EKS nodes, and a push client for the OCI image
layouts `cargo xtask image` writes. Pushes run inside the registry's namespace (its
loopback), never from the machine's own."""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path

PORT = 5000
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def config_yaml(root: Path) -> str:
    return f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: :{PORT}
"""


class PushError(RuntimeError):
    pass


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes = b"",
             headers: dict | None = None) -> http.client.HTTPResponse:
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    r.read()
    return r


def push_layout(layout: Path, repo: str, tag: str, host: str = "127.0.0.1") -> str:
    """Pushes the one image of OCI layout `layout` as repo:tag; returns its digest."""
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest_bytes = (blobs / desc["digest"].split(":", 1)[1]).read_bytes()
    manifest = json.loads(manifest_bytes)
    conn = http.client.HTTPConnection(host, PORT, timeout=60)
    for blob in [manifest["config"]] + manifest["layers"]:
        digest = blob["digest"]
        if _request(conn, "HEAD", f"/v2/{repo}/blobs/{digest}").status == 200:
            continue
        r = _request(conn, "POST", f"/v2/{repo}/blobs/uploads/")
        if r.status != 202:
            raise PushError(f"starting the upload of {digest}: HTTP {r.status}")
        location = r.getheader("Location")
        sep = "&" if "?" in location else "?"
        data = (blobs / digest.split(":", 1)[1]).read_bytes()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise PushError(f"blob {digest} does not match its digest")
        path = location.split("://", 1)[-1]
        path = path[path.index("/"):] if not location.startswith("/") else location
        r = _request(conn, "PUT", f"{path}{sep}digest={digest}", body=data,
                     headers={"Content-Type": "application/octet-stream",
                              "Content-Length": str(len(data))})
        if r.status != 201:
            raise PushError(f"uploading {digest}: HTTP {r.status}")
    r = _request(conn, "PUT", f"/v2/{repo}/manifests/{tag}", body=manifest_bytes,
                 headers={"Content-Type": MANIFEST})
    if r.status != 201:
        raise PushError(f"putting the manifest {repo}:{tag}: HTTP {r.status}")
    return desc["digest"]


def main(argv: list[str]) -> int:
    import sys
    if len(argv) != 3:
        print("usage: python -m vpclab.cluster.registry LAYOUT REPO TAG", file=sys.stderr)
        return 2
    try:
        print(push_layout(Path(argv[0]), argv[1], argv[2]))
    except (OSError, PushError) as e:
        print(f"push failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
