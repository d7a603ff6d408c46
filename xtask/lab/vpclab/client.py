"""Talking to labd's control socket (HTTP over a unix socket: no network path needed)."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 10):
        super().__init__("labd", timeout=timeout)
        self.path = str(path)

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def call(sock: Path, method: str, path: str, body: dict | None = None,
         timeout: float = 10) -> dict:
    conn = UnixHTTPConnection(sock, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        out = json.loads(r.read() or b"{}")
        if r.status != 200:
            raise RuntimeError(f"labd {method} {path}: {r.status} {out}")
        return out
    finally:
        conn.close()


def alive(sock: Path) -> bool:
    try:
        call(sock, "GET", "/status", timeout=2)
        return True
    except (OSError, RuntimeError, json.JSONDecodeError):
        return False
