//! The pod sandbox's process (what Kubernetes calls the pause container): holds the pod's
//! namespaces open, reaps orphaned children (it is PID 1 of a pod that shares its PID
//! namespace), and exits at once on SIGTERM or SIGINT so a sandbox stops without waiting
//! for its grace period.

fn main() {
    // SAFETY: plain libc signal-set calls on a local set; the signals are blocked before
    // any is waited for, so none is lost to a default handler.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&raw mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        loop {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(&raw const set, &raw mut sig) != 0 {
                continue;
            }
            if sig == libc::SIGCHLD {
                while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            } else {
                std::process::exit(0);
            }
        }
    }
}
