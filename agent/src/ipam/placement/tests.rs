//! Written from aws-node's documentation of custom networking and subnet discovery
//! (EKS user guide "Configure subnet selection for Pod IP addresses", "custom networking";
//! aws-node's README for ENI_CONFIG_LABEL_DEF / ENI_CONFIG_ANNOTATION_DEF).

use super::*;

fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn subnet(id: &str, cidr: &str, zone: &str, available: u32, tags: &[(&str, &str)]) -> SubnetInfo {
    SubnetInfo {
        id: id.into(),
        cidr: cidr.parse().unwrap(),
        availability_zone: zone.into(),
        vpc_id: "vpc-1".into(),
        available,
        tags: map(tags),
    }
}

/// (name wanted, labels, annotations, label key, annotation key, source wanted)
type Case = (
    &'static str,
    BTreeMap<String, String>,
    BTreeMap<String, String>,
    &'static str,
    &'static str,
    &'static str,
);

const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[test]
fn the_eniconfig_is_chosen_in_aws_nodes_order() {
    let labels = map(&[
        (LABEL_EXTERNAL_ENICONFIG, "external"),
        (ZONE_LABEL, "us-west-2a"),
        (DEFAULT_ENICONFIG_KEY, "by-label"),
    ]);
    let annotations = map(&[(DEFAULT_ENICONFIG_KEY, "by-annotation")]);
    let cases: [Case; 6] = [
        // The external label wins over everything.
        (
            "external",
            labels.clone(),
            annotations.clone(),
            DEFAULT_ENICONFIG_KEY,
            DEFAULT_ENICONFIG_KEY,
            "label vpc.amazonaws.com/externalEniConfig",
        ),
        // Then the annotation.
        (
            "by-annotation",
            map(&[(DEFAULT_ENICONFIG_KEY, "by-label")]),
            annotations.clone(),
            DEFAULT_ENICONFIG_KEY,
            DEFAULT_ENICONFIG_KEY,
            "annotation k8s.amazonaws.com/eniConfig",
        ),
        // Then the label.
        (
            "by-label",
            map(&[(DEFAULT_ENICONFIG_KEY, "by-label")]),
            map(&[]),
            DEFAULT_ENICONFIG_KEY,
            DEFAULT_ENICONFIG_KEY,
            "label k8s.amazonaws.com/eniConfig",
        ),
        // ENI_CONFIG_LABEL_DEF=topology.kubernetes.io/zone: one ENIConfig per zone.
        (
            "us-west-2a",
            map(&[(ZONE_LABEL, "us-west-2a")]),
            map(&[]),
            ZONE_LABEL,
            DEFAULT_ENICONFIG_KEY,
            "label topology.kubernetes.io/zone",
        ),
        // A label the keys do not name is not read.
        (
            "default",
            map(&[(ZONE_LABEL, "us-west-2a")]),
            map(&[]),
            DEFAULT_ENICONFIG_KEY,
            DEFAULT_ENICONFIG_KEY,
            "default",
        ),
        // Present but empty still wins (and then fails to resolve, loudly).
        (
            "",
            map(&[(DEFAULT_ENICONFIG_KEY, "")]),
            map(&[]),
            DEFAULT_ENICONFIG_KEY,
            DEFAULT_ENICONFIG_KEY,
            "label k8s.amazonaws.com/eniConfig",
        ),
    ];
    for (want, labels, annotations, label_key, annotation_key, source) in cases {
        let got = eniconfig_name(&labels, &annotations, label_key, annotation_key);
        assert_eq!((got.name.as_str(), got.source.as_str()), (want, source));
    }
}

#[test]
fn an_eniconfig_gives_its_subnet_and_groups_or_the_primary_enis() {
    let choice = EniConfigChoice {
        name: "us-west-2a".into(),
        source: "label topology.kubernetes.io/zone".into(),
    };
    let pods = subnet("subnet-pods", "100.64.0.0/19", "us-west-2a", 8000, &[]);
    let primary = vec!["sg-node".to_owned()];
    let spec = EniConfigSpec {
        subnet: "subnet-pods".into(),
        security_groups: vec!["sg-pods".into()],
    };
    let t = check_eniconfig(&choice, &spec, Some(&pods), "vpc-1", "us-west-2a", &primary).unwrap();
    assert_eq!(t.subnet_id, "subnet-pods");
    assert_eq!(t.subnet_cidr.to_string(), "100.64.0.0/19");
    assert_eq!(t.security_groups, vec!["sg-pods"]);
    let no_groups = EniConfigSpec {
        security_groups: vec![],
        ..spec.clone()
    };
    let t = check_eniconfig(
        &choice,
        &no_groups,
        Some(&pods),
        "vpc-1",
        "us-west-2a",
        &primary,
    )
    .unwrap();
    assert_eq!(t.security_groups, vec!["sg-node"]);
}

