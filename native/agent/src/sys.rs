//! Thin safe wrappers over the libc calls the agent needs. All `unsafe` in the crate lives here.

use std::ffi::{CStr, CString};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

pub use libc::pid_t;

/// Turns a libc `-1 + errno` return into an `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Wraps a freshly returned descriptor.
fn owned(fd: libc::c_int) -> OwnedFd {
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

// ---------------------------------------------------------------------------------------------
// Process-wide setup

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

// ---------------------------------------------------------------------------------------------
// Plain descriptor I/O

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

// ---------------------------------------------------------------------------------------------
// epoll, signalfd, timerfd

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

fn sigset_of(signals: &[libc::c_int]) -> libc::sigset_t {
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

    /// Arms the timer for the absolute CLOCK_MONOTONIC time `at_ns`; 0 disarms it.
    pub fn set(&mut self, at_ns: u64) {
        if at_ns == self.armed_ns {
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

// ---------------------------------------------------------------------------------------------
// Clocks

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is valid; the clocks used always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn set_realtime_ns(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is valid.
    cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// Processes

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

fn reap_blocking(pid: pid_t) {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Which step of starting a process failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnStage {
    Setup,
    Chdir,
    Credentials,
    Exec,
    /// Joining its cgroup (cgroup.procs refused the process: the cgroup is gone or full).
    Cgroup,
}

#[derive(Debug)]
pub struct SpawnError {
    pub stage: SpawnStage,
    pub errno: i32,
}

/// What to start. Descriptors are installed as the child's 0, 1 and 2.
pub struct SpawnSpec<'a> {
    pub path: &'a CStr,
    pub argv: &'a [CString],
    pub env: &'a [CString],
    pub cwd: Option<&'a CStr>,
    pub stdio: [RawFd; 3],
    /// `Some((uid, gid))` to switch credentials.
    pub creds: Option<(u32, u32)>,
    /// The path of a terminal slave (also in `stdio`) to make the controlling terminal of the
    /// new session.
    pub ctty: Option<&'a CStr>,
    /// A `cgroup.procs` file open for writing: the child joins that cgroup before it execs, so
    /// nothing it runs ever lives outside it.
    pub cgroup_procs: Option<RawFd>,
}

fn ptr_array(items: &[CString]) -> Vec<*const libc::c_char> {
    items.iter().map(|s| s.as_ptr()).chain(std::iter::once(ptr::null())).collect()
}

/// Set once the agent protected itself from the OOM killer (`protect_from_oom`): every child
/// then puts its own `oom_score_adj` back to 0 before it execs.
static OOM_PROTECTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// oom_score_adj -1000: the OOM killer never chooses this process. The value is inherited, so
/// from now on every spawned child resets its own before it execs.
pub fn protect_from_oom() -> io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", "-1000")?;
    OOM_PROTECTED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Makes the calling process a SCHED_BATCH task (no wake-up preemption of running tasks).
pub fn set_sched_batch() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling process with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Everything the child of `spawn` needs, prepared before the clone: the child runs in the
/// agent's address space (CLONE_VM) and must not allocate. It reports a failure in `stage` and
/// `errno` (read by the parent once the child is gone; CLONE_VFORK suspends the parent until then).
#[repr(C)]
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdio: [RawFd; 3],
    ctty: bool,
    creds: Option<(u32, u32)>,
    cgroup_procs: RawFd,
    reset_oom: bool,
    sigmask: libc::sigset_t,
    stage: i32,
    errno: i32,
}

const STAGE_NONE: i32 = -1;
/// Stack of a spawn child: it only makes system calls (through libc's thin wrappers).
const CHILD_STACK: usize = 64 * 1024;

/// The child side of `spawn`, on its own stack in the agent's memory, until execve.
extern "C" fn spawn_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildArgs the parent passed to clone; the parent is suspended
    // (CLONE_VFORK) until this child execs or exits, so nothing else touches it. Only
    // async-signal-safe system calls are made; nothing allocates or takes a lock. The child has
    // its own signal dispositions (no CLONE_SIGHAND) and no handlers are installed, so no
    // handler can run on this stack.
    unsafe {
        let a = &mut *(arg as *mut ChildArgs);
        let fail = |a: &mut ChildArgs, stage: SpawnStage| -> libc::c_int {
            ptr::write_volatile(&mut a.errno, *libc::__errno_location());
            ptr::write_volatile(&mut a.stage, stage as i32);
            libc::_exit(127)
        };
        // First, while the child still runs nothing of the program: its cgroup and its OOM score.
        if a.cgroup_procs >= 0 && libc::write(a.cgroup_procs, b"0\n".as_ptr().cast(), 2) != 2 {
            return fail(a, SpawnStage::Cgroup);
        }
        if a.reset_oom {
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0\n".as_ptr().cast(), 2) != 2 {
                return fail(a, SpawnStage::Setup);
            }
            libc::close(fd);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &a.sigmask, ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_OTHER, &param);
        if libc::setsid() < 0 {
            return fail(a, SpawnStage::Setup);
        }
        for (target, &fd) in a.stdio.iter().enumerate() {
            let target = target as libc::c_int;
            // dup2 onto itself would keep close-on-exec: clear the flag instead.
            let r = if fd == target { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, target) };
            if r < 0 {
                return fail(a, SpawnStage::Setup);
            }
        }
        if a.ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return fail(a, SpawnStage::Setup);
        }
        if !a.cwd.is_null() && libc::chdir(a.cwd) < 0 {
            return fail(a, SpawnStage::Chdir);
        }
        if let Some((uid, gid)) = a.creds {
            // Raw system calls: libc's wrappers would broadcast to threads through its own
            // bookkeeping, which belongs to the parent here.
            let groups = [gid];
            if libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) < 0
                || libc::syscall(libc::SYS_setgid, gid) < 0
                || libc::syscall(libc::SYS_setuid, uid) < 0
            {
                return fail(a, SpawnStage::Credentials);
            }
        }
        libc::execve(a.path, a.argv, a.envp);
        fail(a, SpawnStage::Exec)
    }
}

