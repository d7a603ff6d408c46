//! Every environment value the chart can give the agent parses through the agent's own
//! configuration: the chart's defaults, an aws-node values file carried over, each
//! variable the agent reads set through `env:`, and `extraEnv`. `helm template` renders
//! the chart as a user's install would; the agent container's env is read back from it.

use std::{collections::HashMap, path::PathBuf, process::Command};

use serde_json::Value;
use vpc_ebpf_agent::config::Config;
use vpc_ebpf_tests::repo_root;

fn tool(var: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var).map_or_else(
        || {
            panic!(
                "{var} is not set ({what}); run the tests with `cargo xtask test`, which sets it"
            )
        },
        PathBuf::from,
    );
    assert!(p.exists(), "{var}={}: missing ({what})", p.display());
    p
}

/// The agent container's environment as the chart renders it with `args`.
fn rendered_env(args: &[&str]) -> Vec<Value> {
    let helm = tool("VPC_EBPF_HELM", "the helm binary");
    let chart = repo_root().join("charts/vpc-ebpf");
    let out = Command::new(helm)
        .args(["template", "vpc-ebpf"])
        .arg(&chart)
        .args([
            "-n",
            "kube-system",
            "--show-only",
            "templates/daemonset.yaml",
        ])
        .args(args)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // YAML to JSON with the lab's Python (PyYAML), so the tests need no YAML crate.
    let python = tool("VPC_EBPF_LAB_PYTHON", "the lab's Python");
    let mut child = Command::new(python)
        .args([
            "-c",
            "import sys, json, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running python");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &out.stdout).unwrap();
    drop(child.stdin.take());
    let json = child.wait_with_output().unwrap();
    assert!(json.status.success(), "the rendered DaemonSet is not YAML");
    let ds: Value = serde_json::from_slice(&json.stdout).unwrap();
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    let agent = containers
        .iter()
        .find(|c| c["name"] == "vpc-ebpf")
        .expect("the agent container");
    agent["env"].as_array().cloned().unwrap_or_default()
}

/// The env as the agent would see it (valueFrom entries get what the kubelet would
/// resolve them to).
fn as_lookup(env: &[Value]) -> HashMap<String, String> {
    env.iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_owned()
            } else {
                assert!(
                    e.get("valueFrom").is_some(),
                    "{e}: neither value nor valueFrom"
                );
                "ip-10-0-0-11.us-west-2.compute.internal".to_owned()
            };
            (name, value)
        })
        .collect()
}

fn parse(env: &HashMap<String, String>) -> Config {
    Config::from_lookup(&|k| env.get(k).cloned())
        .unwrap_or_else(|e| panic!("the agent refuses the chart's env {env:?}: {e}"))
}

#[test]
fn the_charts_defaults_start_the_agent_with_nothing_replaced() {
    let env = as_lookup(&rendered_env(&[]));
    let c = parse(&env);
    assert!(c.fallbacks.is_empty(), "{:?}", c.fallbacks);
    assert_eq!(
        c.node_name.as_deref(),
        Some("ip-10-0-0-11.us-west-2.compute.internal")
    );
    assert!(c.cni_conf_dir.is_some());
    // Every variable the chart sets is one the agent reads (no typo goes unnoticed).
    let known = c.to_json();
    for k in env.keys() {
        assert!(
            known.get(k).is_some(),
            "the chart sets {k}, which the agent does not read"
        );
    }
}

