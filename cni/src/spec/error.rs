//! CNI errors: the spec's JSON shape and its well-known codes.

use serde::Serialize;

/// Error codes of the CNI spec; 100 and above are this plugin's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion,
    UnsupportedField,
    ContainerUnknown,
    InvalidEnvironment,
    Io,
    Decode,
    InvalidConfig,
    TryAgainLater,
    /// STATUS: the plugin cannot serve ADDs now.
    NotAvailable,
    /// The agent could not be reached or answered with a failure.
    Agent,
    /// The agent has no address to give and will not get one soon.
    NoAddress,
    /// Setting up or tearing down the pod's interfaces failed.
    Netlink,
    /// CHECK found the pod's networking not as ADD left it.
    CheckFailed,
    /// A command this build does not implement.
    NotImplemented,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::UnsupportedField => 2,
            Self::ContainerUnknown => 3,
            Self::InvalidEnvironment => 4,
            Self::Io => 5,
            Self::Decode => 6,
            Self::InvalidConfig => 7,
            Self::TryAgainLater => 11,
            Self::NotAvailable => 50,
            Self::Agent => 100,
            Self::NoAddress => 101,
            Self::Netlink => 102,
            Self::CheckFailed => 103,
            Self::NotImplemented => 104,
        }
    }
}

/// A CNI error as the runtime sees it: `{cniVersion, code, msg, details}` on stdout.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: ErrorCode,
    /// What happened, short.
    pub msg: String,
    /// Specifics and what to do about it.
    pub details: String,
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    details: &'a str,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code.code(),
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| {
            // Unreachable for strings and integers, but the error path must never panic.
            format!(
                r#"{{"cniVersion":"{cni_version}","code":{},"msg":"error"}}"#,
                self.code.code()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_spec_shape() {
        let e = CniError::new(
            ErrorCode::TryAgainLater,
            "no free IP \"yet\"",
            "pool refilling",
        );
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "no free IP \"yet\"");
        assert_eq!(v["details"], "pool refilling");
    }
}
