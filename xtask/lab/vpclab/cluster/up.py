"""Brings a real Kubernetes cluster up on the lab's VPC, as EKS runs one:

- a control-plane namespace `<prefix>-cp` on the fabric (10.0.254.10, routed by the VPC
  router as EKS's control-plane ENIs are in the VPC) running etcd, kube-apiserver (TLS,
  RBAC and the Node authorizer, no insecure port), kube-controller-manager,
  kube-scheduler, and the image registry the nodes pull from (as ECR serves EKS nodes);
- in every node namespace, a node: its own mount namespace (so the node's /etc/cni/net.d,
  /opt/cni/bin, /var/lib/kubelet, /run/vpc-ebpf, bpffs... are its own, as on a separate
  machine), containerd, kubelet registered under the node's primary ENI address with
  EKS's naming, and kube-proxy in iptables mode.

Processes are detached and recorded in the lab's run dir, so `lab down` removes them with
the rest. Everything runs in the lab's namespaces; the machine's own is never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import netns
from ..config import LabConfig
from . import pki, registry

CP_IP = "10.0.254.10"
CP_GW = "10.0.254.1"
CP_NET_LEN = 24
SERVICE_CIDR = "172.20.0.0/16"
KUBERNETES_SVC_IP = "172.20.0.1"
REGISTRY = f"{CP_IP}:{registry.PORT}"
CLUSTER_NAME = "vpc-ebpf-lab"
CGROUP_PARENT = "vpc-ebpf-lab"

# What each node gets of its own, bind-mounted over the machine's path in the node's mount
# namespace: (path on the node, directory name under the node's run dir).
NODE_PATHS = [
    ("/etc/cni/net.d", "etc-cni-net.d"),
    ("/opt/cni/bin", "opt-cni-bin"),
    ("/var/lib/kubelet", "var-lib-kubelet"),
    ("/var/log/pods", "var-log-pods"),
    ("/var/log/containers", "var-log-containers"),
    ("/var/lib/containerd", "var-lib-containerd"),
    ("/run/containerd", "run-containerd"),
    ("/run/vpc-ebpf", "run-vpc-ebpf"),
    ("/var/log/vpc-ebpf", "var-log-vpc-ebpf"),
    ("/etc/kubernetes", "etc-kubernetes"),
    # containerd's pod netns: private to the node, so a run that dies leaves none in
    # the machine's `ip netns list` (they go when the node's mount namespace goes).
    ("/run/netns", "run-netns"),
]


class ClusterError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


@dataclass
class NodeInfo:
    index: int
    netns: str
    instance_id: str
    primary_ip: str

    @property
    def name(self) -> str:
        # EKS names nodes after their private DNS name.
        return f"ip-{self.primary_ip.replace('.', '-')}.us-west-2.compute.internal"


class Cluster:
    def __init__(self, cfg: LabConfig, bin_dir: Path):
        self.cfg = cfg
        self.bin = bin_dir
        self.dir = cfg.run_dir / "cluster"
        self.pki = pki.Pki(self.dir / "pki")
        self.cp_ns = cfg.ns("cp")

    # -- processes --------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], log: Path | None = None,
               env: dict | None = None) -> int:
        log = log or (self.dir / "logs" / f"{name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             env=dict(os.environ, **(env or {})))
        (self.cfg.run_dir / f"{name}.pid").write_text(str(p.pid))
        return p.pid

    def in_cp(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.cp_ns] + argv

    def in_node(self, node: NodeInfo, argv: list[str]) -> list[str]:
        holder = int((self.cfg.run_dir / f"node{node.index}-holder.pid").read_text())
        return ["nsenter", f"--net=/run/netns/{node.netns}", f"--mount=/proc/{holder}/ns/mnt",
                "--"] + argv

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        argv = self.in_cp([str(self.bin / "kubectl"), "--kubeconfig",
                           str(self.dir / "pki" / "admin.kubeconfig"), *args])
        p = subprocess.run(argv, capture_output=True, text=True, input=input)
        if check and p.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def wait(self, what: str, ok, timeout: float = 60, every: float = 0.5) -> float:
        t0 = time.monotonic()
        while True:
            try:
                if ok():
                    return time.monotonic() - t0
            except (ClusterError, OSError, subprocess.SubprocessError):
                pass
            if time.monotonic() - t0 > timeout:
                raise ClusterError(f"{what}: not within {timeout:.0f} s; logs in {self.dir / 'logs'}")
            time.sleep(every)

    # -- control plane ----------------------------------------------------------------

    def build_cp_network(self) -> None:
        vpc, cp = self.cfg.ns("vpc"), self.cp_ns
        netns.add(cp)
        if "cp0" not in netns.ip(vpc, "-o", "link", "show", check=False):
            netns.ip(vpc, "link", "add", "cp0", "type", "veth", "peer", "name", "eth0",
                     "netns", cp)
            netns.ip(vpc, "addr", "add", f"{CP_GW}/{CP_NET_LEN}", "dev", "cp0")
            netns.ip(vpc, "link", "set", "cp0", "up")
            netns.ip(cp, "addr", "add", f"{CP_IP}/{CP_NET_LEN}", "dev", "eth0")
            netns.ip(cp, "link", "set", "eth0", "up")
            netns.ip(cp, "route", "add", "default", "via", CP_GW)

    def make_pki(self, nodes: list[NodeInfo]) -> None:
        p = self.pki
        p.ensure_ca()
        p.ensure_service_account_key()
        p.issue("apiserver", "kube-apiserver",
                server_names=["kubernetes", "kubernetes.default", "kubernetes.default.svc",
                              "kubernetes.default.svc.cluster.local", "localhost"],
                server_ips=[CP_IP, KUBERNETES_SVC_IP, "127.0.0.1"], client=False)
        p.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                ["system:masters"])
        p.issue("admin", "kubernetes-admin", ["system:masters"])
        p.issue("controller-manager", "system:kube-controller-manager")
        p.issue("scheduler", "system:kube-scheduler")
        p.issue("kube-proxy", "system:kube-proxy", ["system:node-proxier"])
        server = f"https://{CP_IP}:6443"
        for name, user in [("admin", "kubernetes-admin"),
                           ("controller-manager", "system:kube-controller-manager"),
                           ("scheduler", "system:kube-scheduler"),
                           ("kube-proxy", "system:kube-proxy")]:
            p.kubeconfig(name, server, user)
        for n in nodes:
            p.issue(f"kubelet-{n.index}", f"system:node:{n.name}", ["system:nodes"],
                    server_names=[n.name], server_ips=[n.primary_ip])
            p.kubeconfig(f"kubelet-{n.index}", server, f"system:node:{n.name}")

    def start_control_plane(self) -> None:
        etcd_dir = self.dir / "etcd"
        etcd_dir.mkdir(parents=True, exist_ok=True)
        self._spawn("etcd", self.in_cp([
            "etcd", "--name", "cp", "--data-dir", str(etcd_dir),
            "--listen-client-urls", "http://127.0.0.1:2379",
            "--advertise-client-urls", "http://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "cp=http://127.0.0.1:2380",
            "--log-level", "warn"]))
        self.start_apiserver()
        pk = self.pki
        for name, extra in [
            ("kube-controller-manager", [
                f"--kubeconfig={self.dir / 'pki' / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={self.dir / 'pki' / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={self.dir / 'pki' / 'controller-manager.kubeconfig'}",
                f"--service-account-private-key-file={pk.path('sa', 'key')}",
                f"--root-ca-file={pk.path('ca', 'crt')}",
                "--use-service-account-credentials=true",
                "--leader-elect=false", "--port=0", "--bind-address=127.0.0.1"]),
            ("kube-scheduler", [
                f"--kubeconfig={self.dir / 'pki' / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={self.dir / 'pki' / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={self.dir / 'pki' / 'scheduler.kubeconfig'}",
                "--leader-elect=false", "--port=0", "--bind-address=127.0.0.1"]),
        ]:
            self._spawn(name, self.in_cp([str(self.bin / name), *extra, "--v=1"]))
        # Namespaces carry their own name as a label from Kubernetes 1.21 on; 1.20 does
        # not, so the lab adds it (NetworkPolicy's namespaceSelector relies on it).
        self.wait("the default namespace", lambda: bool(self.kubectl(
            "get", "namespace", "default", "-o", "name")))
        for ns in ["default", "kube-system", "kube-public"]:
            self.kubectl("label", "namespace", ns, f"kubernetes.io/metadata.name={ns}",
                         "--overwrite")

    def start_apiserver(self) -> None:
        pk = self.pki
        self._spawn("kube-apiserver", self.in_cp([
            str(self.bin / "kube-apiserver"),
            "--etcd-servers=http://127.0.0.1:2379",
            f"--advertise-address={CP_IP}", "--bind-address=0.0.0.0", "--secure-port=6443",
            "--insecure-port=0",
            f"--tls-cert-file={pk.path('apiserver', 'crt')}",
            f"--tls-private-key-file={pk.path('apiserver', 'key')}",
            f"--client-ca-file={pk.path('ca', 'crt')}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-key-file={pk.path('sa', 'pub')}",
            f"--service-account-signing-key-file={pk.path('sa', 'key')}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--kubelet-client-certificate={pk.path('apiserver-kubelet-client', 'crt')}",
            f"--kubelet-client-key={pk.path('apiserver-kubelet-client', 'key')}",
            "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=true",
            "--v=1"]))
        self.wait("the API server answering", lambda: "ok" in self.kubectl(
            "get", "--raw", "/readyz"), timeout=90)

    def stop(self, name: str) -> None:
        """Stops one of the cluster's processes (SIGTERM), as an outage would."""
        pid = int((self.cfg.run_dir / f"{name}.pid").read_text())
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)

    def start_registry(self) -> None:
        root = self.dir / "registry"
        root.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "registry.yml"
        conf.write_text(registry.config_yaml(root))
        self._spawn("registry", self.in_cp(["docker-registry", "serve", str(conf)]))
        self.wait("the registry", lambda: subprocess.run(
            self.in_cp(["python3", "-c",
                        f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{registry.PORT}/v2/')"]),
            capture_output=True).returncode == 0, timeout=30)

    def push(self, layout: Path, repo: str, tag: str) -> str:
        """Pushes an OCI layout to the lab's registry as repo:tag (from inside the
        registry's namespace)."""
        lab_dir = Path(__file__).resolve().parent.parent.parent
        p = subprocess.run(self.in_cp([sys.executable, "-m", "vpclab.cluster.registry",
                                       str(layout), repo, tag]),
                           capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(lab_dir)))
        if p.returncode != 0:
            raise ClusterError(f"pushing {repo}:{tag}: {p.stderr.strip()}")
        return p.stdout.strip()

    # -- nodes ------------------------------------------------------------------------

    def node_dir(self, node: NodeInfo) -> Path:
        return self.cfg.run_dir / "nodes" / f"node{node.index}"

    def start_holder(self, node: NodeInfo) -> None:
        """The node's mount namespace, held by a sleeping process: every node process
        enters it, so the node's paths are its own."""
        root = self.node_dir(node)
        binds = []
        for path, name in NODE_PATHS:
            (root / name).mkdir(parents=True, exist_ok=True)
            # The mount point must exist on the machine; it stays empty there.
            Path(path).mkdir(parents=True, exist_ok=True)
            binds.append(f"mount --bind {root / name} {path}")
        script = " && ".join(["mount --make-rprivate /", *binds,
                              # A bpffs of the node's own: its pins die with it.
                              "mount -t bpf bpf /sys/fs/bpf",
                              "mount --make-rshared /",
                              "exec sleep infinity"])
        pid = self._spawn(f"node{node.index}-holder", [
            "nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--mount",
            "--propagation", "private", "sh", "-c", script])
        (self.cfg.run_dir / f"node{node.index}-holder.pid").write_text(str(pid))
        # Ready only once the script has reached `exec sleep`, which follows every mount.
        # Checking for a bpffs at /sys/fs/bpf is not enough: the machine's own namespace
        # has one too, so a check that runs before `unshare` passes, and a containerd
        # started then would create its state under the machine's /var/lib/containerd
        # and find half of it hidden once the bind lands.
        own_mnt = os.readlink("/proc/self/ns/mnt")
        log = self.dir / "logs" / f"node{node.index}-holder.log"
        deadline = time.monotonic() + 10
        while True:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                mnt = os.readlink(f"/proc/{pid}/ns/mnt")
            except OSError:
                out = log.read_text(errors="replace").strip() if log.exists() else ""
                raise ClusterError(f"node{node.index}'s mount namespace: the holder exited: {out}")
            if comm == "sleep" and mnt != own_mnt:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"node{node.index}'s mount namespace: not ready within 10 s "
                                   f"(holder is {comm!r}); see {log}")
            time.sleep(0.05)

    def write_node_configs(self, node: NodeInfo, max_pods: int) -> dict[str, Path]:
        d = self.node_dir(node) / "config"
        d.mkdir(parents=True, exist_ok=True)
        containerd = d / "containerd.toml"
        containerd.write_text(f"""version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{REGISTRY}/pause:{self.images_tag}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{REGISTRY}"]
    endpoint = ["http://{REGISTRY}"]
""")
        kubelet = d / "kubelet.yaml"
        pk = self.pki
        kubelet.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {"x509": {"clientCAFile": str(pk.path("ca", "crt"))},
                               "webhook": {"enabled": True},
                               "anonymous": {"enabled": False}},
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(pk.path(f"kubelet-{node.index}", "crt")),
            "tlsPrivateKeyFile": str(pk.path(f"kubelet-{node.index}", "key")),
            "cgroupDriver": "cgroupfs",
            # kubelet 1.20's default of 5 requests/s to the API server caps a node at
            # about 2.5 pod starts a second whatever the CNI: the lab's timings should
            # show the network's part.
            "kubeAPIQPS": 50,
            "kubeAPIBurst": 100,
            "cgroupsPerQOS": False,
            # The node's containers under a cgroup of the lab's own, which `lab down`
            # removes: nothing is left in the machine's hierarchy.
            "cgroupRoot": self.cgroup_root(node),
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "maxPods": max_pods,
            "clusterDomain": "cluster.local",
            "readOnlyPort": 0,
            "resolvConf": str(d / "resolv.conf"),
            "serializeImagePulls": False,
            "syncFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
            "volumeStatsAggPeriod": "0s",
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%"},
        }, indent=1))
        (d / "resolv.conf").write_text("nameserver 127.0.0.53\n")
        proxy = d / "kube-proxy.yaml"
        proxy.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(self.dir / "pki" / "kube-proxy.kubeconfig")},
            "hostnameOverride": node.name,
            "bindAddress": node.primary_ip,
            "clusterCIDR": self.cfg.vpc_cidr,
            "metricsBindAddress": "127.0.0.1:10249",
            "healthzBindAddress": "127.0.0.1:10256",
            # A network namespace cannot change the machine's conntrack table size.
            "conntrack": {"maxPerCore": 0, "min": 0},
        }, indent=1))
        return {"containerd": containerd, "kubelet": kubelet, "kube-proxy": proxy}

    def cgroup_root(self, node: NodeInfo) -> str:
        return f"/{CGROUP_PARENT}/{self.cfg.prefix}-node{node.index}"

    def make_cgroups(self, node: NodeInfo) -> None:
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if (hierarchy / "cgroup.procs").exists():
                (hierarchy / self.cgroup_root(node).lstrip("/")).mkdir(parents=True,
                                                                       exist_ok=True)

    def start_node(self, node: NodeInfo, max_pods: int) -> None:
        zone = self.cfg.zone(self.cfg.node_zone(node.index))
        self.make_cgroups(node)
        self.start_holder(node)
        conf = self.write_node_configs(node, max_pods)
        logs = self.node_dir(node) / "logs"
        self._spawn(f"node{node.index}-containerd", self.in_node(node, [
            "containerd", "--config", str(conf["containerd"])]), log=logs / "containerd.log")
        self.wait(f"node{node.index}'s containerd", lambda: subprocess.run(
            self.in_node(node, ["ctr", "--address", "/run/containerd/containerd.sock",
                                "version"]), capture_output=True).returncode == 0, timeout=30)
        # containerd keeps directories it created at start by path; if they are not in
        # the node's own root, image unpacking fails much later with a puzzling error.
        if not (self.node_dir(node) / "var-lib-containerd" / "tmpmounts").is_dir():
            raise ClusterError(f"node{node.index}'s containerd did not start inside the node's "
                               f"mount namespace (no tmpmounts under its root)")
        self._spawn(f"node{node.index}-kubelet", self.in_node(node, [
            str(self.bin / "kubelet"),
            f"--config={conf['kubelet']}",
            f"--kubeconfig={self.dir / 'pki' / f'kubelet-{node.index}.kubeconfig'}",
            "--container-runtime=remote",
            "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
            f"--hostname-override={node.name}",
            f"--node-ip={node.primary_ip}",
            f"--provider-id=aws:///{zone}/{node.instance_id}",
            f"--pod-infra-container-image={REGISTRY}/pause:{self.images_tag}",
            f"--node-labels=topology.kubernetes.io/zone={zone},"
            f"topology.kubernetes.io/region={self.cfg.region},"
            f"node.kubernetes.io/instance-type={self.cfg.instance_type}",
            "--v=1"]), log=logs / "kubelet.log")
        self._spawn(f"node{node.index}-kube-proxy", self.in_node(node, [
            str(self.bin / "kube-proxy"), f"--config={conf['kube-proxy']}", "--v=1"]),
            log=logs / "kube-proxy.log")

    # -- the whole --------------------------------------------------------------------

    def up(self, nodes: list[NodeInfo], images: dict[str, Path], images_tag: str,
           max_pods: int) -> dict:
        t0 = time.monotonic()
        self.images_tag = images_tag
        self.dir.mkdir(parents=True, exist_ok=True)
        say("control plane: network, certificates, etcd, kube-apiserver")
        self.build_cp_network()
        self.make_pki(nodes)
        self.start_control_plane()
        say("registry: docker-registry, then the images")
        self.start_registry()
        for name, layout in images.items():
            digest = self.push(layout, name, images_tag)
            say(f"  pushed {REGISTRY}/{name}:{images_tag} ({digest[:19]})")
        for n in nodes:
            say(f"node{n.index} ({n.name}): mount namespace, containerd, kubelet, kube-proxy")
            self.start_node(n, max_pods)
        self.wait("every node registered", lambda: len(self.kubectl(
            "get", "nodes", "-o", "name").split()) == len(nodes), timeout=90)
        (self.dir / "cluster.json").write_text(json.dumps({
            "images_tag": images_tag, "registry": REGISTRY,
            "nodes": [{"index": n.index, "name": n.name, "netns": n.netns,
                       "primary_ip": n.primary_ip, "instance_id": n.instance_id}
                      for n in nodes]}, indent=1))
        self.write_kubectl_wrapper()
        return {"up_seconds": round(time.monotonic() - t0, 1), "nodes": [n.name for n in nodes],
                "api_server": f"https://{CP_IP}:6443", "registry": REGISTRY}

    def write_kubectl_wrapper(self) -> Path:
        """`<run dir>/kubectl`: kubectl against the lab, run in the control plane's
        namespace (the machine's own namespace has no route to the lab)."""
        path = self.cfg.run_dir / "kubectl"
        path.write_text("#!/bin/sh\nexec ip netns exec {ns} {bin} --kubeconfig {kc} \"$@\"\n"
                        .format(ns=self.cp_ns, bin=self.bin / "kubectl",
                                kc=self.dir / "pki" / "admin.kubeconfig"))
        path.chmod(0o755)
        return path


def max_pods_for(max_enis: int, ipv4_per_eni: int) -> int:
    """EKS's formula: ENIs x (addresses per ENI - 1) + 2 (the host-network pods)."""
    return max_enis * (ipv4_per_eni - 1) + 2
