//! The conflist the chart installs parses as the plugin's own config.

#[test]
fn shipped_conflist_is_valid() {
    let raw = include_str!("../10-vpc-ebpf.conflist");
    let list: serde_json::Value = serde_json::from_str(raw).unwrap();
    let mut plugin = list["plugins"][0].clone();
    // libcni injects these from the list into each plugin's config.
    plugin["cniVersion"] = list["cniVersion"].clone();
    plugin["name"] = list["name"].clone();
    let conf = vpc_ebpf_cni::spec::config::NetConf::parse(plugin.to_string().as_bytes()).unwrap();
    assert_eq!(conf.veth_prefix, "eni");
    assert_eq!(
        conf.agent_socket,
        vpc_ebpf_cni::spec::config::DEFAULT_AGENT_SOCKET
    );
}
