//! A private containerd (Debian's 1.6 with runc) for tests that drive the CNI plugin through a
//! real libcni client: `ctr run --cni`.
//!
//! containerd and every `ctr` run inside the test's "node" network namespace and inside one
//! private mount namespace (containerd's). In that mount namespace /etc, /opt, /var/lib and
//! /run are overlays whose upper layers live in the test's directory, because containerd 1.6
//! and ctr hard-code paths there (ctr's go-cni reads /etc/cni/net.d and /opt/cni/bin, libcni
//! caches results in /var/lib/cni, shims put sockets in /run/containerd/s, runc keeps state in
//! /run/containerd/runc, containerd's opt plugin fills /opt/containerd). Nothing lands in the
//! machine's directories, and no interface, address or route in its network namespace.

use std::{
    ffi::CString,
    fmt::Write as _,
    io::Read as _,
    os::unix::{ffi::OsStrExt as _, fs::symlink},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// What to install when a tool is missing; `cargo xtask test` installs these.
pub const INSTALL_HINT: &str = "apt-get install -y containerd runc busybox-static \
     (`cargo xtask test` installs them)";

/// Fails the test, saying what to install, unless containerd, ctr, the runc shim, runc and a
/// statically linked busybox (the containers' only binary) are present.
pub fn require_tools() {
    for tool in [
        "containerd",
        "ctr",
        "containerd-shim-runc-v2",
        "runc",
        "nsenter",
        "unshare",
        "timeout",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(found, "`{tool}` is not installed: {INSTALL_HINT}");
    }
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.exists(), "/bin/busybox is missing: {INSTALL_HINT}");
    assert!(
        is_static_elf(busybox),
        "/bin/busybox is dynamically linked (Debian's `busybox` package?): the container has no \
         libc, so it needs busybox-static: {INSTALL_HINT}"
    );
}

/// True when `path` is an ELF64 executable without a PT_INTERP program header.
fn is_static_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(entsize), Some(num)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(num)).all(|i| u32_at(phoff + i * usize::from(entsize)) != Some(PT_INTERP))
}

/// A directory holding busybox and links to the `applets`, plus the mount points runc
/// expects: enough for `ctr run --rootfs` without any image.
pub fn busybox_rootfs(root: &Path, applets: &[&str]) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for applet in applets {
        symlink("busybox", bin.join(applet)).unwrap();
    }
    root.to_owned()
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vpc-ebpf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: removing {}: {e}", self.0.display());
        }
    }
}

