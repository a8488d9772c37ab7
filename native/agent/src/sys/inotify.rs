//! inotify: a non-blocking instance, and watches added to and removed from it. The events are
//! plain bytes read with `fd::read`; watch.rs decodes them.

use std::io;
use std::os::fd::{OwnedFd, RawFd};

use super::{cstr, cvt, owned};

pub use libc::{
    IN_ATTRIB, IN_CREATE, IN_DELETE, IN_DONT_FOLLOW, IN_EXCL_UNLINK, IN_IGNORED, IN_ISDIR, IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO, IN_ONLYDIR,
    IN_Q_OVERFLOW,
};

/// A new inotify instance, non-blocking and close-on-exec.
pub fn inotify_init() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with flags only.
    let fd = cvt(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
    Ok(owned(fd))
}

/// Watches `path` for `mask`; returns the watch descriptor (the same one again for an inode
/// already watched).
pub fn inotify_add_watch(fd: RawFd, path: &[u8], mask: u32) -> io::Result<i32> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid C string for the duration of the call; `fd` is borrowed.
    cvt(unsafe { libc::inotify_add_watch(fd, p.as_ptr(), mask) })
}

/// Stops watch `wd` (the kernel then queues IN_IGNORED for it). A watch already gone is fine.
pub fn inotify_rm_watch(fd: RawFd, wd: i32) {
    // SAFETY: plain syscall on a borrowed descriptor; failure (EINVAL: no such watch) is harmless.
    unsafe {
        libc::inotify_rm_watch(fd, wd);
    }
}