/// A values file written for aws-vpc-cni's chart (its `env:` block's variables with
/// their stock values) installs vpc-ebpf unchanged.
#[test]
fn an_aws_node_values_file_carries_over() {
    let values = std::env::temp_dir().join(format!("aws-node-values-{}.yaml", std::process::id()));
    std::fs::write(
        &values,
        r#"env:
  ADDITIONAL_ENI_TAGS: "{}"
  AWS_VPC_CNI_NODE_PORT_SUPPORT: "true"
  AWS_VPC_ENI_MTU: "9001"
  AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG: "false"
  AWS_VPC_K8S_CNI_EXTERNALSNAT: "false"
  AWS_VPC_K8S_CNI_LOG_FILE: "/host/var/log/aws-routed-eni/ipamd.log"
  AWS_VPC_K8S_CNI_LOGLEVEL: DEBUG
  AWS_VPC_K8S_CNI_RANDOMIZESNAT: "prng"
  AWS_VPC_K8S_CNI_VETHPREFIX: eni
  AWS_VPC_K8S_PLUGIN_LOG_FILE: "/var/log/aws-routed-eni/plugin.log"
  AWS_VPC_K8S_PLUGIN_LOG_LEVEL: DEBUG
  DISABLE_INTROSPECTION: "false"
  DISABLE_METRICS: "false"
  ENABLE_POD_ENI: "false"
  ENABLE_PREFIX_DELEGATION: "false"
  WARM_ENI_TARGET: "1"
  WARM_PREFIX_TARGET: "1"
  WARM_IP_TARGET: 5
  MINIMUM_IP_TARGET: 0
  DISABLE_NETWORK_RESOURCE_PROVISIONING: "false"
  ENABLE_IPv4: "true"
  ENABLE_IPv6: "false"
resources:
  requests:
    cpu: 25m
updateStrategy:
  type: RollingUpdate
  rollingUpdate:
    maxUnavailable: "10%"
podAnnotations:
  team: net
"#,
    )
    .unwrap();
    let env = as_lookup(&rendered_env(&["-f", values.to_str().unwrap()]));
    let _ = std::fs::remove_file(&values);
    let c = parse(&env);
    assert!(c.fallbacks.is_empty(), "{:?}", c.fallbacks);
    assert_eq!(
        c.targets.warm_ip,
        Some(5),
        "a number in values arrives as text"
    );
    assert_eq!(c.targets.minimum_ip, None, "0 is unset, as in aws-node");
    assert_eq!(c.log_level, "debug");
}

