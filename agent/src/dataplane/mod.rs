//! The eBPF dataplane: loads the embedded object, attaches its TC programs to interfaces
//! and feeds its maps.
//!
//! Maps and attachments are pinned under a versioned bpffs directory so that they outlive
//! the agent: a restarted agent re-opens them and swaps its own program instances in
//! without detaching anything, so traffic keeps flowing while it is down. Programs are
//! attached with tcx on kernels that have it (>= 6.6) and with a clsact qdisc otherwise.
//!
//! Call order: [`Dataplane::set_node`], then [`Dataplane::upsert_eni`] for every ENI, then
//! endpoints. Until `set_node` the programs hand every packet to the kernel.

mod attach;
mod bpffs;
mod conntrack;
mod counters;
mod error;
pub mod events;
mod layout;
mod maps;
pub mod owner;
mod policy_maps;
mod spec;
mod sys;

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
    },
    util::KernelVersion,
};
pub use conntrack::{GcTimeouts, entries_for_memory, monotonic_now_ns};
pub use counters::CounterRow;
pub use error::DataplaneError;
pub use spec::{EndpointSpec, EniSpec, NodeSpec};
pub mod settings;
use tracing::{debug, info, warn};
use vpc_ebpf_common::{
    PIN_VERSION, maps as map_names,
    nat::{KernelFlow, NatEntry, NatKey, SnatPorts},
    node::endpoint_flags,
    programs,
};
use vpc_ebpf_rpc::types::{HostPort, MacAddr, Protocol};

/// Every program in the object, loaded at start.
const PROGRAMS: [&str; 6] = [
    programs::COUNT_INGRESS,
    programs::COUNT_EGRESS,
    programs::FROM_POD,
    programs::FROM_ENI,
    programs::TO_POD,
    programs::TO_ENI,
];

/// The programs attached through pinned links (the counters are diagnostics and are
/// attached for the life of the process only).
const PINNED_PROGRAMS: [&str; 4] = [
    programs::FROM_POD,
    programs::FROM_ENI,
    programs::TO_POD,
    programs::TO_ENI,
];

/// What runs on an ENI: traffic from the VPC, and (with NetworkPolicy on) what the host
/// stack sends out. The egress program only judges Service traffic for policy; without
/// policy it would cost every packet leaving the node a program run for nothing.
const ENI_HOOKS: [(Hook, &str); 2] = [
    (Hook::Ingress, programs::FROM_ENI),
    (Hook::Egress, programs::TO_ENI),
];

/// What runs on a pod's host veth: traffic from the pod, and what the host stack hands it.
const POD_HOOKS: [(Hook, &str); 2] = [
    (Hook::Ingress, programs::FROM_POD),
    (Hook::Egress, programs::TO_POD),
];

/// The eBPF object built by `cargo xtask build-ebpf`, embedded so the agent binary is
/// self-contained.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VPC_EBPF_OBJECT"));

/// Default root of the agent's pinned objects in bpffs.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/vpc-ebpf";

/// How programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (Linux >= 6.6): no qdisc, ordered multi-program attachment.
    Tcx,
    /// A clsact qdisc with direct-action BPF filters, for older kernels.
    Clsact,
}

impl AttachMode {
    /// The best mode the running kernel supports.
    pub fn detect() -> Self {
        // A kernel whose version cannot be read is treated as old: clsact works everywhere.
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => Self::Tcx,
            _ => Self::Clsact,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// bpffs directory under which the versioned pin directory is created.
    pub pin_root: PathBuf,
    /// `None`: detect from the kernel version.
    pub attach_mode: Option<AttachMode>,
    /// Size of the NAT/conntrack table; `None`: from the node's memory
    /// ([`entries_for_memory`]). Only applies when the table is created: a table pinned by
    /// an earlier run keeps its size.
    pub nat_max_entries: Option<u32>,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            attach_mode: None,
            nat_max_entries: None,
        }
    }
}

