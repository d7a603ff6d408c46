//! Logs to the configured file and to stderr; never to stdout, which carries the result.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    sync::Mutex,
};

struct Tee(Option<Mutex<std::fs::File>>);

impl Write for &Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = &self.0
            && let Ok(mut f) = f.lock()
        {
            // A full disk must not fail the pod's network setup.
            let _ = f.write_all(buf);
        }
        io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

pub fn init(path: &str, level: &str) {
    let file = std::path::Path::new(path)
        .parent()
        .and_then(|d| std::fs::create_dir_all(d).ok())
        .and_then(|()| OpenOptions::new().create(true).append(true).open(path).ok());
    let tee: &'static Tee = Box::leak(Box::new(Tee(file.map(Mutex::new))));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(move || tee)
        .with_ansi(false)
        .try_init();
}
