//! The agent's IMDSv2 client and discovery against the lab's IMDS, from inside a node.

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use vpc_ebpf_agent::aws::imds::{DEFAULT_ENDPOINT, Imds, ImdsError};
use vpc_ebpf_tests::{lab::Lab, netns::NetNs, netns::run_in};

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn discovery_matches_ec2_and_follows_attachments() {
    let lab = Lab::up("im", 1);
    let node = lab.status["nodes"][0].clone();
    let endpoint = lab.str("ec2_endpoint").to_owned();
    let subnet = lab.str("subnet_id").to_owned();
    run_in(&lab.ns("node1"), || {
        block_on(async {
            let mut imds = Imds::new(DEFAULT_ENDPOINT);
            let md = imds.discover().await.expect("discover");
            assert_eq!(md.instance_id, node["instance_id"].as_str().unwrap());
            assert_eq!(md.instance_type, "m5.large");
            assert_eq!(md.region, "us-west-2");
            assert_eq!(md.enis.len(), 1);
            let primary = &md.enis[0];
            assert_eq!(primary.device_index, 0);
            assert_eq!(primary.mac, md.primary_mac);
            assert_eq!(primary.eni_id, node["enis"][0]["id"].as_str().unwrap());
            assert_eq!(
                primary.ipv4s[0].to_string(),
                node["primary_ip"].as_str().unwrap()
            );
            assert_eq!(primary.subnet_cidr, "10.0.0.0/20");
            // The lab VPC has a secondary CIDR for pods, as EKS users add.
            assert_eq!(primary.vpc_cidrs, ["10.0.0.0/16", "100.64.0.0/16"]);
            assert!(!primary.security_groups.is_empty());
            assert!(primary.prefixes.is_empty());

            // A second ENI with two secondaries and a prefix, attached through EC2.
            let ec2 = aws_sdk_ec2::Client::from_conf(
                aws_sdk_ec2::Config::builder()
                    .behavior_version(BehaviorVersion::latest())
                    .region(Region::new("us-west-2"))
                    .endpoint_url(&endpoint)
                    .credentials_provider(Credentials::new("lab", "lab", None, None, "lab"))
                    .build(),
            );
            let created = ec2
                .create_network_interface()
                .subnet_id(&subnet)
                .secondary_private_ip_address_count(2)
                .ipv4_prefix_count(1)
                .send()
                .await
                .unwrap();
            let ni = created.network_interface().unwrap();
            ec2.attach_network_interface()
                .network_interface_id(ni.network_interface_id().unwrap())
                .instance_id(&md.instance_id)
                .device_index(1)
                .send()
                .await
                .unwrap();
            let md = imds.discover().await.unwrap();
            assert_eq!(md.enis.len(), 2);
            let second = &md.enis[1];
            assert_eq!(second.device_index, 1);
            assert_eq!(second.eni_id, ni.network_interface_id().unwrap());
            assert_eq!(second.mac, ni.mac_address().unwrap());
            assert_eq!(second.ipv4s.len(), 3);
            assert_eq!(
                second.ipv4s[0].to_string(),
                ni.private_ip_address().unwrap()
            );
            assert_eq!(
                second.prefixes,
                [ni.ipv4_prefixes()[0].ipv4_prefix().unwrap().to_owned()]
            );
        });
    });
}

#[test]
fn no_imds_is_a_clear_error_not_a_hang() {
    let ns = NetNs::new("noimds");
    ns.run(|| {
        block_on(async {
            let started = std::time::Instant::now();
            let err = Imds::new(DEFAULT_ENDPOINT).discover().await.unwrap_err();
            assert!(
                matches!(err, ImdsError::Http { .. } | ImdsError::Timeout { .. }),
                "{err}"
            );
            assert!(err.to_string().contains("IMDS"), "{err}");
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
        });
    });
}
