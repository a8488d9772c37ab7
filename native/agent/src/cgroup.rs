//! cgroup v2 in the guest (PID-1 mode): the agent's own group, the workload's, and one group per
//! exec with a process limit and a memory limit.
//!
//! ```text
//! /sys/fs/cgroup                cpu, memory and pids enabled for the children
//! ├── agent                     PID 1; cpu.weight 10000, so it answers (and kills) under any load
//! ├── workload                  the image's workload
//! └── exec                      every exec; memory.max = guest memory minus a reserve,
//!     └── <id>                  pids.max = threads-max minus a reserve
//!                               one exec (its chain too): pids.max, memory.max, memory.oom.group
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

use crate::sys::{self, pid_t};

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
    let memory = mem_total.saturating_sub(reserve).max(RESERVE_MIN);
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

/// The agent's hierarchy: where exec groups go, their default limits, the next id.
pub struct Hierarchy {
    root: PathBuf,
    pub defaults: Limits,
    next_id: u32,
}

impl Hierarchy {
    /// PID 1: mounts cgroup2 on /sys/fs/cgroup, enables the controllers, moves the agent into
    /// its group and protects it from the OOM killer.
    pub fn init() -> Result<Hierarchy, CgroupError> {
        let root = PathBuf::from(ROOT);
        let _ = sys::mkdir(ROOT, 0o755);
        // favordynmods: a migration (every exec's child joins its group) does not wait for an
        // RCU grace period. Older kernels do not know the option.
        let mounted = sys::mount("cgroup2", ROOT, Some("cgroup2"), sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC, Some("nsdelegate,favordynmods"))
            .or_else(|_| sys::mount("cgroup2", ROOT, Some("cgroup2"), sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC, Some("nsdelegate")));
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
        Ok(Hierarchy { root, defaults, next_id: 1 })
    }

    /// The workload's group, for `sys::spawn` (its cgroup.procs, open for writing).
    pub fn workload_procs(&self) -> Result<File, CgroupError> {
        let p = self.root.join("workload/cgroup.procs");
        step(|| format!("open {}", p.display()), OpenOptions::new().write(true).custom_flags(libc::O_CLOEXEC).open(&p))
    }

    /// A new group for one exec, with `pids_max` / `memory_max` or the defaults.
    pub fn create_exec(&mut self, pids_max: Option<u64>, memory_max: Option<u64>) -> Result<ExecGroup, CgroupError> {
        let limits = Limits {
            pids_max: pids_max.unwrap_or(self.defaults.pids_max),
            memory_max: memory_max.unwrap_or(self.defaults.memory_max),
        };
        // Ids wrap after 2^32 execs; a group still there under an id is skipped.
        let (id, dir) = loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            let dir = self.root.join("exec").join(id.to_string());
            match fs::create_dir(&dir) {
                Ok(()) => break (id, dir),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CgroupError::Step(format!("mkdir {}", dir.display()), e)),
            }
        };
        let group = ExecGroup::open(id, dir.clone(), limits).inspect_err(|_| {
            let _ = fs::remove_dir(&dir);
        })?;
        Ok(group)
    }
}

/// One exec's group. Dropping it does not remove the directory: `remove` does, once it is empty.
pub struct ExecGroup {
    pub id: u32,
    dir: PathBuf,
    procs: File,
}

impl ExecGroup {
    fn open(id: u32, dir: PathBuf, limits: Limits) -> Result<ExecGroup, CgroupError> {
        write_file(&dir.join("pids.max"), &limits.pids_max.to_string())?;
        write_file(&dir.join("memory.max"), &limits.memory_max.to_string())?;
        // An OOM kill takes the whole exec, not one process of it picked by size.
        write_file(&dir.join("memory.oom.group"), "1")?;
        let p = dir.join("cgroup.procs");
        let procs = step(|| format!("open {}", p.display()), OpenOptions::new().write(true).custom_flags(libc::O_CLOEXEC).open(&p))?;
        Ok(ExecGroup { id, dir, procs })
    }

    /// For `sys::spawn`: the child writes itself into this.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
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

    /// How many of its processes the OOM killer took (memory.events `oom_kill`).
    pub fn oom_kills(&self) -> u64 {
        event_count(&self.dir.join("memory.events"), "oom_kill")
    }

    /// How often a fork failed at pids.max (pids.events `max`).
    pub fn pids_max_hits(&self) -> u64 {
        event_count(&self.dir.join("pids.events"), "max")
    }

    /// Removes the group if nothing runs in it any more; gives it back otherwise.
    pub fn remove(self) -> Result<(), ExecGroup> {
        match fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(_) => Err(self),
        }
    }

    /// Opens `cgroup.events`, whose readiness (EPOLLPRI) signals a change of `populated`.
    pub fn open_events(&self) -> io::Result<File> {
        OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(self.dir.join("cgroup.events"))
    }
}

/// Reads `cgroup.events` from the start (which also re-arms its EPOLLPRI): whether processes
/// are still in the group.
pub fn populated(events: &File) -> bool {
    let mut buf = [0u8; 128];
    match events.read_at(&mut buf, 0) {
        Ok(n) => {
            let text = String::from_utf8_lossy(&buf[..n]);
            text.lines().any(|l| l.trim() == "populated 1")
        }
        Err(_) => false,
    }
}

fn event_count(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_sized_from_the_guest() {
        // A 256 MiB guest: MemTotal about 242 MiB, threads-max 1898.
        let (all, one) = default_limits(242 << 20, 1898);
        assert_eq!(all.memory_max, (242 << 20) - (242u64 << 20) / 8);
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
        let dir = std::env::temp_dir().join(format!("sm-cg-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("memory.events");
        fs::write(&p, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 1\n").unwrap();
        assert_eq!(event_count(&p, "oom_kill"), 2);
        assert_eq!(event_count(&p, "max"), 3);
        assert_eq!(event_count(&p, "nope"), 0);
        let e = dir.join("cgroup.events");
        fs::write(&e, "populated 1\nfrozen 0\n").unwrap();
        assert!(populated(&File::open(&e).unwrap()));
        fs::write(&e, "populated 0\nfrozen 0\n").unwrap();
        assert!(!populated(&File::open(&e).unwrap()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
