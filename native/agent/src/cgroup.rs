//! cgroup v2 in the guest (PID-1 mode): the agent's own group, the workload's, and one group per
//! exec with a process limit and a memory limit.
//!
//! ```text
//! /sys/fs/cgroup                cpu, memory and pids enabled for the children
//! ├── agent                     PID 1; cpu.weight 10000, so it answers (and kills) under any load
//! ├── workload                  the image's workload
//! └── exec                      every exec; memory.max = guest memory minus a reserve,
//!     └── <n>                   pids.max = threads-max minus a reserve
//!                               one exec at a time (its chain too): pids.max, memory.max,
//!                               memory.oom.group; reused by a later exec once empty
//! ```
//!
//! A child joins its group before it execs (`sys::spawn` writes `cgroup.procs` in the child), so
//! nothing it starts ever runs outside it. A timeout or a cancel writes `cgroup.kill`, which
//! takes every process of the group, including ones forked while it runs. The agent itself is
//! never the OOM killer's choice (oom_score_adj -1000; its children reset theirs).
//!
//! When an exec's last command is reaped and its group still holds processes (left running in
//! the background), the group is kept as a `Leftover` (see `background.rs`) until it empties.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sys::{self, pid_t, CgroupTarget};

pub const ROOT: &str = "/sys/fs/cgroup";
/// cpu.weight of the agent's group (the maximum; an exec's is the default 100).
const AGENT_CPU_WEIGHT: &str = "10000";
/// Guest memory kept out of reach of execs (for the agent, the kernel and the workload): an
/// eighth of it, at least 16 MiB and at most 128 MiB.
const RESERVE_MIN: u64 = 16 << 20;
const RESERVE_MAX: u64 = 128 << 20;
/// Processes (threads) kept out of reach of execs, so the agent and the workload can still fork.
const PIDS_RESERVE: u64 = 64;
/// Fewest processes an exec may start by default.
const PIDS_MIN_DEFAULT: u64 = 64;

#[derive(Debug)]
pub enum CgroupError {
    /// A step of setting the hierarchy up or of making a group failed.
    Step(String, io::Error),
}

impl fmt::Display for CgroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupError::Step(what, e) => write!(f, "{what}: {}", sys::io_text(e)),
        }
    }
}

impl CgroupError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            CgroupError::Step(_, e) => e.raw_os_error(),
        }
    }
}

fn step<T>(what: impl FnOnce() -> String, r: io::Result<T>) -> Result<T, CgroupError> {
    r.map_err(|e| CgroupError::Step(what(), e))
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    step(|| format!("write {value:?} to {}", path.display()), fs::write(path, value))
}

/// Limits of one exec's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// pids.max: processes and threads at once.
    pub pids_max: u64,
    /// memory.max, bytes.
    pub memory_max: u64,
}

/// The defaults, sized from the guest: memory (MemTotal) and threads-max (which the kernel
/// itself sizes from memory).
pub fn default_limits(mem_total: u64, threads_max: u64) -> (Limits, Limits) {
    let reserve = (mem_total / 8).clamp(RESERVE_MIN, RESERVE_MAX);
    // Whole pages: what the kernel would round memory.max to anyway.
    let memory = mem_total.saturating_sub(reserve).max(RESERVE_MIN) & !4095;
    let pids_all = threads_max.saturating_sub(PIDS_RESERVE.max(threads_max / 16)).max(PIDS_MIN_DEFAULT);
    let pids_one = (threads_max / 4).max(PIDS_MIN_DEFAULT).min(pids_all);
    // (all execs together, one exec)
    (Limits { pids_max: pids_all, memory_max: memory }, Limits { pids_max: pids_one, memory_max: memory })
}

