"""Builds the lab's Kubernetes binaries from Debian's own `kubernetes` source package, once,
into a cache outside the clone (`~/.cache/vpc-ebpf/kubernetes/<version>/bin`).

Nothing is downloaded from anywhere but Debian's archive: the source package carries the
whole upstream tree with `vendor/`, and Debian's Go builds it in GOPATH mode. Two fixes are
applied to the tree (both documented in ../shared/DESIGN.md §9):
  1. `pkg/generated/openapi` is not in the tarball: generate it with the vendored
     openapi-gen, as upstream's `make` would;
  2. the vendored `github.com/modern-go/reflect2` 1.0.1 faults under Go >= 1.18 on the first
     custom-resource write: replace it with Debian's 1.0.2.

The version is a lab setting (`--kubernetes-version`); a newer one can replace it once its
source package (or a Go module proxy) is reachable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Upstream version -> Debian source package version that carries it.
KNOWN = {
    "1.20.2": "1.20.5+really1.20.2-1.1+deb12u1",
}
DEFAULT_VERSION = "1.20.2"
BINARIES = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
            "kube-proxy", "kubectl"]
APT_PACKAGES = ["golang-go", "golang-github-modern-go-reflect2-dev", "dpkg-dev"]


class BuildError(Exception):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("HOME", "/root")) / ".cache/vpc-ebpf/kubernetes"


def bin_dir(version: str = DEFAULT_VERSION) -> Path:
    return cache_root() / version / "bin"


def built(version: str = DEFAULT_VERSION) -> bool:
    d = bin_dir(version)
    return all((d / b).exists() for b in BINARIES) and (d / ".complete").exists()


def say(msg: str) -> None:
    print(f"[kubernetes build] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw) -> None:
    r = subprocess.run(argv, **kw)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(argv[:4])}... exited with {r.returncode}")


def apt_install(pkgs: list[str]) -> None:
    missing = [p for p in pkgs if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
    ).stdout.strip() != "install ok installed"]
    if not missing:
        return
    say(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env,
        stdout=subprocess.DEVNULL)


def mirrors() -> list[str]:
    """The Debian mirrors apt already uses (deb822 .sources and one-line lists)."""
    out: list[str] = []
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for f in files:
        if not f.is_file() or f.name.endswith(".disabled-by-farm"):
            continue
        text = f.read_text(errors="replace")
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            out.append(m.group(1))
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
            out.append(m.group(1))
    return out


def source_list(dirpath: Path) -> Path:
    """A temporary sources list with deb-src lines for bookworm and bookworm-security on the
    mirrors apt already uses."""
    ms = mirrors()
    main = next((m for m in ms if "security" not in m and "debian" in m), None)
    sec = next((m for m in ms if "security" in m), None)
    if main is None:
        raise BuildError("no Debian mirror found in /etc/apt/sources.list{,.d}; add one")
    lines = [f"deb-src {main} bookworm main"]
    if sec:
        lines.append(f"deb-src {sec} bookworm-security main")
    path = dirpath / "sources.list"
    path.write_text("\n".join(lines) + "\n")
    return path


def fetch_source(version: str, work: Path) -> Path:
    """Unpacked source tree of the Debian package for `version`."""
    deb_version = KNOWN.get(version)
    if deb_version is None:
        raise BuildError(
            f"Kubernetes {version}: no known Debian source package; known: {', '.join(KNOWN)}")
    tree = work / "tree"
    if (tree / "cmd/kube-apiserver").is_dir():
        return tree
    srcdir = work / "src"
    srcdir.mkdir(parents=True, exist_ok=True)
    if not list(srcdir.glob("*.dsc")):
        with tempfile.TemporaryDirectory() as t:
            tdir = Path(t)
            lst = source_list(tdir)
            (tdir / "lists/partial").mkdir(parents=True)
            opts = [f"-o=Dir::Etc::SourceList={lst}", "-o=Dir::Etc::SourceParts=/dev/null",
                    f"-o=Dir::State::Lists={tdir / 'lists'}"]
            say("fetching the index of Debian's source packages")
            run(["apt-get", "update", "-q", *opts], stdout=subprocess.DEVNULL)
            say(f"downloading source package kubernetes={deb_version} (~30 MB)")
            run(["apt-get", "source", "--download-only", "-q", *opts,
                 f"kubernetes={deb_version}"], cwd=srcdir, stdout=subprocess.DEVNULL)
    dsc = next(srcdir.glob("*.dsc"))
    say(f"unpacking {dsc.name}")
    shutil.rmtree(tree, ignore_errors=True)
    run(["dpkg-source", "--no-check", "-x", dsc.name, str(tree)], cwd=srcdir,
        stdout=subprocess.DEVNULL)
    return tree


def go_env(gopath: Path, cache: Path) -> dict[str, str]:
    return dict(os.environ, GOPATH=str(gopath), GO111MODULE="off", CGO_ENABLED="0",
                GOCACHE=str(cache))


def fix_reflect2(tree: Path) -> None:
    vendored = tree / "vendor/github.com/modern-go/reflect2"
    debian = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
    if not debian.is_dir():
        raise BuildError(f"{debian} is missing: install golang-github-modern-go-reflect2-dev")
    if (vendored / ".vpc-ebpf-replaced").exists():
        return
    say("replacing vendored modern-go/reflect2 1.0.1 with Debian's 1.0.2 (Go >= 1.18 fix)")
    shutil.rmtree(vendored)
    shutil.copytree(debian, vendored, symlinks=False)
    for test in vendored.rglob("*_test.go"):
        test.unlink()
    (vendored / ".vpc-ebpf-replaced").write_text("1.0.2\n")


def gen_openapi(tree: Path, env: dict[str, str], pkg_root: Path) -> None:
    out = tree / "pkg/generated/openapi/zz_generated.openapi.go"
    if out.exists():
        return
    say("generating pkg/generated/openapi (openapi-gen, not in the tarball)")
    run(["go", "build", "-o", str(pkg_root / "openapi-gen"),
         "./vendor/k8s.io/kube-openapi/cmd/openapi-gen"], cwd=pkg_root, env=env)
    # As upstream's Makefile.generated_files: every directory with a Go file that carries
    # an openapi-gen tag; staging repositories under their vendored import path.
    tagged = subprocess.run(
        ["grep", "-rl", "--include=*.go", "--exclude=*_test.go", "+k8s:openapi-gen=",
         "pkg", "cmd", "staging/src/k8s.io", "vendor"],
        cwd=tree, capture_output=True, text=True).stdout.split()
    pkgs = set()
    for f in tagged:
        d = os.path.dirname(f)
        # Upstream generates for the API, not for the code generator's examples or the
        # sample API server.
        if "/_examples/" in f or "sample-apiserver" in d or "sample-controller" in d:
            continue
        if d.startswith("staging/src/"):
            d = "vendor/" + d[len("staging/src/"):]
        pkgs.add("k8s.io/kubernetes/" + d)
    report = tree / "api/api-rules/violation_exceptions.list"
    args = [str(pkg_root / "openapi-gen"), "--logtostderr",
            "-i", ",".join(sorted(pkgs)),
            "-p", "k8s.io/kubernetes/pkg/generated/openapi",
            "-O", "zz_generated.openapi",
            "-h", str(tree / "hack/boilerplate/boilerplate.generatego.txt"),
            "-o", env["GOPATH"] + "/src",
            "-r", str(pkg_root / "violations.report")]
    run(args, cwd=pkg_root, env=env, stdout=subprocess.DEVNULL)
    if not out.exists():
        raise BuildError(f"openapi-gen did not write {out}")
    if report.exists() and (pkg_root / "violations.report").exists():
        if report.read_text() != (pkg_root / "violations.report").read_text():
            say("warning: openapi-gen's API rule report differs from upstream's exception "
                "list: the generated OpenAPI may not match upstream's")


def build(version: str = DEFAULT_VERSION, force: bool = False) -> Path:
    """Builds (once) and returns the directory holding the binaries."""
    out = bin_dir(version)
    if built(version) and not force:
        return out
    started = time.monotonic()
    apt_install(APT_PACKAGES)
    work = cache_root() / version / "work"
    work.mkdir(parents=True, exist_ok=True)
    tree = fetch_source(version, work)
    gopath = work / "gopath"
    pkg_root = gopath / "src/k8s.io/kubernetes"
    pkg_root.parent.mkdir(parents=True, exist_ok=True)
    if not pkg_root.is_symlink():
        if pkg_root.exists():
            shutil.rmtree(pkg_root)
        pkg_root.symlink_to(tree)
    env = go_env(gopath, work / "gocache")
    # Go takes the working directory from $PWD when it names the same directory, so the
    # symlinked path under GOPATH (which vendor/ resolution needs) is what it sees.
    env["PWD"] = str(pkg_root)
    fix_reflect2(tree)
    gen_openapi(tree, env, pkg_root)
    major, minor, _ = version.split(".")
    stamp = {
        "gitVersion": f"v{version}", "gitMajor": major, "gitMinor": minor,
        "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
        "gitCommit": f"debian-{KNOWN[version]}",
    }
    ldflags = ["-s", "-w"]
    for pkg in ["k8s.io/kubernetes/vendor/k8s.io/component-base/version",
                "k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version"]:
        ldflags += [f"-X {pkg}.{k}={v}" for k, v in stamp.items()]
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(BINARIES, 1):
        say(f"go build ./cmd/{name} ({i}/{len(BINARIES)}; the first takes minutes on 2 cores)")
        t = time.monotonic()
        run(["go", "build", "-o", str(out / name), "-ldflags", " ".join(ldflags),
             f"./cmd/{name}"], cwd=pkg_root, env=env)
        say(f"  {name}: {(out / name).stat().st_size // (1 << 20)} MiB in "
            f"{time.monotonic() - t:.0f} s")
    (out / ".complete").write_text(f"{version}\n")
    say(f"Kubernetes v{version} built in {time.monotonic() - started:.0f} s into {out}")
    return out


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m vpclab.kubebuild")
    p.add_argument("--version", default=DEFAULT_VERSION)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    try:
        print(build(a.version, a.force))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