/// A child process killed and reaped on drop, so a failing test leaves no `ctr` behind.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Waits up to `timeout` for the process to exit; panics past that (and the drop ends it).
    pub fn wait_for(&mut self, timeout: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the process. SIGTERM first: `timeout` passes it on, and `ctr run` forwards it to
    /// its task and then cleans up; SIGKILL only if that does not end it within 10 s.
    pub fn stop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            kill(self.0.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// containerd running in the node's network namespace and its own mount namespace; on drop
/// it removes what tests left (tasks, containers, shims, cgroups) and stops.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    /// The containerd namespace the tests' containers live in (and their cgroup parent).
    pub namespace: String,
    child: Child,
    mount_ns: PathBuf,
}

/// Directories that containerd 1.6 or ctr write into at fixed paths, each overlaid in the
/// private mount namespace: (mount point, name of its layers under `<dir>/overlay`).
const OVERLAID: [(&str, &str); 4] = [
    ("/etc", "etc"),
    ("/opt", "opt"),
    ("/var/lib", "var-lib"),
    ("/run", "run"),
];

impl Containerd {
    /// Starts containerd in `node_ns` with `conflist` as the only CNI network and `plugin` as
    /// the only CNI plugin that `ctr run --cni` can see; state lives under `dir`.
    pub fn start(dir: &Path, node_ns: &str, conflist: &Value, plugin: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        // Shims daemonize away from containerd; as a subreaper this process inherits them
        // and can reap them (a container's PID 1 does not always reap orphans).
        // SAFETY: plain prctl on this process.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let ovl = dir.join("overlay");
        for (_, name) in OVERLAID {
            std::fs::create_dir_all(ovl.join(name).join("upper")).unwrap();
            std::fs::create_dir_all(ovl.join(name).join("work")).unwrap();
        }
        // Opaque so a machine's own /etc/cni, /opt/cni or /var/lib/cni stays invisible: the
        // plugin under test must be the only network ctr finds.
        let net_d = ovl.join("etc/upper/cni/net.d");
        std::fs::create_dir_all(&net_d).unwrap();
        std::fs::write(
            net_d.join("10-vpc-ebpf.conflist"),
            serde_json::to_vec_pretty(conflist).unwrap(),
        )
        .unwrap();
        let bin = ovl.join("opt/upper/cni/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let plugin_type = conflist["plugins"][0]["type"]
            .as_str()
            .expect("plugin type");
        symlink(plugin, bin.join(plugin_type)).unwrap();
        std::fs::create_dir_all(ovl.join("var-lib/upper/cni")).unwrap();
        for opaque in ["etc/upper/cni", "opt/upper/cni", "var-lib/upper/cni"] {
            set_opaque(&ovl.join(opaque));
        }

        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
# Its own CNI handling and the oom_score_adj it gives sandboxes are not what is under test:
# ctr runs libcni itself.
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = dir.join("containerd.sock").display(),
            ),
        )
        .unwrap();

        let mut mounts = String::new();
        for (target, name) in OVERLAID {
            let l = ovl.join(name);
            let _ = writeln!(
                mounts,
                "mount -t overlay overlay -o lowerdir={target},upperdir={},workdir={} {target}",
                l.join("upper").display(),
                l.join("work").display()
            );
        }
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        // nsenter rather than `ip netns exec`: the latter remounts /sys, which would hide the
        // cgroup hierarchies runc needs.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node_ns}"))
            .args([
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-ec",
            ])
            .arg(format!("{mounts}exec containerd --config \"$1\""))
            .arg("containerd-in-node")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let mount_ns = PathBuf::from(format!("/proc/{}/ns/mnt", child.id()));
        let mut me = Self {
            dir: dir.to_owned(),
            namespace: format!("vpce{}", std::process::id()),
            child,
            mount_ns,
        };
        me.wait_ready();
        me
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("containerd exited ({status}) at start:\n{}", self.log());
            }
            // Both the socket and the mount namespace must be up before ctr enters it.
            if self.ctr_output(&["version"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The private mount namespace's upper layer for `dir` (one of /etc, /opt, /var/lib,
    /// /run): what containerd and ctr wrote there.
    pub fn upper(&self, dir: &str) -> PathBuf {
        let (_, name) = OVERLAID
            .iter()
            .find(|(t, _)| *t == dir)
            .expect("an overlaid directory");
        self.dir.join("overlay").join(name).join("upper")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` against this containerd, in its network and mount namespaces, bounded by
    /// `timeout` so a wedged daemon fails the test instead of hanging it.
    pub fn ctr(&self, timeout: Duration) -> Command {
        let mut c = Command::new("timeout");
        c.args(["--kill-after=5", &format!("{}", timeout.as_secs().max(1))])
            .args([
                "nsenter",
                "--target",
                &self.pid().to_string(),
                "--mount",
                "--net",
            ])
            .arg("ctr")
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["--namespace", &self.namespace])
            .stdin(Stdio::null());
        c
    }

    pub fn ctr_output(&self, args: &[&str]) -> Output {
        self.ctr(Duration::from_secs(30))
            .args(args)
            .output()
            .expect("spawn ctr")
    }

    /// Runs ctr and returns its stdout, panicking with its stderr if it fails.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr_output(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}): {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr ls -q`-style listings, one ID a line.
    pub fn ids(&self, object: &str) -> Vec<String> {
        self.ctr_ok(&[object, "ls", "-q"])
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The host PID of task `id`'s init process.
    pub fn task_pid(&self, id: &str) -> u32 {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(id)).then(|| f.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no task {id} in:\n{out}"))
    }

    /// The mount namespace's identity (`mnt:[inode]`), to find the processes in it.
    fn mount_ns_id(&self) -> Option<PathBuf> {
        std::fs::read_link(&self.mount_ns).ok()
    }

    /// The cgroup directories runc made for this namespace, one per hierarchy.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.path().join(&self.namespace))
            .filter(|p| p.is_dir())
            .collect()
    }

    fn shutdown(&mut self) {
        // Containers a failed test left behind: containerd removes them if it still can.
        if matches!(self.child.try_wait(), Ok(None)) {
            for id in self.ids_lenient("containers") {
                let _ = self.ctr_output(&["task", "kill", "--signal", "SIGKILL", &id]);
                let _ = self.ctr_output(&["task", "delete", "--force", &id]);
                let _ = self.ctr_output(&["container", "delete", &id]);
            }
        }
        // Whatever still runs in the containers' cgroups, then containerd, then the shims
        // (which share its mount namespace), each by PID.
        for cg in self.cgroup_dirs() {
            for pid in pids_in_cgroup(&cg) {
                kill(pid, libc::SIGKILL);
            }
        }
        let ns = self.mount_ns_id();
        if matches!(self.child.try_wait(), Ok(None)) {
            kill(self.child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // Never the machine's own mount namespace, should containerd have died before
        // unsharing.
        let own = std::fs::read_link("/proc/self/ns/mnt").ok();
        if let Some(ns) = ns.filter(|ns| Some(ns) != own.as_ref()) {
            for pid in pids_with_ns("mnt", &ns) {
                kill(pid, libc::SIGKILL);
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: waits for that PID only; ECHILD at once if it is not ours.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                }
            }
        }
        // runc removes a container's cgroup, not the namespace-level parent it created.
        for cg in self.cgroup_dirs() {
            remove_cgroup_tree(&cg);
        }
        reap_shims();
    }

    fn ids_lenient(&self, object: &str) -> Vec<String> {
        let out = self.ctr_output(&[object, "ls", "-q"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Marks an overlay upper directory opaque: the lower directory's entries are hidden.
fn set_opaque(dir: &Path) {
    let path = CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings and a 1-byte value buffer.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    assert!(
        rc == 0,
        "setxattr trusted.overlay.opaque on {}: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
}

fn kill(pid: u32, signal: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall on a PID this test found to be its own.
        unsafe { libc::kill(pid, signal) };
    }
}

/// PIDs of the processes whose `/proc/<pid>/ns/<kind>` is `ns` (e.g. `net:[4026…]`).
pub fn pids_with_ns(kind: &str, ns: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).is_ok_and(|l| l == ns))
        .collect()
}

/// Reaps the exited shims this process inherited as their subreaper, by PID.
fn reap_shims() {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
    {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
        let Some((comm, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
        else {
            continue;
        };
        let mut f = rest.split_whitespace();
        if comm.starts_with("containerd-shim") && f.next() == Some("Z") && f.next() == Some(&me) {
            // SAFETY: waits for one exited child of ours, by PID.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
    }
}

fn pids_in_cgroup(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let mut procs = String::new();
        if let Ok(mut f) = std::fs::File::open(d.join("cgroup.procs")) {
            let _ = f.read_to_string(&mut procs);
        }
        pids.extend(procs.lines().filter_map(|l| l.parse::<u32>().ok()));
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir()),
            );
        }
    }
    pids
}

/// Removes a cgroup and its children (cgroupfs directories go with rmdir, deepest first),
/// retrying while killed processes finish exiting.
fn remove_cgroup_tree(dir: &Path) {
    let mut dirs = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir()),
            );
        }
        dirs.push(d);
    }
    for d in dirs.iter().rev() {
        for _ in 0..50 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
