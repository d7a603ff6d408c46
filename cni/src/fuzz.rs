//! One entry point over everything the plugin parses from the runtime, for the fuzzer and
//! for replaying its corpus as a normal test. Must never panic, whatever the bytes.

use std::collections::HashMap;

use crate::spec::{args, config, config::NetConf, env::Env, result::AddResult};

/// Input layout: `KEY=VALUE` environment lines, a NUL byte, then the stdin config.
/// Returns how many of environment, requested version, config and prevResult address
/// parsed, so the corpus replay can tell that valid seeds stay valid.
pub fn parse_everything(data: &[u8]) -> usize {
    let (head, stdin) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    let head = String::from_utf8_lossy(head);
    let vars: HashMap<String, String> = head
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let mut seen = 0;
    seen += usize::from(Env::from_map(&vars).is_ok());
    // The raw head as CNI_ARGS too, for coverage; env-shaped input rarely parses as that.
    let _ = args::parse(&head);
    seen += usize::from(config::requested_version(stdin).is_ok());
    if let Ok(conf) = NetConf::parse(stdin) {
        seen += 1;
        if let Some(prev) = &conf.prev_result {
            seen += usize::from(AddResult::address_in(prev).is_some());
        }
    }
    seen
}