/// Starts a process in a new session (it leads its own process group), in `cgroup_procs`'s
/// cgroup when given. Like posix_spawn it clones with CLONE_VM | CLONE_VFORK (no copy of the
/// agent's memory; the agent waits only until the child has exec'd), but the child also joins
/// its cgroup and gives up the agent's OOM protection before it execs.
pub fn spawn(spec: &SpawnSpec) -> Result<pid_t, SpawnError> {
    let setup = |errno| SpawnError { stage: SpawnStage::Setup, errno };
    let argv = ptr_array(spec.argv);
    let envp = ptr_array(spec.env);
    let mut args = ChildArgs {
        path: spec.path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: spec.cwd.map_or(ptr::null(), |c| c.as_ptr()),
        stdio: spec.stdio,
        ctty: spec.ctty.is_some(),
        creds: spec.creds,
        cgroup_procs: spec.cgroup_procs.unwrap_or(-1),
        reset_oom: OOM_PROTECTED.load(std::sync::atomic::Ordering::Relaxed),
        sigmask: sigset_of(&[]),
        stage: STAGE_NONE,
        errno: 0,
    };
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    // SAFETY: the stack is CHILD_STACK bytes of writable memory that outlives the child's use
    // of it (CLONE_VFORK: clone returns once the child has exec'd or exited); clone aligns the
    // top itself. `args` and everything it points to (argv, envp, path, cwd) outlive the call.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(CHILD_STACK);
        libc::clone(
            spawn_child,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut ChildArgs).cast(),
        )
    };
    if pid < 0 {
        return Err(setup(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)));
    }
    // SAFETY: the child wrote these (if at all) before it exited; it is gone now.
    let (stage, errno) = unsafe { (ptr::read_volatile(&args.stage), ptr::read_volatile(&args.errno)) };
    drop(stack);
    if stage == STAGE_NONE {
        return Ok(pid);
    }
    reap_blocking(pid);
    let stage = match stage {
        s if s == SpawnStage::Chdir as i32 => SpawnStage::Chdir,
        s if s == SpawnStage::Credentials as i32 => SpawnStage::Credentials,
        s if s == SpawnStage::Exec as i32 => SpawnStage::Exec,
        s if s == SpawnStage::Cgroup as i32 => SpawnStage::Cgroup,
        _ => SpawnStage::Setup,
    };
    Err(SpawnError { stage, errno })
}

// ---------------------------------------------------------------------------------------------
// Pseudo-terminals

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