/// Which hook of an interface a program is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn attach_type(self) -> TcAttachType {
        match self {
            Self::Ingress => TcAttachType::Ingress,
            Self::Egress => TcAttachType::Egress,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        match s {
            "ingress" => Some(Self::Ingress),
            "egress" => Some(Self::Egress),
            _ => None,
        }
    }
}

/// The loaded object and its attachments.
///
/// Dropping it detaches only the packet counters; the dataplane programs stay attached
/// through their pinned links (tcx) or filters (clsact), and the maps stay pinned.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    mode: AttachMode,
    attached: HashMap<(String, Hook), (&'static str, SchedClassifierLinkId)>,
    links: attach::Attachments,
    replaced: Vec<&'static str>,
    load_times: Vec<(&'static str, std::time::Duration)>,
    /// `ENABLE_NETWORK_POLICY` as last set: whether ENIs get their egress program.
    network_policy: bool,
    /// The ENIs recorded by this process, to attach or detach the egress program when
    /// policy is switched.
    enis: std::collections::BTreeSet<u32>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pin_dir", &self.pin_dir)
            .field("mode", &self.mode)
            .field("attached", &self.attached.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Loads the embedded object, re-using maps already pinned by an earlier run, and
    /// loads every program into the kernel (attaching is separate).
    pub fn load(config: &DataplaneConfig) -> Result<Self, DataplaneError> {
        Self::load_object(config, OBJECT)
    }

    /// [`Self::load`] with another build of the programs than the embedded one, so that
    /// two builds can be compared in one process (`vpc-ebpf-bench progcost --object`).
    pub fn load_object(config: &DataplaneConfig, object: &[u8]) -> Result<Self, DataplaneError> {
        bpffs::ensure_mounted(&config.pin_root)?;
        let pin_dir = config.pin_root.join(PIN_VERSION);
        std::fs::create_dir_all(&pin_dir).map_err(|source| DataplaneError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let nat_entries = match config.nat_max_entries {
            Some(n) => n,
            None => conntrack::entries_for_memory(conntrack::mem_total()?),
        };
        let replaced = layout::replace_mismatched(&pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(map_names::NAT, nat_entries)
            .map_max_entries(map_names::KERNEL_FLOWS, nat_entries)
            .load(object)
            .map_err(|source| DataplaneError::Load {
                pin_dir: pin_dir.clone(),
                source: Box::new(source),
            })?;
        let mut load_times = Vec::with_capacity(PROGRAMS.len());
        for name in PROGRAMS {
            let t0 = std::time::Instant::now();
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::ProgramLoad { name, source })?;
            load_times.push((name, t0.elapsed()));
            debug!(program = name, took = ?t0.elapsed(), "program loaded (verified)");
        }
        let mode = config.attach_mode.unwrap_or_else(AttachMode::detect);
        let links = attach::Attachments::restore(&mut ebpf, mode, &pin_dir, &PINNED_PROGRAMS)?;
        info!(pin_dir = %pin_dir.display(), ?mode, nat_entries, "eBPF object loaded");
        Ok(Self {
            ebpf,
            pin_dir,
            mode,
            attached: HashMap::new(),
            links,
            replaced,
            load_times,
            network_policy: false,
            enis: std::collections::BTreeSet::new(),
        })
    }

    /// Writes the node configuration and the CIDR tables. Idempotent; until the first
    /// call the programs hand every packet to the kernel.
    pub fn set_node(&mut self, n: &NodeSpec) -> Result<(), DataplaneError> {
        let value = n.value();
        let usable = SnatPorts::new(
            value.snat_port_min,
            value.snat_port_max,
            value.snat_skip_min,
            value.snat_skip_max,
        )
        .usable();
        if !n.external_snat && usable == 0 {
            return Err(DataplaneError::InvalidSpec(format!(
                "SNAT port range {}-{} less the band {:?} leaves no port",
                n.snat_ports.0, n.snat_ports.1, n.snat_skip
            )));
        }
        maps::sync_cidrs(&mut self.ebpf, map_names::VPC_CIDRS, &n.vpc_cidrs)?;
        maps::sync_cidrs(
            &mut self.ebpf,
            map_names::SNAT_EXCLUSIONS,
            &n.snat_exclusions,
        )?;
        maps::sync_cidrs(
            &mut self.ebpf,
            map_names::PASSTHROUGH_CIDRS,
            &n.passthrough_cidrs,
        )?;
        if n.network_policy {
            policy_maps::open_mid_stream_window(&mut self.ebpf, monotonic_now_ns())?;
        }
        // Last: the programs start acting on the flag only once the tables are in place.
        maps::set_config(&mut self.ebpf, &value)?;
        if self.network_policy != n.network_policy {
            self.network_policy = n.network_policy;
            for ifindex in self.enis.clone() {
                self.eni_egress(ifindex)?;
            }
        }
        Ok(())
    }

    /// Attaches the ENI egress program with policy on, detaches it (a pinned link of an
    /// earlier run with policy on) with policy off.
    fn eni_egress(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        let (hook, program) = ENI_HOOKS[1];
        if self.network_policy {
            self.links.attach(&mut self.ebpf, ifindex, hook, program)
        } else {
            self.links.detach(ifindex, hook, program)
        }
    }

    /// Makes the policy maps enforce what `plan` leads to (see [`crate::policy::sets`]).
    pub fn apply_policy(&mut self, plan: &crate::policy::sets::Plan) -> Result<(), DataplaneError> {
        policy_maps::apply(&mut self.ebpf, plan)
    }

    /// Sets the end of the window in which untracked TCP segments may pass as replies
    /// (monotonic ns; 0 closes it).
    pub fn set_mid_stream_until(&mut self, until_ns: u64) -> Result<(), DataplaneError> {
        policy_maps::set_mid_stream_until(&mut self.ebpf, until_ns)
    }

    /// The policy events' ring buffer, for one reader; `MissingMap` when taken already.
    pub fn take_policy_events(&mut self) -> Result<events::PolicyEvents, DataplaneError> {
        events::PolicyEvents::take(&mut self.ebpf)
    }

    /// What the policy maps enforce now.
    pub fn policy_applied(&mut self) -> Result<crate::policy::sets::Applied, DataplaneError> {
        policy_maps::read(&mut self.ebpf)
    }

    /// Records the ENI and attaches the ENI program to it. Idempotent.
    pub fn upsert_eni(&mut self, e: &EniSpec) -> Result<(), DataplaneError> {
        maps::put_eni(&mut self.ebpf, e.ifindex, &e.value())?;
        let (hook, program) = ENI_HOOKS[0];
        self.links
            .attach(&mut self.ebpf, e.ifindex, hook, program)?;
        self.enis.insert(e.ifindex);
        self.eni_egress(e.ifindex)
    }

    /// Detaches the ENI programs and forgets the ENI. An unknown ENI is success.
    pub fn remove_eni(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        for (hook, program) in ENI_HOOKS {
            self.links.detach(ifindex, hook, program)?;
        }
        self.enis.remove(&ifindex);
        maps::remove_eni(&mut self.ebpf, ifindex)
    }

    /// Records the pod and attaches the pod program to its host veth. Idempotent; the map
    /// entry is written first so that the pod's first packet already finds it.
    pub fn upsert_endpoint(&mut self, ep: &EndpointSpec) -> Result<(), DataplaneError> {
        if ep.host_ifindex == 0 || ep.eni_ifindex == 0 {
            return Err(DataplaneError::InvalidSpec(format!(
                "endpoint {} needs a host veth and an ENI ifindex",
                ep.ipv4
            )));
        }
        let old = maps::endpoint(&mut self.ebpf, ep.ipv4)?;
        if let Some(old) = old
            && old.host_ifindex != ep.host_ifindex
        {
            // The address moved to another veth (a pod re-created under the same IP).
            for (hook, program) in POD_HOOKS {
                self.links.detach(old.host_ifindex, hook, program)?;
            }
        }
        let mut value = ep.value();
        // Flags set for this veth (set_via_host_qdisc) stay: a restarted agent
        // re-programs its endpoints from what it knows, which does not include them.
        if let Some(old) = old.filter(|o| o.host_ifindex == ep.host_ifindex) {
            value.flags = old.flags;
        }
        maps::put_endpoint(&mut self.ebpf, ep.ipv4, &value)?;
        for (hook, program) in POD_HOOKS {
            self.links
                .attach(&mut self.ebpf, ep.host_ifindex, hook, program)?;
        }
        Ok(())
    }

    /// Whether packets to the pod `ipv4` go through its host veth's qdisc (where the
    /// `bandwidth` plugin limits what the pod receives) rather than straight into its
    /// namespace. The endpoint must exist.
    pub fn set_via_host_qdisc(&mut self, ipv4: Ipv4Addr, on: bool) -> Result<(), DataplaneError> {
        let Some(mut value) = maps::endpoint(&mut self.ebpf, ipv4)? else {
            return Err(DataplaneError::InvalidSpec(format!(
                "endpoint {ipv4} is not programmed"
            )));
        };
        if on {
            value.flags |= endpoint_flags::VIA_HOST_QDISC;
        } else {
            value.flags &= !endpoint_flags::VIA_HOST_QDISC;
        }
        maps::put_endpoint(&mut self.ebpf, ipv4, &value)
    }

    /// Detaches the pod program, drops the pod's hostPorts and forgets the pod. An
    /// unknown pod is success.
    pub fn remove_endpoint(&mut self, ipv4: Ipv4Addr) -> Result<(), DataplaneError> {
        let Some(old) = maps::endpoint(&mut self.ebpf, ipv4)? else {
            return maps::sync_hostports(&mut self.ebpf, ipv4, &[]);
        };
        // Another endpoint may share the veth only if the agent's state is confused;
        // detaching would cut that one off too, so leave the program then.
        let shared = maps::endpoints(&mut self.ebpf)?
            .iter()
            .any(|(ip, e)| *ip != ipv4 && e.host_ifindex == old.host_ifindex);
        if shared {
            warn!(%ipv4, ifindex = old.host_ifindex, "another endpoint uses this veth; program left attached");
        } else {
            for (hook, program) in POD_HOOKS {
                self.links.detach(old.host_ifindex, hook, program)?;
            }
        }
        maps::sync_hostports(&mut self.ebpf, ipv4, &[])?;
        maps::remove_endpoint(&mut self.ebpf, ipv4).map(|_| ())
    }

    /// Every endpoint in the (pinned) map: what a restarted agent had programmed.
    pub fn endpoints(&mut self) -> Result<Vec<EndpointSpec>, DataplaneError> {
        Ok(maps::endpoints(&mut self.ebpf)?
            .into_iter()
            .map(|(ipv4, e)| EndpointSpec {
                ipv4,
                host_ifindex: e.host_ifindex,
                host_mac: MacAddr(e.host_mac),
                pod_mac: MacAddr(e.pod_mac),
                eni_ifindex: e.eni_ifindex,
            })
            .collect())
    }

    /// The hostPorts the (pinned) map holds, by pod.
    pub fn hostports(&self) -> Result<BTreeMap<Ipv4Addr, Vec<HostPort>>, DataplaneError> {
        let mut out: BTreeMap<Ipv4Addr, Vec<HostPort>> = BTreeMap::new();
        for (k, t) in maps::hostports(&self.ebpf)? {
            let protocol = match k.proto {
                6 => Protocol::Tcp,
                17 => Protocol::Udp,
                _ => continue,
            };
            out.entry(spec::from_be(t.pod_ip))
                .or_default()
                .push(HostPort {
                    protocol,
                    host_port: k.port,
                    container_port: t.container_port,
                    host_ip: (k.addr != 0).then(|| spec::from_be(k.addr)),
                });
        }
        for ports in out.values_mut() {
            ports.sort();
        }
        Ok(out)
    }

    /// Removes the pin directories of other layout versions under the pin root (and the
    /// links pinned there, which detaches their programs). Call once every endpoint and
    /// ENI is attached under this version. Returns what was removed.
    pub fn remove_other_versions(&self) -> Result<Vec<PathBuf>, DataplaneError> {
        let Some(root) = self.pin_dir.parent() else {
            return Ok(Vec::new());
        };
        let entries = std::fs::read_dir(root).map_err(|source| DataplaneError::PinDir {
            path: root.to_path_buf(),
            source,
        })?;
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let versioned = name.len() > 1
                && name.starts_with('v')
                && name[1..].bytes().all(|b| b.is_ascii_digit());
            if !versioned || path == self.pin_dir || !path.is_dir() {
                continue;
            }
            std::fs::remove_dir_all(&path).map_err(|source| DataplaneError::PinDir {
                path: path.clone(),
                source,
            })?;
            removed.push(path);
        }
        Ok(removed)
    }

    /// Whether the pod's map entry exists and this process's pod programs run on both
    /// hooks of its host veth (a veth programmed by an older agent, ingress only, reads as
    /// not attached, so that re-upserting it completes it).
    pub fn endpoint_attached(&self, ipv4: Ipv4Addr) -> bool {
        let Some(ep) = maps::endpoint_ro(&self.ebpf, ipv4) else {
            return false;
        };
        POD_HOOKS.iter().all(|(hook, program)| {
            self.links
                .is_attached(&self.ebpf, ep.host_ifindex, *hook, program)
        })
    }

    /// Whether the ENI's egress program runs (NetworkPolicy on).
    pub fn eni_egress_attached(&self, ifindex: u32) -> bool {
        let (hook, program) = ENI_HOOKS[1];
        self.links.is_attached(&self.ebpf, ifindex, hook, program)
    }

    /// Makes the pod's hostPorts exactly `ports`; an empty slice removes them. Without a
    /// `host_ip` a port is published on every ENI's primary address, as `portmap` does on
    /// every local address; with one, on that address only.
    pub fn set_hostports(
        &mut self,
        ipv4: Ipv4Addr,
        ports: &[HostPort],
    ) -> Result<(), DataplaneError> {
        if let Some(bad) = ports
            .iter()
            .find(|p| p.host_port == 0 || p.container_port == 0)
        {
            return Err(DataplaneError::InvalidSpec(format!(
                "hostPort {bad:?} of {ipv4}: ports must be non-zero"
            )));
        }
        maps::sync_hostports(&mut self.ebpf, ipv4, ports)
    }

    /// Removes translated flows idle past [`GcTimeouts::default`] at `now_ns`
    /// ([`monotonic_now_ns`]). Returns the number of entries removed.
    pub fn gc_conntrack(&mut self, now_ns: u64) -> Result<usize, DataplaneError> {
        conntrack::gc(&mut self.ebpf, now_ns, &GcTimeouts::default())
    }

    /// [`Self::gc_conntrack`] with other timeouts.
    pub fn gc_conntrack_with(
        &mut self,
        now_ns: u64,
        timeouts: &GcTimeouts,
    ) -> Result<usize, DataplaneError> {
        conntrack::gc(&mut self.ebpf, now_ns, timeouts)
    }

    /// Every flow the host stack handles (kube-proxy DNAT, host connections), keyed from
    /// the pod's side; a zero peer address and port is a pod port open toward any peer.
    /// For introspection and tests.
    pub fn kernel_flows(&self) -> Result<Vec<(NatKey, KernelFlow)>, DataplaneError> {
        conntrack::kernel_flows(&self.ebpf)
    }

    /// Every NAT/conntrack entry (two per translated flow), for introspection and tests.
    pub fn nat_entries(&self) -> Result<Vec<(NatKey, NatEntry)>, DataplaneError> {
        conntrack::entries(&self.ebpf)
    }

    /// The pinned maps [`Self::load`] found with another layout than the object's and
    /// re-created empty (see the warning it logged). When this names
    /// `vpc_ebpf_common::maps::ENDPOINTS`, [`Self::endpoints`] no longer tells what an
    /// earlier run programmed: re-upsert every pod from the agent's own records.
    pub fn replaced_maps(&self) -> &[&'static str] {
        &self.replaced
    }

    /// How long each program took to load (`bpf_prog_load`, the verifier's time mostly).
    pub fn load_times(&self) -> &[(&'static str, std::time::Duration)] {
        &self.load_times
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// Attaches the packet counters to both hooks of `iface` (in the calling thread's
    /// network namespace). Attaching twice is a no-op.
    pub fn attach_counters(&mut self, iface: &str) -> Result<(), DataplaneError> {
        self.attach(iface, Hook::Ingress, programs::COUNT_INGRESS)?;
        self.attach(iface, Hook::Egress, programs::COUNT_EGRESS)
    }

    /// Detaches whatever this process attached to `iface`. Detaching what is not attached,
    /// or from an interface that is gone, succeeds.
    pub fn detach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let mut first_error = None;
        for hook in [Hook::Ingress, Hook::Egress] {
            let Some((name, link)) = self.attached.remove(&(iface.to_owned(), hook)) else {
                continue;
            };
            let result = classifier(&mut self.ebpf, name).and_then(|p| {
                p.detach(link).map_err(|source| DataplaneError::Detach {
                    iface: iface.to_owned(),
                    name,
                    source,
                })
            });
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn attach(
        &mut self,
        iface: &str,
        hook: Hook,
        name: &'static str,
    ) -> Result<(), DataplaneError> {
        if self.attached.contains_key(&(iface.to_owned(), hook)) {
            return Ok(());
        }
        let options = match self.mode {
            AttachMode::Tcx => TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
            AttachMode::Clsact => {
                add_clsact(iface)?;
                TcAttachOptions::Netlink(NlOptions::default())
            }
        };
        let link = classifier(&mut self.ebpf, name)?
            .attach_with_options(iface, hook.attach_type(), options)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_owned(),
                name,
                source,
            })?;
        debug!(iface, ?hook, program = name, mode = ?self.mode, "attached");
        self.attached.insert((iface.to_owned(), hook), (name, link));
        Ok(())
    }

    /// Runs `program` once on `frame` with `BPF_PROG_TEST_RUN` and returns its verdict.
    /// The kernel presents the frame as received on the loopback device of the calling
    /// thread's network namespace.
    pub fn test_run(&mut self, program: &'static str, frame: &[u8]) -> Result<i32, DataplaneError> {
        self.test_run_frame(program, frame)
            .map(|(verdict, _)| verdict)
    }

    /// [`Self::test_run`] that also returns how long the program ran, as the kernel timed
    /// it (one run on a fresh skb: rewrites never accumulate across runs).
    pub fn test_run_timed(
        &mut self,
        program: &'static str,
        frame: &[u8],
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        let result = self.run_program(program, frame, None)?;
        Ok((result.return_value.cast_signed(), result.duration))
    }

    /// [`Self::test_run`] that also returns the frame as the program left it.
    pub fn test_run_frame(
        &mut self,
        program: &'static str,
        frame: &[u8],
    ) -> Result<(i32, Vec<u8>), DataplaneError> {
        // Room for what the programs may add (they only rewrite in place today).
        let mut out = vec![0u8; frame.len() + 256];
        let result = self.run_program(program, frame, Some(&mut out))?;
        out.truncate(usize::try_from(result.data_size_out).unwrap_or(0));
        Ok((result.return_value.cast_signed(), out))
    }

    /// One `BPF_PROG_TEST_RUN` of `program` on `frame`, the frame as left written to `out`.
    fn run_program(
        &mut self,
        program: &'static str,
        frame: &[u8],
        out: Option<&mut [u8]>,
    ) -> Result<aya::programs::TestRunResult, DataplaneError> {
        let prog = classifier(&mut self.ebpf, program)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = out;
        prog.test_run(opts)
            .map_err(|source| DataplaneError::TestRun {
                name: program,
                source,
            })
    }

    /// Current value of every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<CounterRow>, DataplaneError> {
        counters::read(&self.ebpf)
    }
}

pub(crate) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::ProgramLoad { name, source })
}

/// Adds the clsact qdisc, accepting one that is already there.
pub(crate) fn add_clsact(iface: &str) -> Result<(), DataplaneError> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(()),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(DataplaneError::Clsact {
            iface: iface.to_owned(),
            source,
        }),
    }
}