fn mem_total() -> io::Result<u64> {
    let text = fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

fn threads_max() -> io::Result<u64> {
    fs::read_to_string("/proc/sys/kernel/threads-max")?
        .trim()
        .parse()
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Idle exec groups kept for reuse: making and removing a cgroup costs more than the rest of a
/// short exec under emulation (a fresh one about 1.5 ms, a reused one about 0.3 ms, measured
/// with a static /bin/true under TCG).
const FREE_MAX: usize = 8;
/// A group is reused only if what earlier execs left charged to it (page cache, files they
/// wrote to tmpfs, kernel objects) is below this: the next exec's memory limit counts it.
const REUSE_MAX_CHARGE: u64 = 1 << 20;

/// The agent's hierarchy: where exec groups go, their default limits, the next id, and idle
/// groups ready for reuse.
pub struct Hierarchy {
    root: PathBuf,
    pub defaults: Limits,
    /// Exec ids, and the names of the groups (`exec/<slot>`), each a counter.
    next_id: u32,
    next_slot: u32,
    free: Vec<ExecGroup>,
    /// Empty groups of finished execs, not yet checked for reuse (`recycle_later`).
    pending: Vec<ExecGroup>,
}

impl Hierarchy {
    /// PID 1: mounts cgroup2 on /sys/fs/cgroup, enables the controllers, moves the agent into
    /// its group and protects it from the OOM killer.
    pub fn init() -> Result<Hierarchy, CgroupError> {
        let root = PathBuf::from(ROOT);
        let _ = sys::mkdir(ROOT, 0o755);
        // favordynmods: a migration (every exec's child joins its group) does not wait for an
        // RCU grace period. Older kernels do not know the option.
        let flags = sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC;
        let mounted = sys::mount("cgroup2", ROOT, Some("cgroup2"), flags, Some("nsdelegate,favordynmods"))
            .or_else(|_| sys::mount("cgroup2", ROOT, Some("cgroup2"), flags, Some("nsdelegate")));
        match mounted {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {} // already mounted
            Err(e) => return Err(CgroupError::Step(format!("mount cgroup2 on {ROOT}"), e)),
        }
        let available = step(|| "read cgroup.controllers".into(), fs::read_to_string(root.join("cgroup.controllers")))?;
        let controllers: Vec<&str> =
            ["cpu", "memory", "pids"].into_iter().filter(|c| available.split_whitespace().any(|a| a == *c)).collect();
        if !controllers.contains(&"memory") || !controllers.contains(&"pids") {
            return Err(CgroupError::Step(
                format!("cgroup controllers (have {:?})", available.trim()),
                io::Error::from_raw_os_error(libc::ENOTSUP),
            ));
        }
        let enable: String = controllers.iter().map(|c| format!("+{c} ")).collect();
        write_file(&root.join("cgroup.subtree_control"), enable.trim_end())?;
        for d in ["agent", "workload", "exec"] {
            match fs::create_dir(root.join(d)) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(CgroupError::Step(format!("mkdir {ROOT}/{d}"), e))
                }
                _ => {}
            }
        }
        write_file(&root.join("agent/cgroup.procs"), "0")?;
        if controllers.contains(&"cpu") {
            write_file(&root.join("agent/cpu.weight"), AGENT_CPU_WEIGHT)?;
        }
        step(|| "set the agent's oom_score_adj".into(), sys::protect_from_oom())?;
        write_file(&root.join("exec/cgroup.subtree_control"), enable.trim_end())?;
        let mem = step(|| "read MemTotal".into(), mem_total())?;
        let threads = step(|| "read threads-max".into(), threads_max())?;
        let (total, defaults) = default_limits(mem, threads);
        write_file(&root.join("exec/memory.max"), &total.memory_max.to_string())?;
        write_file(&root.join("exec/pids.max"), &total.pids_max.to_string())?;
        let mut h = Hierarchy { root, defaults, next_id: 1, next_slot: 1, free: Vec::new(), pending: Vec::new() };
        // One idle group made at boot, so every snapshot holds it: the first exec of a restored
        // VM (and a layered child's warmup) reuses it instead of making one, which costs time
        // and memory pages the child snapshot would carry.
        match h.new_group(0, defaults) {
            Ok(g) => h.free.push(g),
            Err(e) => eprintln!("supermachine-agent: no idle exec group made ahead: {e}"),
        }
        Ok(h)
    }

    /// The workload's group, for `sys::spawn` (its cgroup.procs, open for writing).
    pub fn workload_procs(&self) -> Result<File, CgroupError> {
        let p = self.root.join("workload/cgroup.procs");
        step(|| format!("open {}", p.display()), open_write(&p))
    }

    fn take_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    /// A group for one exec, with `pids_max` / `memory_max` or the defaults: an idle one, or a
    /// new one. Each exec gets a new id (the id of the exec, not of the group).
    pub fn create_exec(&mut self, pids_max: Option<u64>, memory_max: Option<u64>) -> Result<ExecGroup, CgroupError> {
        let limits = Limits {
            pids_max: pids_max.unwrap_or(self.defaults.pids_max),
            memory_max: memory_max.unwrap_or(self.defaults.memory_max),
        };
        let id = self.take_id();
        self.settle_pending();
        while let Some(mut g) = self.free.pop() {
            if g.set_limits(limits).is_ok() {
                g.id = id;
                return Ok(g);
            }
            g.discard();
        }
        self.new_group(id, limits)
    }

    /// A new group under `exec/`, named by a counter of its own (one still there after 2^32 is
    /// skipped).
    fn new_group(&mut self, id: u32, limits: Limits) -> Result<ExecGroup, CgroupError> {
        let dir = loop {
            let slot = self.next_slot;
            self.next_slot = self.next_slot.checked_add(1).unwrap_or(1);
            let dir = self.root.join("exec").join(slot.to_string());
            match fs::create_dir(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CgroupError::Step(format!("mkdir {}", dir.display()), e)),
            }
        };
        ExecGroup::open(id, dir.clone(), limits).inspect_err(|_| {
            let _ = fs::remove_dir(&dir);
        })
    }

    /// An exec is over and nothing runs in its group any more: keep the group for the next exec
    /// if little is charged to it and there is room, remove it otherwise.
    pub fn recycle(&mut self, mut g: ExecGroup) {
        // What happened to its leftovers after the exec ended is not the next exec's.
        g.outcome();
        self.keep_or_discard(g);
    }

    /// As `recycle`, for a group whose outcome was read once it was empty; deferred until
    /// `settle_pending` (after the loop has written the exec's reply, or before the next group
    /// is handed out).
    pub fn recycle_later(&mut self, g: ExecGroup) {
        self.pending.push(g);
    }

    /// Reuses or removes the groups `recycle_later` was given.
    pub fn settle_pending(&mut self) {
        while let Some(g) = self.pending.pop() {
            self.keep_or_discard(g);
        }
    }

    fn keep_or_discard(&mut self, g: ExecGroup) {
        if self.free.len() < FREE_MAX && g.charged() <= REUSE_MAX_CHARGE {
            self.free.push(g);
        } else {
            g.discard();
        }
    }
}

