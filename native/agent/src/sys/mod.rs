//! Thin safe wrappers over the libc calls the agent needs, one file per family of system calls.
//! All `unsafe` in the crate lives in this module: the crate root denies `unsafe_code` and allows
//! it here only, so the compiler enforces it.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

pub use libc::pid_t;

/// Turns a libc `-1 + errno` return into an `io::Result`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

pub(crate) fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Wraps a freshly returned descriptor.
pub(crate) fn owned(fd: libc::c_int) -> OwnedFd {
    // SAFETY: callers pass a descriptor just returned by a successful syscall; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `strerror` text without std's " (os error N)" suffix.
pub fn errno_text(errno: i32) -> String {
    let s = io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

pub fn io_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => errno_text(n),
        None => e.to_string(),
    }
}

pub mod bpf;
mod boot;
mod clock;
mod entry;
mod events;
mod fd;
mod inotify;
mod net;
mod process;
mod pty;
pub mod rtnl;
mod spawn;
mod udp;
#[cfg(test)]
pub mod alloc_count;

pub use boot::*;
pub use clock::*;
pub use events::*;
pub use fd::*;
pub use inotify::*;
pub use net::*;
pub use process::*;
pub use pty::*;
pub use spawn::*;
pub use udp::*;