#[test]
fn a_wrong_eniconfig_says_which_and_what_is_wrong() {
    let choice = EniConfigChoice {
        name: "us-west-2b".into(),
        source: "label topology.kubernetes.io/zone".into(),
    };
    let spec = EniConfigSpec {
        subnet: "subnet-b".into(),
        security_groups: vec![],
    };
    let in_b = subnet("subnet-b", "100.64.32.0/19", "us-west-2b", 8000, &[]);
    let e = check_eniconfig(&choice, &spec, Some(&in_b), "vpc-1", "us-west-2a", &[]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("\"us-west-2b\"")
            && msg.contains("subnet-b in us-west-2b")
            && msg.contains("node is in us-west-2a"),
        "{msg}"
    );
    let e = check_eniconfig(&choice, &spec, None, "vpc-1", "us-west-2b", &[]).unwrap_err();
    assert!(e.to_string().contains("which EC2 does not have"), "{e}");
    let e = check_eniconfig(
        &choice,
        &EniConfigSpec::default(),
        None,
        "vpc-1",
        "us-west-2b",
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("no spec.subnet"), "{e}");
    let mut other_vpc = in_b.clone();
    other_vpc.vpc_id = "vpc-2".into();
    let e =
        check_eniconfig(&choice, &spec, Some(&other_vpc), "vpc-1", "us-west-2b", &[]).unwrap_err();
    assert!(e.to_string().contains("not of the node's VPC vpc-1"), "{e}");
}

#[test]
fn discovery_takes_tagged_subnets_most_free_first() {
    let zone = [
        subnet("subnet-node", "10.0.0.0/20", "a", 4000, &[]),
        subnet(
            "subnet-small",
            "100.64.0.0/24",
            "a",
            200,
            &[(TAG_CNI_ROLE, "1")],
        ),
        subnet(
            "subnet-big",
            "100.64.64.0/19",
            "a",
            8000,
            &[(TAG_CNI_ROLE, "1")],
        ),
        // Any value but 0 counts as tagged.
        subnet(
            "subnet-yes",
            "100.64.1.0/24",
            "a",
            250,
            &[(TAG_CNI_ROLE, "yes")],
        ),
        subnet(
            "subnet-off",
            "100.64.2.0/24",
            "a",
            9000,
            &[(TAG_CNI_ROLE, "0")],
        ),
        // Untagged subnets other than the node's are not used.
        subnet("subnet-untagged", "100.64.3.0/24", "a", 9999, &[]),
    ];
    let groups = vec!["sg-node".to_owned()];
    let got: Vec<String> = discovery_targets(&zone, "subnet-node", None, &groups)
        .into_iter()
        .map(|t| t.subnet_id)
        .collect();
    assert_eq!(
        got,
        ["subnet-big", "subnet-node", "subnet-yes", "subnet-small"]
    );
    // The node's subnet tagged 0 drops out, and its ENIs hold no pod addresses.
    let mut off = zone.to_vec();
    off[0].tags = map(&[(TAG_CNI_ROLE, "0")]);
    let got: Vec<String> = discovery_targets(&off, "subnet-node", None, &groups)
        .into_iter()
        .map(|t| t.subnet_id)
        .collect();
    assert_eq!(got, ["subnet-big", "subnet-yes", "subnet-small"]);
    assert!(excluded(&off[0], None));
    assert!(excluded(&zone[4], None));
    assert!(!excluded(&zone[0], None) && !excluded(&zone[1], None) && !excluded(&zone[5], None));
}

#[test]
fn cluster_tags_keep_a_subnet_to_its_clusters() {
    let mine = format!("{TAG_CLUSTER_PREFIX}prod");
    let theirs = format!("{TAG_CLUSTER_PREFIX}dev");
    let zone = [
        subnet(
            "subnet-mine",
            "100.64.0.0/24",
            "a",
            100,
            &[(TAG_CNI_ROLE, "1"), (&mine, "1")],
        ),
        subnet(
            "subnet-theirs",
            "100.64.1.0/24",
            "a",
            300,
            &[(TAG_CNI_ROLE, "1"), (&theirs, "1")],
        ),
        subnet(
            "subnet-shared",
            "100.64.2.0/24",
            "a",
            200,
            &[(TAG_CNI_ROLE, "1"), (&theirs, "1"), (&mine, "1")],
        ),
        subnet(
            "subnet-anyone",
            "100.64.3.0/24",
            "a",
            50,
            &[(TAG_CNI_ROLE, "1")],
        ),
    ];
    let ids = |cluster| -> Vec<String> {
        discovery_targets(&zone, "subnet-node", cluster, &[])
            .into_iter()
            .map(|t| t.subnet_id)
            .collect()
    };
    assert_eq!(
        ids(Some("prod")),
        ["subnet-shared", "subnet-mine", "subnet-anyone"]
    );
    // Without CLUSTER_NAME the cluster tags are not checked.
    assert_eq!(
        ids(None),
        [
            "subnet-theirs",
            "subnet-shared",
            "subnet-mine",
            "subnet-anyone"
        ]
    );
    // A pod subnet of another cluster is excluded for this one's ENIs.
    assert!(excluded(&zone[1], Some("prod")));
    assert!(!excluded(&zone[2], Some("prod")));
}

#[test]
fn max_pods_follows_the_eks_formula() {
    // m5.large: 3 ENIs, 10 addresses each.
    assert_eq!(max_pods(3, 10, false, false), 29);
    assert_eq!(max_pods(3, 10, false, true), 20);
    assert_eq!(max_pods(3, 10, true, false), 434);
    assert_eq!(max_pods(3, 10, true, true), 290);
    // m5.4xlarge: 8 ENIs, 30 addresses.
    assert_eq!(max_pods(8, 30, false, false), 234);
    assert_eq!(max_pods(8, 30, false, true), 205);
}
