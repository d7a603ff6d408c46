//! Injecting arbitrary (including malformed) frames onto an interface with AF_PACKET,
//! for what BPF_PROG_TEST_RUN refuses to feed a program.

use std::ffi::CString;

/// Sends `frame` as-is out of `ifname` in the calling thread's network namespace.
pub fn send_frame(ifname: &str, frame: &[u8]) {
    let name = CString::new(ifname).expect("interface name");
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0, "no interface {ifname}");
    // Protocol 0: this socket only sends, it receives nothing.
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "socket(AF_PACKET): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).expect("fits");
    addr.sll_ifindex = i32::try_from(ifindex).expect("fits");
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: buffer and address are valid for the given lengths.
    let sent = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("fits"),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    assert_eq!(
        usize::try_from(sent).ok(),
        Some(frame.len()),
        "sendto({ifname}): {err}"
    );
}
