//! Pseudo-terminals: a pair of a given size, resizing, the EOF character.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::{cvt, owned};

/// A new pseudo-terminal: the master (non-blocking), the slave (opened without becoming the
/// agent's controlling terminal) and the slave's path. Both descriptors are close-on-exec.
pub struct PtyPair {
    pub master: OwnedFd,
    pub slave: OwnedFd,
    pub path: CString,
}

pub fn open_pty(cols: u16, rows: u16) -> io::Result<PtyPair> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: plain call; the result is checked.
    let master = owned(cvt(unsafe { libc::posix_openpt(flags) })?);
    // SAFETY: grantpt/unlockpt only act on the master descriptor we hold.
    cvt(unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: buf is writable for buf.len() bytes; ptsname_r NUL-terminates on success.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: ptsname_r succeeded, so buf holds a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_owned();
    // SAFETY: valid C string.
    let slave = owned(cvt(unsafe {
        libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
    })?);
    set_winsize(master.as_raw_fd(), cols, rows)?;
    Ok(PtyPair { master, slave, path })
}

/// TIOCSWINSZ: on a master it sets the size of the pair and signals SIGWINCH to the
/// terminal's foreground process group.
pub fn set_winsize(fd: RawFd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one struct winsize.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws as *const libc::winsize) }).map(|_| ())
}

/// The terminal's end-of-file character (c_cc[VEOF]); on a master this reads the slave's
/// settings.
pub fn veof_char(fd: RawFd) -> io::Result<u8> {
    // SAFETY: termios is plain data, filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: t is a valid out-pointer.
    cvt(unsafe { libc::tcgetattr(fd, &mut t) })?;
    Ok(t.c_cc[libc::VEOF])
}
