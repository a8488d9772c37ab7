//! Starting a process: fork, the child's set-up (session, cgroup, ids, descriptors, terminal, scheduling) and exec, reported back through a pipe; and the agent's own OOM and scheduling settings.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::ptr;

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
