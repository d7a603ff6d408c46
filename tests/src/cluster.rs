//! A Kubernetes cluster on a lab of a test's own: the lab's control plane and nodes (real
//! kube-apiserver, kubelet, containerd, kube-proxy), the images `cargo xtask test` built,
//! vpc-ebpf installed with the chart. Torn down with the lab.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::lab::Lab;

/// What a cluster test needs that `cargo xtask test` (or `cargo xtask lab`) prepares.
pub struct Inputs {
    pub kube_bin: PathBuf,
    pub images: PathBuf,
    pub tag: String,
    pub helm: PathBuf,
}

fn env_path(var: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var).map_or_else(
        || {
            panic!(
                "{var} is not set: {what}; run the cluster tests with `cargo xtask test`, \
                 which builds and sets it"
            )
        },
        PathBuf::from,
    );
    assert!(p.exists(), "{var}={}: missing ({what})", p.display());
    p
}

impl Inputs {
    pub fn from_env() -> Self {
        Self {
            kube_bin: env_path("VPC_EBPF_K8S_BIN", "the Kubernetes binaries"),
            images: env_path("VPC_EBPF_IMAGES", "the images' OCI layouts"),
            tag: std::env::var("VPC_EBPF_IMAGE_TAG")
                .expect("VPC_EBPF_IMAGE_TAG is not set: run the tests with `cargo xtask test`"),
            helm: env_path("VPC_EBPF_HELM", "the helm binary"),
        }
    }
}

pub struct Cluster {
    pub lab: Lab,
    pub inputs: Inputs,
}

