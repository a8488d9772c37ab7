//! Starting a process: fork, the child's set-up (session, cgroup, ids, descriptors, terminal, scheduling) and exec, reported back through a pipe; and the agent's own OOM and scheduling settings.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use super::pid_t;
use super::events::sigset_of;
use super::process::reap_blocking;

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

/// A cgroup to start a process in: its directory (for clone3's CLONE_INTO_CGROUP, which creates
/// the child there) and its `cgroup.procs` open for writing (the fallback where clone3 is
/// missing: the child moves itself in before it execs, a migration that costs a few hundred
/// microseconds under emulation).
#[derive(Debug, Clone, Copy)]
pub struct CgroupTarget {
    pub dir: Option<RawFd>,
    pub procs: RawFd,
}

/// What to start. Descriptors are installed as the child's 0, 1 and 2.
pub struct SpawnSpec<'a> {
    /// Where to look for the program, tried in order as execvp does (non-empty).
    pub paths: &'a [CString],
    pub argv: &'a [CString],
    pub env: &'a [CString],
    pub cwd: Option<&'a CStr>,
    pub stdio: [RawFd; 3],
    /// `Some((uid, gid))` to switch credentials.
    pub creds: Option<(u32, u32)>,
    /// The path of a terminal slave (also in `stdio`) to make the controlling terminal of the
    /// new session.
    pub ctty: Option<&'a CStr>,
    /// The cgroup the child starts in, so nothing it runs ever lives outside it.
    pub cgroup: Option<CgroupTarget>,
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
    /// Null-terminated.
    paths: *const *const libc::c_char,
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

/// Whether `path` is a directory (async-signal-safe: for the child).
///
/// # Safety
/// `path` must be a valid C string.
unsafe fn is_dir(path: *const libc::c_char) -> bool {
    // SAFETY: stat is plain data, filled by the kernel; `path` is valid (the caller's promise).
    let mut st: libc::stat = std::mem::zeroed();
    libc::stat(path, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

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
        // As execvp: a candidate that is missing, or that this process may not run, moves on to
        // the next; EACCES is reported only if no later one runs.
        let mut p = a.paths;
        let mut denied = false;
        let mut last = libc::ENOENT;
        while !(*p).is_null() {
            libc::execve(*p, a.argv, a.envp);
            match *libc::__errno_location() {
                e @ (libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT) => last = e,
                // A directory of that name counts as missing, as in a shell's PATH search.
                libc::EACCES if is_dir(*p) => last = libc::ENOENT,
                libc::EACCES => denied = true,
                _ => return fail(a, SpawnStage::Exec),
            }
            p = p.add(1);
        }
        *libc::__errno_location() = if denied { libc::EACCES } else { last };
        fail(a, SpawnStage::Exec)
    }
}

