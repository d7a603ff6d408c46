//! The lab's EC2 front as the Rust aws-sdk-ec2 client (the agent's client) sees it: its
//! responses, prefixes and AWS error codes parse, from inside the lab's namespaces.

use aws_sdk_ec2::{
    Client,
    config::{BehaviorVersion, Credentials, Region, retry::RetryConfig},
    error::ProvideErrorMetadata as _,
};
use vpc_ebpf_tests::{lab::Lab, netns::run_in};

fn client(endpoint: &str) -> Client {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-west-2"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("lab", "lab", None, None, "lab"))
        // Every injected error is seen as sent.
        .retry_config(RetryConfig::standard().with_max_attempts(1))
        .build();
    Client::from_conf(conf)
}

/// ENI create/assign/attach/describe with prefixes, and AWS error codes, through the SDK.
async fn eni_shapes_and_errors(ec2: &Client, subnet: &str, instance: &str) -> (String, String) {
    let types = ec2
        .describe_instance_types()
        .instance_types(aws_sdk_ec2::types::InstanceType::M5Large)
        .send()
        .await
        .expect("DescribeInstanceTypes");
    let net = types.instance_types()[0].network_info().unwrap();
    assert_eq!(net.maximum_network_interfaces(), Some(3));
    assert_eq!(net.ipv4_addresses_per_interface(), Some(10));

    let created = ec2
        .create_network_interface()
        .subnet_id(subnet)
        .secondary_private_ip_address_count(2)
        .ipv4_prefix_count(1)
        .send()
        .await
        .expect("CreateNetworkInterface");
    let ni = created.network_interface().unwrap();
    assert_eq!(ni.private_ip_addresses().len(), 3);
    assert_eq!(ni.ipv4_prefixes().len(), 1);
    let eni = ni.network_interface_id().unwrap().to_owned();

    let assigned = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&eni)
        .ipv4_prefix_count(1)
        .send()
        .await
        .expect("AssignPrivateIpAddresses");
    let prefix = assigned.assigned_ipv4_prefixes()[0]
        .ipv4_prefix()
        .unwrap()
        .to_owned();
    assert!(prefix.ends_with("/28"), "{prefix}");

    ec2.attach_network_interface()
        .network_interface_id(&eni)
        .instance_id(instance)
        .device_index(1)
        .send()
        .await
        .expect("AttachNetworkInterface");
    let described = ec2
        .describe_network_interfaces()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("attachment.instance-id")
                .values(instance)
                .build(),
        )
        .send()
        .await
        .expect("DescribeNetworkInterfaces");
    let ours = described
        .network_interfaces()
        .iter()
        .find(|n| n.network_interface_id() == Some(eni.as_str()))
        .expect("attached ENI listed for the instance");
    assert_eq!(ours.attachment().unwrap().device_index(), Some(1));
    assert_eq!(ours.ipv4_prefixes().len(), 2);
    assert!(!ours.mac_address().unwrap_or_default().is_empty());

    // AWS error codes come through the SDK's error metadata.
    let second = ec2
        .create_network_interface()
        .subnet_id(subnet)
        .send()
        .await
        .unwrap();
    let second = second
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_owned();
    let err = ec2
        .attach_network_interface()
        .network_interface_id(&second)
        .instance_id(instance)
        .device_index(1)
        .send()
        .await
        .expect_err("device index 1 is taken");
    assert_eq!(err.code(), Some("InvalidParameterValue"));
    let err = ec2
        .delete_network_interface()
        .network_interface_id(&eni)
        .send()
        .await
        .expect_err("attached ENIs cannot be deleted");
    assert_eq!(err.code(), Some("InvalidNetworkInterface.InUse"));
    (eni, second)
}

#[test]
fn aws_sdk_ec2_reads_the_front() {
    let lab = Lab::up("rs", 1);
    let node = &lab.status["nodes"][0];
    let instance = node["instance_id"].as_str().unwrap().to_owned();
    let subnet = lab.str("subnet_id").to_owned();
    let endpoint = lab.str("ec2_endpoint").to_owned();

    // From the node, as the agent will call it.
    let (eni, second) = run_in(&lab.ns("node1"), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { eni_shapes_and_errors(&client(&endpoint), &subnet, &instance).await })
    });

    lab.vpclab(&[
        "fault",
        "--action",
        "AssignPrivateIpAddresses",
        "--code",
        "RequestLimitExceeded",
        "--count",
        "1",
    ]);
    run_in(&lab.ns("node1"), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ec2 = client(&endpoint);
            let assign = || {
                ec2.assign_private_ip_addresses()
                    .network_interface_id(&eni)
                    .secondary_private_ip_address_count(1)
                    .send()
            };
            let err = assign().await.expect_err("throttled");
            assert_eq!(err.code(), Some("RequestLimitExceeded"));
            let ok = assign().await.expect("the fault fired once");
            assert_eq!(ok.assigned_private_ip_addresses().len(), 1);
            ec2.delete_network_interface()
                .network_interface_id(&second)
                .send()
                .await
                .expect("an unattached ENI can be deleted");
        });
    });
}
