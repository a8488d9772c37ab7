//! The image's workload (WORKLOAD_START / WORKLOAD_SIGNAL): one process per VM, not a stream.
//! It belongs to no connection, so it keeps running across reconnections and snapshots; its
//! pid is plain state in the agent's memory, which the snapshot keeps.

use std::fmt;
use std::os::fd::RawFd;

use crate::exec::{self, ExecError};
use crate::proto;
use crate::proxy;
use crate::sys::{self, pid_t, Reaped};

#[derive(Default)]
pub struct Workload {
    pid: Option<pid_t>,
}

#[derive(Debug)]
pub enum WorkloadError {
    BadRequest(String),
    AlreadyRunning(pid_t),
    NotFound(String),
    NotRunning,
    /// Cannot start or signal it; the errno when a system call said why.
    Io(String, Option<i32>),
}

impl WorkloadError {
    pub fn code(&self) -> u32 {
        match self {
            WorkloadError::BadRequest(_) => proto::BAD_REQUEST,
            WorkloadError::AlreadyRunning(_) => proto::STREAM_IN_USE,
            WorkloadError::NotFound(_) | WorkloadError::NotRunning => proto::NOT_FOUND,
            WorkloadError::Io(..) => proto::IO,
        }
    }

    pub fn errno(&self) -> Option<i32> {
        match self {
            WorkloadError::Io(_, errno) => *errno,
            _ => None,
        }
    }
}

impl fmt::Display for WorkloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadError::BadRequest(m) | WorkloadError::NotFound(m) | WorkloadError::Io(m, _) => {
                f.write_str(m.trim_end())
            }
            WorkloadError::AlreadyRunning(pid) => write!(f, "a workload is already running (pid {pid})"),
            WorkloadError::NotRunning => f.write_str("no workload is running"),
        }
    }
}

impl Workload {
    /// Starts the workload: a process of its own session whose output goes to the agent's
    /// console, not to a stream; in the workload's cgroup when `cgroup_procs` is given.
    /// `proxy_env` is added to its environment where the request sets no value (`proxy.rs`).
    pub fn start(&mut self, payload: &[u8], devnull: RawFd, cgroup_procs: Option<RawFd>, proxy_env: &[Vec<u8>]) -> Result<pid_t, WorkloadError> {
        if let Some(pid) = self.pid {
            return Err(WorkloadError::AlreadyRunning(pid));
        }
        let mut req = proto::Exec::parse(payload).map_err(|e| WorkloadError::BadRequest(e.to_string()))?;
        proxy::add_env(&mut req.env, proxy_env);
        let prepared = exec::prepare(&req.argv, &req.env, req.cwd.as_deref(), req.uid, req.gid).map_err(|e| match e {
            ExecError::BadRequest(m) => WorkloadError::BadRequest(m),
            ExecError::NotFound(m) => WorkloadError::NotFound(m),
            ExecError::CannotStart(m, errno) => WorkloadError::Io(m, errno),
        })?;
        let cgroup = cgroup_procs.map(|procs| sys::CgroupTarget { dir: None, procs });
        let pid = prepared.start([devnull, 1, 2], None, cgroup).map_err(|e| match e {
            ExecError::CannotStart(m, errno) => WorkloadError::Io(m, errno),
            other => WorkloadError::Io(other.to_string(), None),
        })?;
        self.pid = Some(pid);
        Ok(pid)
    }

    /// Signals the workload's process group.
    pub fn signal(&self, payload: &[u8]) -> Result<(), WorkloadError> {
        let sig = match proto::Signal::parse(payload) {
            Ok(s) if (1..=64).contains(&s.signum) => s,
            Ok(_) => return Err(WorkloadError::BadRequest("signum must be 1 to 64".into())),
            Err(e) => return Err(WorkloadError::BadRequest(e.to_string())),
        };
        let pid = self.pid.ok_or(WorkloadError::NotRunning)?;
        sys::kill(-pid, sig.signum as i32).map_err(|e| WorkloadError::Io(format!("kill: {e}"), e.raw_os_error()))
    }

    /// Whether `r` was the workload (then its end is logged on the console).
    pub fn reaped(&mut self, r: &Reaped) -> bool {
        if self.pid != Some(r.pid) {
            return false;
        }
        self.pid = None;
        let (code, signal) = r.code_and_signal();
        eprintln!("supermachine-agent: workload (pid {}) ended: exit {code}, signal {signal}", r.pid);
        true
    }
}
