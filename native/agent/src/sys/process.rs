//! Process-wide setup and other processes: signals ignored, standard descriptors, ids, the child subreaper; killing and reaping.

use std::ffi::CStr;
use std::io;

use super::{cvt, owned, pid_t};

/// Ignores SIGPIPE (writes to closed pipes/sockets must return EPIPE, not kill the agent).
pub fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN has no memory-safety implications.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Makes sure descriptors 0, 1 and 2 are open, so no later descriptor lands there.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        for path in [c"/dev/null", c"/"] {
            // SAFETY: path is a valid C string; the result is checked below.
            let got = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
            if got == fd {
                break;
            }
            if got >= 0 {
                // SAFETY: we own `got`; dup2 onto the closed standard descriptor.
                unsafe {
                    libc::dup2(got, fd);
                    libc::close(got);
                }
                break;
            }
        }
    }
}

/// Opens `path` and installs it as descriptors 0, 1 and 2.
pub fn redirect_stdio(path: &CStr) -> io::Result<()> {
    // SAFETY: path is a valid C string.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) })?;
    for target in 0..3 {
        if fd != target {
            // SAFETY: both descriptors are valid; dup2 replaces the target atomically.
            cvt(unsafe { libc::dup2(fd, target) })?;
        }
    }
    if fd > 2 {
        drop(owned(fd));
    }
    Ok(())
}

pub fn getpid() -> pid_t {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

pub fn geteuid() -> u32 {
    // SAFETY: cannot fail.
    unsafe { libc::geteuid() }
}

pub fn getegid() -> u32 {
    // SAFETY: cannot fail.
    unsafe { libc::getegid() }
}

/// Makes this process the reaper of orphaned descendants (used outside PID 1).
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with an integer argument.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) }).map(|_| ())
}

pub fn kill(pid: pid_t, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall; callers never pass 0 as pid by accident (checked by callers).
    cvt(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

pub struct Reaped {
    pub pid: pid_t,
    pub status: libc::c_int,
    pub maxrss_kib: u64,
}

impl Reaped {
    /// (exit_code, signal): exit_code is -1 when killed by a signal.
    pub fn code_and_signal(&self) -> (i32, u32) {
        if libc::WIFEXITED(self.status) {
            (libc::WEXITSTATUS(self.status), 0)
        } else if libc::WIFSIGNALED(self.status) {
            (-1, libc::WTERMSIG(self.status) as u32)
        } else {
            (-1, 0)
        }
    }
}

/// Reaps one terminated child (any pid) without blocking.
pub fn reap_any() -> Option<Reaped> {
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data, filled by the kernel.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: status and ru are valid out-pointers.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut ru) };
        if pid > 0 {
            return Some(Reaped { pid, status, maxrss_kib: ru.ru_maxrss.max(0) as u64 });
        }
        if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

/// Waits for the child `pid` and returns its wait status (0 if it could not be waited for).
pub(crate) fn reap_blocking(pid: pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return status;
        }
    }
}
