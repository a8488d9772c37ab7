//! The event loop's kernel objects: epoll, the SIGCHLD signalfd, timerfds.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr;

use super::{cvt, owned};
use super::fd::read;

pub struct Epoll {
    fd: OwnedFd,
}

pub const EPOLLIN: u32 = libc::EPOLLIN as u32;
pub const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
pub const EPOLLERR: u32 = libc::EPOLLERR as u32;
pub const EPOLLHUP: u32 = libc::EPOLLHUP as u32;
pub const EPOLLET: u32 = libc::EPOLLET as u32;
pub const EPOLLPRI: u32 = libc::EPOLLPRI as u32;

#[derive(Clone, Copy)]
pub struct Event {
    pub events: u32,
    pub token: u64,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll { fd: owned(fd) })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn delete(&self, fd: RawFd) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
    }

    /// Waits for events; `timeout_ms` -1 blocks. EINTR yields an empty list.
    pub fn wait(&self, out: &mut Vec<Event>, timeout_ms: i32) -> io::Result<()> {
        const MAX: usize = 128;
        let mut raw = [libc::epoll_event { events: 0, u64: 0 }; MAX];
        // SAFETY: raw has room for MAX events.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), raw.as_mut_ptr(), MAX as i32, timeout_ms) };
        out.clear();
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        for ev in &raw[..n as usize] {
            let (events, token) = (ev.events, ev.u64);
            out.push(Event { events, token });
        }
        Ok(())
    }
}

pub(crate) fn sigset_of(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks SIGCHLD and returns a non-blocking signalfd for it.
pub fn sigchld_fd() -> io::Result<OwnedFd> {
    let set = sigset_of(&[libc::SIGCHLD]);
    // SAFETY: set is initialised; the old mask is not needed.
    cvt(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, ptr::null_mut()) })?;
    // SAFETY: as above.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
    Ok(owned(fd))
}

/// Empties a non-blocking signalfd or timerfd (a short read means nothing is left).
pub fn drain(fd: RawFd) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = read(fd, &mut buf) {
        if n < buf.len() {
            break;
        }
    }
}

pub struct TimerFd {
    fd: OwnedFd,
    armed_ns: u64,
}

impl TimerFd {
    pub fn new() -> io::Result<TimerFd> {
        // SAFETY: plain syscall.
        let fd = cvt(unsafe {
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        })?;
        Ok(TimerFd { fd: owned(fd), armed_ns: 0 })
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the timer fire no later than the absolute CLOCK_MONOTONIC time `at_ns` (0: no
    /// deadline). A timer armed earlier is left as it is, and one no longer needed is not
    /// disarmed: firing early costs one wake-up of the loop, which finds nothing due and arms
    /// it again, while re-arming for every exec's deadline and disarming at its end costs two
    /// syscalls per exec (tens of microseconds each under emulation).
    pub fn set(&mut self, at_ns: u64) {
        if at_ns == 0 || (self.armed_ns != 0 && self.armed_ns <= at_ns) {
            return;
        }
        self.armed_ns = at_ns;
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: spec is valid; the old value is not needed. Cannot fail for a valid fd/spec.
        unsafe {
            libc::timerfd_settime(self.fd.as_raw_fd(), libc::TFD_TIMER_ABSTIME, &spec, ptr::null_mut());
        }
    }

    /// Called after the timer fired.
    pub fn fired(&mut self) {
        drain(self.fd.as_raw_fd());
        self.armed_ns = 0;
    }
}
