"""Network-namespace plumbing: `ip` wrappers and entering a namespace from Python."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
from http.server import ThreadingHTTPServer
from typing import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class CommandError(Exception):
    pass


def run(argv: list[str], check: bool = True, input: str | None = None) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and p.returncode != 0:
        raise CommandError(f"{' '.join(argv)}: {p.stderr.strip() or p.returncode}")
    return p.stdout


def ip(ns: str | None, *args: str, check: bool = True) -> str:
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return run(argv, check=check)


def sysctl(ns: str, key: str, value: str) -> None:
    # /proc/sys/net reflects the netns of the process that opens it, hence `ip netns exec`.
    run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])


def exists(ns: str) -> bool:
    return os.path.exists(f"/run/netns/{ns}")


def add(ns: str) -> None:
    if not exists(ns):
        run(["ip", "netns", "add", ns])
    ip(ns, "link", "set", "lo", "up")


def list_with_prefix(prefix: str) -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0].startswith(prefix)]


def pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def delete(ns: str) -> None:
    run(["ip", "netns", "del", ns], check=False)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Runs the block with the calling thread inside `ns`; sockets created there stay
    there after the block. The thread's previous namespace is restored on exit."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def bound_socket(ns: str, addr: tuple[str, int], kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A listening socket bound inside namespace `ns`."""
    with entered(ns):
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        if kind == socket.SOCK_STREAM:
            s.listen(128)
        return s


def serve_on(sock, handler, name: str) -> ThreadingHTTPServer:
    """Serves `handler` on a socket already bound (inside whichever namespace made it), on a
    daemon thread; returns the server so it can be shut down."""
    server = ThreadingHTTPServer(sock.getsockname(), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server