/// Each variable the agent reads, set through the chart's `env:` to a value other than
/// its default, arrives and is used.
#[test]
fn every_variable_set_through_env_is_used() {
    let examples: &[(&str, &str, Value)] = &[
        ("ENABLE_PREFIX_DELEGATION", "true", Value::from(true)),
        ("WARM_ENI_TARGET", "2", Value::from(2)),
        ("WARM_IP_TARGET", "3", Value::from(3)),
        ("MINIMUM_IP_TARGET", "10", Value::from(10)),
        ("MAX_ENI", "2", Value::from(2)),
        ("MAX_PODS", "58", Value::from(58)),
        ("IP_COOLDOWN_PERIOD", "60", Value::from(60)),
        ("CLUSTER_NAME", "prod", Value::from("prod")),
        ("DISABLE_LEAKED_ENI_CLEANUP", "true", Value::from(true)),
        ("VPC_EBPF_LEAKED_ENI_AGE", "600", Value::from(600)),
        ("VPC_EBPF_SUBNET_FULL_PAUSE", "30", Value::from(30)),
        ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "true", Value::from(true)),
        ("ENABLE_BANDWIDTH_PLUGIN", "true", Value::from(true)),
        (
            "VPC_EBPF_SNAT_PORT_RANGE",
            "20000-39999",
            Value::from("20000-39999"),
        ),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "veb", Value::from("veb")),
        ("AWS_VPC_ENI_MTU", "1500", Value::from(1500)),
        ("POD_MTU", "1400", Value::from(1400)),
        (
            "AWS_EC2_ENDPOINT",
            "https://ec2.vpce.example",
            Value::from("https://ec2.vpce.example"),
        ),
        ("VPC_EBPF_DATAPLANE", "false", Value::from(false)),
        ("VPC_EBPF_NAT_MAX_ENTRIES", "65536", Value::from(65536)),
        (
            "METRICS_BIND_ADDRESS",
            "0.0.0.0:61678",
            Value::from("0.0.0.0:61678"),
        ),
        (
            "INTROSPECTION_BIND_ADDRESS",
            "127.0.0.1:61680",
            Value::from("127.0.0.1:61680"),
        ),
        ("AWS_VPC_K8S_CNI_LOGLEVEL", "WARN", Value::from("warn")),
        ("ANNOTATE_POD_IP", "true", Value::from(true)),
        ("DISABLE_METRICS", "true", Value::from(true)),
        ("DISABLE_INTROSPECTION", "true", Value::from(true)),
    ];
    let mut args = Vec::new();
    for (k, v, _) in examples {
        args.push("--set-string".to_owned());
        args.push(format!("env.{k}={v}"));
    }
    // JSON and lists through extraEnv, as `--set` reads braces and commas itself.
    args.push("--set-json".to_owned());
    args.push(r#"extraEnv[0]={"name":"ADDITIONAL_ENI_TAGS","value":"{\"team\":\"net\"}"}"#.into());
    args.push("--set-json".to_owned());
    args.push(
        r#"extraEnv[1]={"name":"AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS","value":"10.9.0.0/16,10.10.0.0/16"}"#
            .into(),
    );
    args.push("--set-json".to_owned());
    args.push(r#"extraEnv[2]={"name":"VPC_EBPF_SERVICE_CIDRS","value":"172.20.0.0/16"}"#.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = as_lookup(&rendered_env(&args));
    let c = parse(&env);
    assert!(c.fallbacks.is_empty(), "{:?}", c.fallbacks);
    let used = c.to_json();
    for (k, _, want) in examples {
        assert_eq!(&used[*k], want, "{k}");
    }
    assert_eq!(used["ADDITIONAL_ENI_TAGS"]["team"], "net");
    assert_eq!(
        used["AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS"],
        serde_json::json!(["10.9.0.0/16", "10.10.0.0/16"])
    );
    assert_eq!(
        used["VPC_EBPF_SERVICE_CIDRS"],
        serde_json::json!(["172.20.0.0/16"])
    );
}

/// aws-vpc-cni's `eniConfig` values make one ENIConfig per zone, named after it; the
/// CRD ships in `crds/`; a request to create them without subnets fails naming the value.
#[test]
fn eniconfig_values_make_one_eniconfig_per_zone() {
    let helm = tool("VPC_EBPF_HELM", "the helm binary");
    let chart = repo_root().join("charts/vpc-ebpf");
    let render = |extra: &[&str]| {
        Command::new(&helm)
            .args(["template", "vpc-ebpf"])
            .arg(&chart)
            .args(["-n", "kube-system", "--include-crds"])
            .args(extra)
            .output()
            .expect("running helm")
    };
    let out = render(&[
        "--set",
        "eniConfig.create=true",
        "--set",
        "eniConfig.subnets.us-west-2a.id=subnet-0a",
        "--set",
        "eniConfig.subnets.us-west-2b.id=subnet-0b",
        "--set",
        "eniConfig.subnets.us-west-2b.securityGroups={sg-01,sg-02}",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("name: eniconfigs.crd.k8s.amazonaws.com"),
        "no CRD"
    );
    let docs: Vec<&str> = text
        .split("\n---")
        .filter(|d| d.contains("\nkind: ENIConfig\n"))
        .collect();
    assert_eq!(docs.len(), 2, "{text}");
    assert!(docs[0].contains("name: \"us-west-2a\"") && docs[0].contains("subnet: \"subnet-0a\""));
    assert!(!docs[0].contains("securityGroups"), "{}", docs[0]);
    assert!(
        docs[1].contains("- \"sg-01\"") && docs[1].contains("- \"sg-02\""),
        "{}",
        docs[1]
    );
    // Off by default: no ENIConfig.
    let out = render(&[]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("\nkind: ENIConfig\n"));
    let out = render(&["--set", "eniConfig.create=true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("eniConfig.subnets is empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
