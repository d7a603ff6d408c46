//! Replays the fuzz corpus (and its regressions) through the fuzz entry point as a normal
//! test: none of it may panic, and the valid seeds must still parse.

use std::path::PathBuf;

#[test]
fn corpus_replays_without_panics() {
    // Cargo's run-time value first: a shared target dir may hold a binary compiled in
    // another checkout.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let dir = manifest.join("../fuzz/corpus/cni_parse");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let parsed = vpc_ebpf_cni::fuzz::parse_everything(&data);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let want = if name.starts_with("check-") {
            4
        } else if name.starts_with("add-") {
            3
        } else {
            0
        };
        assert!(
            parsed >= want,
            "{name}: a valid seed no longer parses ({parsed})"
        );
        n += 1;
    }
    assert!(n >= 9, "corpus has only {n} inputs");
}
