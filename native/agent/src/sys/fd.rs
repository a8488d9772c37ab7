//! Plain descriptor I/O: read, write, pipes, non-blocking opens.

use std::ffi::CStr;
use std::io;
use std::os::fd::{OwnedFd, RawFd};

use super::{cvt, cvt_size, owned};

pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid writable region of buf.len() bytes.
        let r = cvt_size(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) });
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid readable region of buf.len() bytes.
        let r = cvt_size(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) });
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads at most `max` bytes, appending them to `buf` without zero-filling its spare capacity
/// first (that memset is measurable under TCG emulation).
pub fn read_append(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    loop {
        // SAFETY: `spare` is writable, allocated memory of at least `len` bytes; the kernel
        // writes only the bytes it reports, and only those are exposed via set_len below.
        let r = cvt_size(unsafe { libc::read(fd, spare.as_mut_ptr().cast(), len) });
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(n) => {
                // SAFETY: the first n bytes of the spare capacity were just initialised by read.
                unsafe { buf.set_len(buf.len() + n) };
                return Ok(n);
            }
        }
    }
}

/// Sets O_NONBLOCK on a pipe end that has no other status flags (one syscall instead of two).
pub fn set_pipe_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold; pipe ends carry only their access mode, which
    // F_SETFL ignores.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) }).map(|_| ())
}

/// A pipe with both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((owned(fds[0]), owned(fds[1])))
}

/// Bytes waiting to be read in a pipe.
pub fn bytes_readable(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    cvt(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) })?;
    Ok(n.max(0) as usize)
}

pub fn open_rw_nonblock(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: valid C string.
    let fd = cvt(unsafe {
        libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
    })?;
    Ok(owned(fd))
}

/// Whether something exists at `path` (access F_OK: a path walk, nothing read).
pub fn exists(path: &std::ffi::CStr) -> bool {
    // SAFETY: `path` is a valid C string.
    unsafe { libc::access(path.as_ptr(), libc::F_OK) == 0 }
}