fn open_write(p: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).custom_flags(libc::O_CLOEXEC).open(p)
}

fn open_read(p: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(p)
}

/// A small cgroup file read from the start (which also re-arms the EPOLLPRI of cgroup.events).
fn read_small(f: &File) -> String {
    let mut buf = [0u8; 512];
    match f.read_at(&mut buf, 0) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    }
}

fn count_of(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// One exec's group, with the files the agent reads kept open. Dropping it leaves the directory:
/// `Hierarchy::recycle` or `discard` (once it is empty) deal with it.
pub struct ExecGroup {
    /// The id of the exec running in it now.
    pub id: u32,
    dir: PathBuf,
    /// The directory, open (clone3's CLONE_INTO_CGROUP takes it).
    dir_fd: File,
    procs: File,
    events: File,
    memory_events: File,
    pids_events: File,
    memory_current: File,
    limits: Limits,
    /// Event counts when this exec began (a reused group keeps its counters).
    base_oom_kills: u64,
    base_pids_max: u64,
}

impl ExecGroup {
    fn open(id: u32, dir: PathBuf, limits: Limits) -> Result<ExecGroup, CgroupError> {
        write_file(&dir.join("pids.max"), &limits.pids_max.to_string())?;
        write_file(&dir.join("memory.max"), &limits.memory_max.to_string())?;
        // An OOM kill takes the whole exec, not one process of it picked by size.
        write_file(&dir.join("memory.oom.group"), "1")?;
        let open = |name: &str, write: bool| {
            let p = dir.join(name);
            step(|| format!("open {}", p.display()), if write { open_write(&p) } else { open_read(&p) })
        };
        let dir_fd = step(
            || format!("open {}", dir.display()),
            OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC | libc::O_DIRECTORY).open(&dir),
        )?;
        Ok(ExecGroup {
            id,
            dir_fd,
            procs: open("cgroup.procs", true)?,
            events: open("cgroup.events", false)?,
            memory_events: open("memory.events", false)?,
            pids_events: open("pids.events", false)?,
            memory_current: open("memory.current", false)?,
            dir,
            limits,
            base_oom_kills: 0,
            base_pids_max: 0,
        })
    }

    fn set_limits(&mut self, limits: Limits) -> Result<(), CgroupError> {
        if limits.pids_max != self.limits.pids_max {
            write_file(&self.dir.join("pids.max"), &limits.pids_max.to_string())?;
        }
        if limits.memory_max != self.limits.memory_max {
            write_file(&self.dir.join("memory.max"), &limits.memory_max.to_string())?;
        }
        self.limits = limits;
        Ok(())
    }

    /// For `sys::spawn`: the child is created in the group (or writes itself into it).
    pub fn target(&self) -> CgroupTarget {
        CgroupTarget { dir: Some(self.dir_fd.as_raw_fd()), procs: self.procs.as_raw_fd() }
    }

    /// `cgroup.events`, whose readiness (EPOLLPRI) signals a change of `populated`.
    pub fn events_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills every process in the group at once (cgroup.kill), forks in flight included.
    pub fn kill(&self) {
        if fs::write(self.dir.join("cgroup.kill"), "1").is_err() {
            // cgroup.kill needs Linux 5.14: signal what is there now instead.
            for pid in self.pids() {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Processes in the group now.
    pub fn pids(&self) -> Vec<pid_t> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether processes are still in the group (re-arms the events descriptor's EPOLLPRI).
    pub fn populated(&self) -> bool {
        read_small(&self.events).lines().any(|l| l.trim() == "populated 1")
    }

    /// (the OOM killer took processes of this exec, a fork failed at pids.max) since it began;
    /// the counts read become the baseline of the group's next exec.
    pub fn outcome(&mut self) -> (bool, bool) {
        let oom = count_of(&read_small(&self.memory_events), "oom_kill");
        let pids = count_of(&read_small(&self.pids_events), "max");
        let r = (oom > self.base_oom_kills, pids > self.base_pids_max);
        (self.base_oom_kills, self.base_pids_max) = (oom, pids);
        r
    }

    /// Bytes charged to the group (memory.current).
    fn charged(&self) -> u64 {
        read_small(&self.memory_current).trim().parse().unwrap_or(u64::MAX)
    }

    /// Removes the group; false if processes are still in it (it is given back untouched then).
    pub fn remove(self) -> Result<(), ExecGroup> {
        match fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(_) => Err(self),
        }
    }

    /// Removes the group if it can; a group that cannot go is left behind (and logged).
    pub fn discard(self) {
        if let Err(g) = self.remove() {
            eprintln!("supermachine-agent: cannot remove {}", g.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_sized_from_the_guest() {
        // A 256 MiB guest: MemTotal about 242 MiB, threads-max 1898.
        let (all, one) = default_limits(248_028 * 1024, 1898);
        assert_eq!(all.memory_max, (248_028 * 1024 - 248_028 * 1024 / 8) & !4095);
        assert_eq!(all.memory_max % 4096, 0);
        assert_eq!(one.memory_max, all.memory_max);
        assert_eq!(all.pids_max, 1898 - 118);
        assert_eq!(one.pids_max, 474);
        // Small guests keep at least 16 MiB and 64 processes back, big ones at most 128 MiB.
        let (all, one) = default_limits(64 << 20, 400);
        assert_eq!(all.memory_max, 48 << 20);
        assert_eq!((all.pids_max, one.pids_max), (336, 100));
        let (all, _) = default_limits(8 << 30, 60_000);
        assert_eq!(all.memory_max, (8 << 30) - (128 << 20));
        let (all, one) = default_limits(32 << 20, 100);
        assert_eq!((all.memory_max, all.pids_max, one.pids_max), (16 << 20, 64, 64));
    }

    #[test]
    fn event_counts() {
        let t = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 1\n";
        assert_eq!(count_of(t, "oom_kill"), 2);
        assert_eq!(count_of(t, "max"), 3);
        assert_eq!(count_of(t, "nope"), 0);
        let dir = std::env::temp_dir().join(format!("sm-cg-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let e = dir.join("cgroup.events");
        fs::write(&e, "populated 1\nfrozen 0\n").unwrap();
        let f = File::open(&e).unwrap();
        assert!(read_small(&f).lines().any(|l| l == "populated 1"));
        fs::write(&e, "populated 0\nfrozen 0\n").unwrap();
        assert!(!read_small(&f).lines().any(|l| l == "populated 1"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
