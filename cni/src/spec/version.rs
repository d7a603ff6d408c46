//! CNI spec versions this plugin speaks.

use std::fmt;

use super::{CniError, ErrorCode};

/// Versions accepted in configs, oldest first; results are rendered in the requested one.
pub const SUPPORTED: [Version; 3] = [Version::V0_4_0, Version::V1_0_0, Version::V1_1_0];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub const LATEST: Self = Self::V1_1_0;

    pub fn parse(s: &str) -> Result<Self, CniError> {
        match s {
            "0.4.0" => Ok(Self::V0_4_0),
            "1.0.0" => Ok(Self::V1_0_0),
            "1.1.0" => Ok(Self::V1_1_0),
            other => Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("cniVersion {other:?} is not supported"),
                format!(
                    "vpc-ebpf-cni supports {}; set cniVersion in the network config to one of them",
                    supported_list()
                ),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn has_status_and_gc(self) -> bool {
        self >= Self::V1_1_0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn supported_list() -> String {
    SUPPORTED
        .iter()
        .map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_and_refuses_others_with_code_1() {
        for v in SUPPORTED {
            assert_eq!(Version::parse(v.as_str()).unwrap(), v);
        }
        for bad in ["0.3.1", "1.2.0", "", "1.0"] {
            let e = Version::parse(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::IncompatibleVersion);
        }
        assert!(Version::V1_1_0.has_status_and_gc() && !Version::V1_0_0.has_status_and_gc());
    }
}