// ---------------------------------------------------------------------------------------------
// TCP sockets

/// Starts a non-blocking TCP connect. Ok((socket, true)): connected already; Ok((socket,
/// false)): in progress (writable once done; then see `socket_error`).
pub fn tcp_connect(addr: &SocketAddr) -> io::Result<(OwnedFd, bool)> {
    let sock = tcp_socket(addr)?;
    // A forwarder writes what the host sent as soon as it arrives: Nagle's algorithm would hold a
    // small write back until the previous one is acknowledged (with a delayed ACK, up to 40 ms).
    set_nodelay(sock.as_raw_fd())?;
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid address of `len` bytes.
    let r = unsafe {
        libc::connect(sock.as_raw_fd(), (&storage as *const libc::sockaddr_storage).cast(), len)
    };
    if r == 0 {
        return Ok((sock, true));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINPROGRESS) | Some(libc::EINTR) => Ok((sock, false)),
        _ => Err(e),
    }
}

/// A non-blocking, close-on-exec TCP socket of `addr`'s family.
fn tcp_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall.
    Ok(owned(cvt(unsafe {
        libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    })?))
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: `v` is a valid c_int for the duration of the call.
    cvt(unsafe {
        libc::setsockopt(fd, level, name, (&v as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    })
    .map(|_| ())
}

fn set_nodelay(fd: RawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

/// `addr` as a C socket address.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data large enough for either address family.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is suitably aligned.
            unsafe { ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage, which is suitably aligned.
            unsafe { ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The port of a socket address the kernel filled in (0 for another family).
fn sockaddr_port(storage: &libc::sockaddr_storage) -> u16 {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in; storage is aligned for it.
            let sin = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            u16::from_be(sin.sin_port)
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6; storage is aligned for it.
            let sin6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            u16::from_be(sin6.sin6_port)
        }
        _ => 0,
    }
}

/// A non-blocking listening TCP socket on `addr` (SO_REUSEADDR), and the port it is bound to.
pub fn tcp_listen(addr: &SocketAddr, backlog: i32) -> io::Result<(OwnedFd, u16)> {
    let sock = tcp_socket(addr)?;
    setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid address of `len` bytes.
    cvt(unsafe { libc::bind(sock.as_raw_fd(), (&storage as *const libc::sockaddr_storage).cast(), len) })?;
    // SAFETY: plain syscall.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), backlog) })?;
    // SAFETY: sockaddr_storage is plain data.
    let mut bound: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut blen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: bound and blen are valid out-pointers; blen holds bound's size.
    cvt(unsafe { libc::getsockname(sock.as_raw_fd(), (&mut bound as *mut libc::sockaddr_storage).cast(), &mut blen) })?;
    Ok((sock, sockaddr_port(&bound)))
}

/// Accepts one connection from a non-blocking listener: a non-blocking, close-on-exec socket
/// with TCP_NODELAY, and the peer's port. WouldBlock when nobody waits.
pub fn tcp_accept(listener: RawFd) -> io::Result<(OwnedFd, u16)> {
    // SAFETY: sockaddr_storage is plain data.
    let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: peer and len are valid out-pointers; len holds peer's size.
    let fd = cvt(unsafe {
        libc::accept4(listener, (&mut peer as *mut libc::sockaddr_storage).cast(), &mut len, libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
    })?;
    let sock = owned(fd);
    set_nodelay(sock.as_raw_fd())?;
    Ok((sock, sockaddr_port(&peer)))
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid out-pointers of the sizes given.
    cvt(unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut libc::c_int).cast(), &mut len) })?;
    Ok(v)
}

/// Takes the socket's pending error (SO_ERROR): 0 when there is none.
pub fn socket_error(fd: RawFd) -> io::Result<i32> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR)
}

/// shutdown(SHUT_WR): the peer reads EOF once everything written before has arrived.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::shutdown(fd, libc::SHUT_WR) }).map(|_| ())
}