/// The result of a command that may fail.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(o: Output) -> Self {
        Self {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Cluster {
    /// A two-node lab with its cluster up (control plane, registry with the images,
    /// kubelets); vpc-ebpf not installed yet.
    pub fn up(tag: &str) -> Self {
        Self::up_in_zones(tag, 1)
    }

    /// Two nodes, one per zone when `zones` is 2.
    pub fn up_in_zones(tag: &str, zones: u32) -> Self {
        let inputs = Inputs::from_env();
        let lab = Lab::up_with(tag, 2, &["--zones", &zones.to_string()]);
        let c = Self { lab, inputs };
        c.vpclab_cluster("up", &[]);
        c
    }

    fn vpclab_cluster(&self, action: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "cluster",
            action,
            "--kube-bin",
            self.inputs.kube_bin.to_str().unwrap(),
            "--images",
            self.inputs.images.to_str().unwrap(),
            "--chart",
        ];
        let chart = crate::repo_root().join("charts/vpc-ebpf");
        let chart = chart.display().to_string();
        args.push(&chart);
        args.extend(extra);
        if !extra.contains(&"--tag") {
            args.extend(["--tag", &self.inputs.tag]);
        }
        self.lab.vpclab(&args)
    }

    /// Pushes the images again under another tag (an "upgrade" to a new release).
    pub fn push_as(&self, tag: &str) {
        self.vpclab_cluster("push", &["--tag", tag]);
    }

    /// `helm upgrade --install` of the chart with the lab's values and `env`; waits for
    /// the DaemonSet's rollout.
    pub fn install(&self, tag: &str, env: &[(&str, &str)]) {
        self.install_with(tag, env, &[]);
    }

    /// [`Self::install`] with chart values (`helm --set PATH=VALUE`).
    pub fn install_with(&self, tag: &str, env: &[(&str, &str)], sets: &[String]) {
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut extra = vec!["--tag", tag];
        for e in &env {
            extra.extend(["--agent-env", e]);
        }
        for s in sets {
            extra.extend(["--helm-set", s]);
        }
        self.vpclab_cluster("install", &extra);
    }

    pub fn stop_apiserver(&self) {
        self.vpclab_cluster("stop-apiserver", &[]);
    }

    pub fn start_apiserver(&self) {
        self.vpclab_cluster("start-apiserver", &[]);
    }

    fn run_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/vpc-ebpf-lab/{}", self.lab.prefix))
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.run_dir().join("cluster/pki/admin.kubeconfig")
    }

    /// A command run in the control plane's namespace (where the API server is reachable).
    pub fn in_cp(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.lab.ns("cp")]).arg(program);
        c
    }

    pub fn try_kubectl(&self, args: &[&str]) -> Ran {
        self.in_cp(&self.inputs.kube_bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(args)
            .output()
            .expect("kubectl")
            .into()
    }

    /// kubectl; panics with its error when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let r = self.try_kubectl(args);
        assert!(r.ok, "kubectl {}: {}", args.join(" "), r.stderr);
        r.stdout
    }

    pub fn kubectl_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&a)).expect("kubectl -o json")
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) {
        use std::io::Write as _;
        let mut child = self
            .in_cp(&self.inputs.kube_bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl apply");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .unwrap();
        let out: Ran = child.wait_with_output().unwrap().into();
        assert!(out.ok, "kubectl apply: {}", out.stderr);
    }

    pub fn helm(&self, args: &[&str]) -> Ran {
        self.in_cp(&self.inputs.helm)
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(args)
            .output()
            .expect("helm")
            .into()
    }

    /// The pods of `namespace` matching `selector`.
    pub fn pods(&self, namespace: &str, selector: &str) -> Vec<Value> {
        self.kubectl_json(&["-n", namespace, "get", "pods", "-l", selector])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `n` pods match and all are Ready; returns them.
    pub fn wait_ready(
        &self,
        namespace: &str,
        selector: &str,
        n: usize,
        within: Duration,
    ) -> Vec<Value> {
        let t0 = Instant::now();
        loop {
            let pods = self.pods(namespace, selector);
            if pods.len() == n && pods.iter().all(is_ready) {
                return pods;
            }
            assert!(
                t0.elapsed() < within,
                "{n} pods {selector} in {namespace} not Ready within {within:?}: {}",
                self.try_kubectl(&["-n", namespace, "get", "pods", "-o", "wide"])
                    .stdout
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `kubectl exec` in `pod`.
    pub fn exec(&self, namespace: &str, pod: &str, argv: &[&str]) -> Ran {
        let mut all = vec!["-n", namespace, "exec", pod, "--"];
        all.extend(argv);
        self.try_kubectl(&all)
    }

    /// The workload's TCP/UDP hello from `pod` to `addr`: what the server saw, or `None`.
    pub fn hello(&self, namespace: &str, pod: &str, kind: &str, addr: &str) -> Option<String> {
        let r = self.exec(namespace, pod, &["vpc-ebpf-testsrv", kind, addr]);
        let v: Value = serde_json::from_str(r.stdout.lines().last()?).ok()?;
        v["answer"].as_str().map(str::to_owned)
    }

    /// The image reference of the workload at the cluster's tag.
    pub fn workload_image(&self) -> String {
        format!("10.0.254.10:5000/workload:{}", self.inputs.tag)
    }

    /// The nodes' names, in lab order.
    pub fn node_names(&self) -> Vec<String> {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(self.run_dir().join("cluster/cluster.json")).unwrap(),
        )
        .unwrap();
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// A command run on lab node `n` (1-based): its network and mount namespaces.
    pub fn on_node(&self, n: u32, argv: &[&str]) -> Ran {
        let holder =
            std::fs::read_to_string(self.run_dir().join(format!("node{n}-holder.pid"))).unwrap();
        Command::new("nsenter")
            .arg(format!(
                "--net=/run/netns/{}",
                self.lab.ns(&format!("node{n}"))
            ))
            .arg(format!("--mount=/proc/{}/ns/mnt", holder.trim()))
            .arg("--")
            .args(argv)
            .output()
            .expect("nsenter")
            .into()
    }

    /// GET on the agent of node `n` (introspection :61679 or metrics :61678).
    pub fn agent_get(&self, n: u32, port: u16, path: &str) -> Option<String> {
        let url = format!("http://127.0.0.1:{port}{path}");
        let r = Command::new("ip")
            .args(["netns", "exec", &self.lab.ns(&format!("node{n}"))])
            .args(["python3", "-c", "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())", &url])
            .output()
            .ok()?;
        r.status
            .success()
            .then(|| String::from_utf8_lossy(&r.stdout).into_owned())
    }
}

pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

pub fn name(pod: &Value) -> &str {
    pod["metadata"]["name"].as_str().unwrap_or_default()
}

pub fn pod_ip(pod: &Value) -> &str {
    pod["status"]["podIP"].as_str().unwrap_or_default()
}
