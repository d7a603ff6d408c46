//! `vpc-ebpf-cni`: the CNI plugin binary.
//!
//! Only VERSION is implemented so far; ADD/DEL/CHECK/STATUS/GC arrive with the CNI plugin
//! issue and until then answer with a CNI error saying so, never a fake success.

use std::io::Write as _;

const SUPPORTED_VERSIONS: &str = r#"["0.4.0","1.0.0","1.1.0"]"#;
/// CNI error code for "incompatible CNI version" and our own "not implemented".
const ERR_NOT_IMPLEMENTED: u32 = 100;

fn main() {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let code = if command == "VERSION" {
        let _ = writeln!(
            out,
            r#"{{"cniVersion":"1.1.0","supportedVersions":{SUPPORTED_VERSIONS}}}"#
        );
        0
    } else {
        let _ = writeln!(
            out,
            r#"{{"cniVersion":"1.1.0","code":{ERR_NOT_IMPLEMENTED},"msg":"this CNI_COMMAND is not implemented by this build of vpc-ebpf-cni","details":"only VERSION is available in this build"}}"#
        );
        1
    };
    drop(out);
    std::process::exit(code);
}
