//! The runtime's environment (CNI_COMMAND and friends), validated as the spec and libcni do.

use std::collections::HashMap;

use super::{CniError, ErrorCode, args};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Version,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            other => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("unknown CNI_COMMAND {other:?}"),
                    "CNI_COMMAND must be one of ADD, DEL, CHECK, STATUS, VERSION, GC",
                ));
            }
        })
    }

    /// Commands that act on one container attachment.
    pub fn per_container(self) -> bool {
        matches!(self, Self::Add | Self::Del | Self::Check)
    }
}

/// Everything the runtime passed in the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Empty for DEL when the runtime has no netns any more.
    pub netns: String,
    pub ifname: String,
    pub args: args::PodArgs,
    pub path: Vec<String>,
}

fn missing(var: &str, command: &str) -> CniError {
    CniError::new(
        ErrorCode::InvalidEnvironment,
        format!("{var} is not set"),
        format!("{var} is required for CNI_COMMAND={command}; the container runtime sets it"),
    )
}

/// Container IDs as libcni accepts them.
pub fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Interface names as the kernel and libcni accept them.
pub fn valid_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > 15 {
        return Err(format!(
            "{} bytes is longer than the kernel's 15",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("'.' and '..' are not interface names".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace())
    {
        return Err(format!("it contains {c:?}"));
    }
    Ok(())
}

impl Env {
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, CniError> {
        let get = |k: &str| vars.get(k).map(String::as_str).unwrap_or_default();
        let raw_command = get("CNI_COMMAND");
        if raw_command.is_empty() {
            return Err(missing("CNI_COMMAND", "any"));
        }
        let command = Command::parse(raw_command)?;
        let container_id = get("CNI_CONTAINERID").to_owned();
        let netns = get("CNI_NETNS").to_owned();
        let ifname = get("CNI_IFNAME").to_owned();
        if command.per_container() {
            if container_id.is_empty() {
                return Err(missing("CNI_CONTAINERID", raw_command));
            }
            if !valid_container_id(&container_id) {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "invalid CNI_CONTAINERID",
                    format!(
                        "{container_id:?}: must start with a letter or digit and contain only \
                         letters, digits, '_', '.' and '-'"
                    ),
                ));
            }
            if ifname.is_empty() {
                return Err(missing("CNI_IFNAME", raw_command));
            }
            if let Err(why) = valid_ifname(&ifname) {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "invalid CNI_IFNAME",
                    format!("{ifname:?}: {why}"),
                ));
            }
            // DEL may come after the netns is gone; ADD and CHECK need it.
            if netns.is_empty() && command != Command::Del {
                return Err(missing("CNI_NETNS", raw_command));
            }
        }
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args: args::parse(get("CNI_ARGS"))?,
            path: get("CNI_PATH")
                .split(':')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn add() -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]
    }

    #[test]
    fn accepts_a_runtime_environment() {
        let e = Env::from_map(&vars(&add())).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.path, ["/opt/cni/bin", "/usr/lib/cni"]);
    }

    #[test]
    fn every_missing_or_bad_variable_is_code_4() {
        let cases: Vec<(&str, &str)> = vec![
            ("CNI_COMMAND", ""),
            ("CNI_COMMAND", "DELETE"),
            ("CNI_CONTAINERID", ""),
            ("CNI_CONTAINERID", "-leading-dash"),
            ("CNI_CONTAINERID", "has space"),
            ("CNI_IFNAME", ""),
            ("CNI_IFNAME", "a-very-long-ifname"),
            ("CNI_IFNAME", "eth/0"),
            ("CNI_IFNAME", ".."),
            ("CNI_NETNS", ""),
            ("CNI_ARGS", "NOPE"),
        ];
        for (k, v) in cases {
            let mut m = vars(&add());
            m.insert(k.into(), v.into());
            let err = Env::from_map(&m).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidEnvironment, "{k}={v:?}");
            assert!(
                err.msg.contains(k) || err.msg.contains("CNI_ARGS"),
                "{k}: {err}"
            );
        }
    }

    #[test]
    fn del_without_netns_is_fine_and_status_needs_no_container() {
        let mut m = vars(&add());
        m.insert("CNI_COMMAND".into(), "DEL".into());
        m.insert("CNI_NETNS".into(), String::new());
        assert!(Env::from_map(&m).is_ok());
        let m = vars(&[("CNI_COMMAND", "STATUS")]);
        assert_eq!(Env::from_map(&m).unwrap().command, Command::Status);
    }
}
