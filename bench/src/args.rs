//! Flag parsing the benches share: `--name value` pairs, nothing positional.

/// The value after `name`, if given.
pub fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Every argument is one of `known` or the value after one.
pub fn only_known(args: &[String], known: &[&str]) -> Result<(), String> {
    for (i, a) in args.iter().enumerate() {
        let is_value = i > 0 && known.contains(&args[i - 1].as_str());
        if !is_value && !known.contains(&a.as_str()) {
            return Err(format!("unknown argument {a:?}"));
        }
    }
    Ok(())
}

/// The positive integer after `name`, or `default`.
pub fn positive(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    flag(args, name).map_or(Ok(default), |v| {
        v.parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or(format!("{name} wants a positive integer, got {v:?}"))
    })
}
