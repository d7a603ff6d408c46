//! Host-side veth names, compatible with Amazon VPC CNI's so tooling that finds a pod's
//! veth by name keeps working.

use sha1::{Digest, Sha1};

/// `<prefix>` + the first 11 hex digits of sha1("<namespace>.<pod>").
pub fn host_veth_name(prefix: &str, namespace: &str, pod: &str) -> String {
    let digest = Sha1::digest(format!("{namespace}.{pod}").as_bytes());
    let hex: String = digest.iter().fold(String::new(), |mut acc, b| {
        use std::fmt::Write as _;
        let _ = write!(acc, "{b:02x}");
        acc
    });
    format!("{prefix}{}", &hex[..11])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_vpc_cni_naming() {
        // The expected digest comes from coreutils sha1sum, independent of the sha1 crate.
        let name = host_veth_name("eni", "default", "nginx");
        assert_eq!(name.len(), 14);
        assert!(name.starts_with("eni"));
        assert_eq!(name, format!("eni{}", &sha1_hex("default.nginx")[..11]));
        assert_ne!(name, host_veth_name("eni", "default", "nginx2"));
    }

    fn sha1_hex(s: &str) -> String {
        let out = std::process::Command::new("sha1sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().unwrap().write_all(s.as_bytes())?;
                c.wait_with_output()
            })
            .expect("sha1sum");
        String::from_utf8(out.stdout).unwrap()[..40].to_owned()
    }
}
