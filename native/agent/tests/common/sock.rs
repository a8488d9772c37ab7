//! Socket options the integration tests set on their own sockets and std offers no safe call
//! for: a listen backlog other than std's, and SO_LINGER (std's `set_linger` is unstable). The
//! test crates deny `unsafe_code`; this file is the one place they allow it.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

/// listen() again on a listening socket with `backlog`: Linux then queues at most `backlog` + 1
/// connections and drops further SYNs, so a later connect hangs.
pub fn relisten(l: &TcpListener, backlog: i32) -> io::Result<()> {
    // SAFETY: listen() on a descriptor the borrowed listener owns and keeps open for the call.
    if unsafe { libc::listen(l.as_raw_fd(), backlog) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// SO_LINGER with a zero timeout: closing the socket then sends a reset instead of a FIN.
pub fn set_linger_reset(s: &TcpStream) -> io::Result<()> {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a descriptor the borrowed stream owns, with a valid struct linger
    // and its size.
    let r = unsafe {
        libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&l as *const libc::linger).cast(), std::mem::size_of::<libc::linger>() as libc::socklen_t)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