/// Starts a process in a new session (it leads its own process group), in `cgroup_procs`'s
/// cgroup when given. Like posix_spawn it clones with CLONE_VM | CLONE_VFORK (no copy of the
/// agent's memory; the agent waits only until the child has exec'd), but the child also joins
/// its cgroup and gives up the agent's OOM protection before it execs.
pub fn spawn(spec: &SpawnSpec) -> Result<pid_t, SpawnError> {
    let setup = |errno| SpawnError { stage: SpawnStage::Setup, errno };
    let paths = ptr_array(spec.paths);
    let argv = ptr_array(spec.argv);
    let envp = ptr_array(spec.env);
    let mut args = ChildArgs {
        paths: paths.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: spec.cwd.map_or(ptr::null(), |c| c.as_ptr()),
        stdio: spec.stdio,
        ctty: spec.ctty.is_some(),
        creds: spec.creds,
        cgroup_procs: spec.cgroup.map_or(-1, |c| c.procs),
        reset_oom: OOM_PROTECTED.load(std::sync::atomic::Ordering::Relaxed),
        sigmask: sigset_of(&[]),
        stage: STAGE_NONE,
        errno: 0,
    };
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    let into = spec.cgroup.and_then(|c| c.dir).filter(|_| CLONE3_WORKS.load(Ordering::Relaxed));
    let mut pid = -1;
    if let Some(dir) = into {
        // The child is created in its cgroup: it does not write cgroup.procs.
        args.cgroup_procs = -1;
        // SAFETY: the stack is CHILD_STACK bytes of writable memory, and `args` with all it
        // points to, outlive the child's use of them (CLONE_VFORK: the call returns once the
        // child has exec'd or exited).
        pid = unsafe { clone3_vfork(stack.as_mut_ptr(), CHILD_STACK, dir, &mut args) };
        if pid < 0 {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            if !matches!(errno, libc::ENOSYS | libc::E2BIG | libc::EINVAL) {
                return Err(SpawnError { stage: SpawnStage::Cgroup, errno });
            }
            // A kernel without clone3 or CLONE_INTO_CGROUP (before 5.7): the child joins.
            CLONE3_WORKS.store(false, Ordering::Relaxed);
            args.cgroup_procs = spec.cgroup.map_or(-1, |c| c.procs);
        }
    }
    if pid < 0 {
        // SAFETY: the stack is CHILD_STACK bytes of writable memory that outlives the child's
        // use of it (CLONE_VFORK: clone returns once the child has exec'd or exited); clone
        // aligns the top itself. `args` and everything it points to (paths, argv, envp, cwd)
        // outlive the call.
        pid = unsafe {
            let top = stack.as_mut_ptr().add(CHILD_STACK);
            libc::clone(
                spawn_child,
                top.cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&mut args as *mut ChildArgs).cast(),
            )
        };
    }
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

/// clone3's CLONE_INTO_CGROUP (Linux 5.7); not in libc 0.2.139.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// Cleared the first time the kernel refuses clone3 or CLONE_INTO_CGROUP.
static CLONE3_WORKS: AtomicBool = AtomicBool::new(true);

/// struct clone_args (version 2, with `cgroup`).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3(CLONE_VM | CLONE_VFORK | CLONE_INTO_CGROUP): runs `spawn_child(args)` on `stack` in a
/// new process created in the cgroup `cgroup_dir`, and returns its pid once it has exec'd or
/// exited (-1 with errno set if the kernel refused). glibc has no wrapper, and a child that
/// shares our memory cannot return through a libc function on a fresh stack, so the child's
/// side is written out here: it calls `spawn_child` and exits with its result.
///
/// # Safety
/// `stack` must point to `len` writable bytes that stay valid until this returns, and `args` to
/// a ChildArgs whose pointers stay valid as long.
unsafe fn clone3_vfork(stack: *mut u8, len: usize, cgroup_dir: RawFd, args: &mut ChildArgs) -> pid_t {
    let base = stack as usize;
    let top = (base + len) & !15;
    let cl = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | CLONE_INTO_CGROUP,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: base as u64,
        stack_size: (top - base) as u64,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: cgroup_dir as u64,
    };
    let ret: isize;
    // SAFETY: the parent gets the syscall's result in rax and nothing else changes for it but
    // rcx and r11 (declared). The child starts on `top`, 16-byte aligned as the call below needs,
    // never returns to Rust code and ends with exit(2), so the registers it changes (rbp, rdi and
    // the callee's) are its own.
    core::arch::asm!(
        "syscall",
        "test rax, rax",
        "jnz 2f",
        "xor ebp, ebp",
        "mov rdi, r13",
        "call r12",
        "mov edi, eax",
        "mov eax, 60", // SYS_exit
        "syscall",
        "ud2",
        "2:",
        inlateout("rax") libc::SYS_clone3 as isize => ret,
        in("rdi") &cl as *const CloneArgs,
        in("rsi") std::mem::size_of::<CloneArgs>(),
        in("r12") spawn_child as extern "C" fn(*mut libc::c_void) -> libc::c_int as usize,
        in("r13") args as *mut ChildArgs,
        lateout("rcx") _,
        lateout("r11") _,
        options(nostack),
    );
    if ret < 0 {
        // SAFETY: this thread's errno, as libc's wrappers set it.
        *libc::__errno_location() = (-ret) as i32;
        return -1;
    }
    ret as pid_t
}
