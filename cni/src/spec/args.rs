//! CNI_ARGS: `KEY=VALUE` pairs separated by `;`, as kubelet passes pod identity.

use super::{CniError, ErrorCode};

/// The pod identity kubelet passes in CNI_ARGS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub infra_container_id: Option<String>,
    pub uid: Option<String>,
}

const KNOWN: [&str; 5] = [
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
];

/// Parses CNI_ARGS. Unknown keys are an error unless `IgnoreUnknown` is true, as libcni's
/// argument loader has it.
pub fn parse(raw: &str) -> Result<PodArgs, CniError> {
    let invalid = |why: String| {
        CniError::new(
            ErrorCode::InvalidEnvironment,
            "invalid CNI_ARGS",
            format!("{why}; CNI_ARGS must be KEY=VALUE pairs separated by ';'"),
        )
    };
    let mut pairs = Vec::new();
    for part in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| invalid(format!("{part:?} has no '='")))?;
        if k.is_empty() {
            return Err(invalid(format!("{part:?} has an empty key")));
        }
        pairs.push((k, v));
    }
    let ignore_unknown = pairs.iter().any(|(k, v)| {
        *k == "IgnoreUnknown" && matches!(v.to_ascii_lowercase().as_str(), "1" | "true")
    });
    let mut out = PodArgs::default();
    for (k, v) in pairs {
        let value = Some(v.to_owned()).filter(|v| !v.is_empty());
        match k {
            "K8S_POD_NAMESPACE" => out.namespace = value,
            "K8S_POD_NAME" => out.name = value,
            "K8S_POD_INFRA_CONTAINER_ID" => out.infra_container_id = value,
            "K8S_POD_UID" => out.uid = value,
            "IgnoreUnknown" => {}
            other if !ignore_unknown => {
                return Err(invalid(format!(
                    "unknown key {other:?} (known: {}; add IgnoreUnknown=1 to allow others)",
                    KNOWN.join(", ")
                )));
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_style_args() {
        let a = parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;EXTRA=x",
        )
        .unwrap();
        assert_eq!(a.namespace.as_deref(), Some("default"));
        assert_eq!(a.name.as_deref(), Some("web-0"));
        assert_eq!(a.infra_container_id.as_deref(), Some("abc"));
        assert_eq!(a.uid.as_deref(), Some("u-1"));
        assert_eq!(parse("").unwrap(), PodArgs::default());
    }

    #[test]
    fn malformed_or_unknown_without_ignore_is_code_4() {
        for bad in ["K8S_POD_NAME", "=x", "EXTRA=1", "IgnoreUnknown=0;EXTRA=1"] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidEnvironment, "{bad}");
        }
        assert!(parse("IgnoreUnknown=true;EXTRA=1").is_ok());
    }
}