/// SO_LINGER with a zero timeout: closing the socket then sends a reset.
pub fn set_linger_reset(fd: RawFd) -> io::Result<()> {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: l is a valid struct linger for the duration of the call.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// Boot-time system calls (PID 1 only)

pub fn mkdir(path: &str, mode: u32) -> io::Result<()> {
    let p = cstr(path.as_bytes())?;
    // SAFETY: valid C string.
    match cvt(unsafe { libc::mkdir(p.as_ptr(), mode as libc::mode_t) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map(|_| ()),
    }
}

pub fn mount(source: &str, target: &str, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>) -> io::Result<()> {
    let source = cstr(source.as_bytes())?;
    let target = cstr(target.as_bytes())?;
    let fstype = fstype.map(|s| cstr(s.as_bytes())).transpose()?;
    let data = data.map(|s| cstr(s.as_bytes())).transpose()?;
    // SAFETY: all pointers are valid C strings or NULL.
    cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref().map_or(ptr::null(), |s| s.as_ptr().cast()),
        )
    })
    .map(|_| ())
}

pub use libc::{MS_BIND, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT};

pub fn chroot(path: &str) -> io::Result<()> {
    let p = cstr(path.as_bytes())?;
    // SAFETY: valid C string.
    cvt(unsafe { libc::chroot(p.as_ptr()) }).map(|_| ())
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
}

/// Sets IFF_UP on an interface (e.g. "lo").
pub fn interface_up(name: &str) -> io::Result<()> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() >= 16 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: plain syscall.
    let sock = owned(cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?);
    let mut req = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: req has the layout of struct ifreq (16-byte name + 24-byte union).
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut IfReq) })?;
    req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req as *mut IfReq) }).map(|_| ())
}

/// Mixes `data` into the kernel RNG, crediting it (RNDADDENTROPY), or just mixes it in.
pub fn add_entropy(data: &[u8]) -> io::Result<()> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 0x03, int[2])
    if data.is_empty() {
        return Ok(());
    }
    let mut info = Vec::with_capacity(8 + data.len());
    info.extend_from_slice(&((data.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(data.len() as i32).to_ne_bytes());
    info.extend_from_slice(data);
    info.resize(8 + data.len().div_ceil(4) * 4, 0);
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/random") {
        // SAFETY: info is a struct rand_pool_info with buf_size bytes of buffer following.
        if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } == 0 {
            // Reseed now rather than at the next periodic reseed, so that VMs restored from
            // one snapshot diverge from their first read of /dev/urandom on.
            // SAFETY: argument-less ioctl on the random device.
            unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) };
            return Ok(());
        }
    }
    use std::io::Write;
    std::fs::OpenOptions::new().write(true).open("/dev/urandom")?.write_all(data)
}

pub fn sync() {
    // SAFETY: cannot fail.
    unsafe { libc::sync() };
}

/// Kills every process except this one (PID 1 use).
pub fn kill_all() {
    // SAFETY: kill(-1) from init signals every other process.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}

/// Restarts the machine; QEMU runs with -no-reboot, so this ends the VM. Never returns.
pub fn reboot() -> ! {
    // SAFETY: reboot only returns on error (e.g. not PID 1 / no CAP_SYS_BOOT).
    unsafe {
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        // SAFETY: pause just sleeps; PID 1 must never exit.
        unsafe { libc::pause() };
    }
}

/// Test builds only: a global allocator that counts, per thread, the bytes live since the last
/// `reset` and their peak, so the fuzz tests can bound what a decoder allocates for an input.
#[cfg(test)]
pub mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        // const-initialised Cells of plain integers: reading them never allocates, and they
        // need no destructor, so the allocator may use them at any time, even at thread exit.
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn note(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    /// Starts a measurement on this thread.
    pub fn reset() {
        let _ = LIVE.try_with(|l| l.set(0));
        let _ = PEAK.try_with(|p| p.set(0));
    }

    /// Most bytes live at once on this thread since `reset`.
    pub fn peak() -> usize {
        PEAK.try_with(|p| p.get().max(0) as usize).unwrap_or(0)
    }

    pub struct Counting;

    // SAFETY: every call is forwarded unchanged to the system allocator, which upholds the
    // GlobalAlloc contract; the bookkeeping only touches thread-local integers.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size() as isize);
            // SAFETY: same layout, forwarded (the caller's contract holds for System too).
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size() as isize);
            // SAFETY: as above.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            note(-(layout.size() as isize));
            // SAFETY: ptr was allocated by System with this layout (every allocation goes there).
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size as isize - layout.size() as isize);
            // SAFETY: as for dealloc; new_size is the caller's, valid per the contract.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;
}
