//! EXEC streams: the life of a process and of its optional chain (start, signals, timeout,
//! cancel, reap, EXIT). Its stdio is an `ExecIo`: pipes (`pipes.rs`) or a pseudo-terminal
//! (`pty.rs`), which forward the bytes under flow control and decide when the output is over.
//!
//! With a chain, the stdio stays usable for the second command until it has started: the
//! stream keeps the child ends of the pipes (or the terminal's slave) open, so the first
//! command's output that is still in flight and the second's arrive in order on the same
//! channels, and EOF comes only after the last command.

use std::io;

use crate::cgroup::ExecGroup;
use crate::exec_io::ExecIo;
use crate::exec::{self, ExecError};
use crate::pipes::PipeIo;
use crate::proto::{self, ExitInfo};
use crate::proxy;
use crate::pty::TtyIo;
use crate::stream::{Ctx, Stream, Violation};
use crate::sys::{self, pid_t, Reaped};

/// The second command, until it starts.
struct Chain {
    argv: Vec<Vec<u8>>,
    env: Vec<Vec<u8>>,
    cwd: Option<Vec<u8>>,
    uid: u32,
    gid: u32,
}

pub struct ExecStream {
    io: Box<dyn ExecIo>,
    /// The running (or last) process.
    pid: pid_t,
    running: bool,
    step: u8,
    chain: Option<Chain>,
    /// First spawn (duration_us counts from here, and so does the timeout).
    start_ns: u64,
    peak_rss_kib: u64,
    deadline: u64,
    timed_out: bool,
    cancelled: bool,
    /// Set once no further process will run: what EXIT will say.
    exit: Option<ExitInfo>,
    done: bool,
    /// The exec's cgroup (PID-1 mode): every process of the exec, chain included, runs in it.
    /// Handed to the leftovers table once the last command is reaped.
    group: Option<ExecGroup>,
    /// Its processes were killed (timeout, cancel): kill the whole group.
    killed: bool,
    /// For the leftovers table: the exec's argv and whether it asked to be spared.
    argv: Vec<Vec<u8>>,
    detach: bool,
}

/// The process could not be started: message on stderr (channel 1 on a terminal, where
/// everything arrives), EOFs, EXIT `code`. No STARTED.
fn failed(cx: &mut Ctx, tty: bool, code: i32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(proto::MAX_DATA)];
    cx.send(proto::DATA, if tty { proto::STDOUT } else { proto::STDERR }, msg);
    end(cx, ExitInfo { exit_code: code, ..ExitInfo::default() });
}

fn end(cx: &mut Ctx, info: ExitInfo) {
    cx.eof(proto::STDOUT);
    cx.eof(proto::STDERR);
    cx.send(proto::EXIT, 0, &info.encode());
}

pub fn open(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    let mut req = match proto::Exec::parse(payload) {
        Ok(r) => r,
        Err(e) => {
            cx.error(proto::BAD_REQUEST, &e.to_string(), None);
            return None;
        }
    };
    // While the proxy listens: its variables, unless the request sets them (the chain too).
    proxy::add_env(&mut req.env, cx.proxy_env);
    if let Err(e) = exec::check_argv(&req.chain) {
        cx.error(proto::BAD_REQUEST, &e.to_string(), None);
        return None;
    }
    let prepared = match exec::prepare(&req.argv, &req.env, req.cwd.as_deref(), req.uid, req.gid) {
        Ok(p) => p,
        Err(e) => {
            match e.exit_code() {
                Some(code) => failed(cx, req.tty, code, e.message()),
                None => cx.error(proto::BAD_REQUEST, e.message(), None),
            }
            return None;
        }
    };
    let keep_child_ends = !req.chain.is_empty();
    let io: io::Result<Box<dyn ExecIo>> = if req.tty {
        TtyIo::new(req.cols, req.rows).map(|t| Box::new(t) as Box<dyn ExecIo>)
    } else {
        PipeIo::new(req.stdin_pipe).map(|p| Box::new(p) as Box<dyn ExecIo>)
    };
    let mut io = match io {
        Ok(io) => io,
        Err(e) => {
            let what = if req.tty { "a terminal" } else { "pipes" };
            failed(cx, req.tty, 126, &format!("supermachine: cannot create {what}: {}\n", sys::io_text(&e)));
            return None;
        }
    };
    let group = match cx.procs.cgroups.as_mut().map(|h| h.create_exec(req.pids_max, req.memory_max)).transpose() {
        Ok(g) => g,
        Err(e) => {
            failed(cx, req.tty, 126, &format!("supermachine: cannot create the exec's cgroup: {e}\n"));
            return None;
        }
    };
    let start_ns = sys::monotonic_ns();
    let (stdio, ctty) = io.child_stdio(cx.devnull());
    let pid = match prepared.start(stdio, ctty, group.as_ref().map(ExecGroup::target)) {
        Ok(pid) => pid,
        Err(e) => {
            if let Some(g) = group {
                cx.procs.settle_exec(cx.epoll, g, Vec::new(), false, false);
            }
            failed(cx, req.tty, e.exit_code().unwrap_or(126), e.message());
            return None;
        }
    };
    if !keep_child_ends {
        io.release_child_ends();
    }
    let started = proto::started(pid as u32, group.as_ref().map(|g| g.id));
    if req.started_with_next {
        cx.hold(proto::STARTED, 0, &started);
    } else {
        cx.send_lazy(proto::STARTED, 0, &started);
    }
    cx.watch_child(pid);
    let deadline = if req.timeout_ms > 0 { start_ns.saturating_add(req.timeout_ms.saturating_mul(1_000_000)) } else { 0 };
    cx.set_deadline(deadline);
    let chain = keep_child_ends.then_some(Chain { argv: req.chain, env: req.env, cwd: req.cwd, uid: req.uid, gid: req.gid });
    let mut s = ExecStream {
        io,
        pid,
        running: true,
        step: 0,
        chain,
        start_ns,
        peak_rss_kib: 0,
        deadline,
        timed_out: false,
        cancelled: false,
        exit: None,
        done: false,
        group,
        killed: false,
        argv: req.argv,
        detach: req.detach,
    };
    s.io.sync(cx);
    Some(Box::new(s))
}

impl ExecStream {
    /// Starts the chained command on the same stdio, in the same cgroup.
    fn start_chain(&mut self, cx: &mut Ctx, chain: Chain) -> Result<pid_t, ExecError> {
        let prepared = exec::prepare(&chain.argv, &chain.env, chain.cwd.as_deref(), chain.uid, chain.gid)?;
        let (stdio, ctty) = self.io.child_stdio(cx.devnull());
        prepared.start(stdio, ctty, self.group.as_ref().map(ExecGroup::target))
    }

    /// Nothing more will run: forward what is left, then EOFs and EXIT. The cgroup goes to the
    /// leftovers table (removed at once when nothing runs in it any more).
    fn conclude(&mut self, cx: &mut Ctx, exit_code: i32, signal: u32, trailer: &[u8]) {
        cx.clear_deadline(self.deadline);
        self.chain = None;
        // Whether anything of the exec still runs, read before its outcome: an empty group's
        // counts are final, so it needs no second reading when it is reused.
        let populated = self.group.as_ref().is_some_and(ExecGroup::populated);
        let (oom_killed, pids_limited) = self.group.as_mut().map_or((false, false), ExecGroup::outcome);
        self.exit = Some(ExitInfo {
            exit_code,
            signal,
            timed_out: self.timed_out,
            peak_rss_kib: self.peak_rss_kib,
            duration_us: sys::monotonic_ns().saturating_sub(self.start_ns) / 1000,
            step: self.step,
            oom_killed,
            pids_limited,
        });
        if populated {
            self.settle_group(cx);
        } else if let Some(g) = self.group.take() {
            cx.procs.settle_empty_exec(g);
        }
        self.io.release_child_ends();
        self.io.finish(cx, self.cancelled, trailer);
        self.maybe_end(cx);
    }

    fn settle_group(&mut self, cx: &mut Ctx) {
        if let Some(g) = self.group.take() {
            let argv = std::mem::take(&mut self.argv);
            cx.procs.settle_exec(cx.epoll, g, argv, self.detach, self.killed);
        }
    }

    fn maybe_end(&mut self, cx: &mut Ctx) {
        let Some(info) = self.exit else { return };
        if self.done || !self.io.output_done() {
            return;
        }
        self.done = true;
        end(cx, info);
    }

    /// Kills the exec: its whole cgroup (processes it left in the background and forks in
    /// flight included), or its process group without cgroups.
    fn kill(&mut self) {
        self.killed = true;
        match &self.group {
            Some(g) => g.kill(),
            None if self.running => {
                let _ = sys::kill(-self.pid, libc::SIGKILL);
            }
            None => {}
        }
    }
}

impl Stream for ExecStream {
    fn on_data(&mut self, cx: &mut Ctx, channel: u8, eof: bool, payload: &[u8]) -> Result<(), Violation> {
        if channel != proto::STDIN {
            return Ok(());
        }
        self.io.on_input(cx, eof, payload)
    }

    fn on_window(&mut self, cx: &mut Ctx, channel: u8, inc: u32) {
        self.io.on_window(cx, channel, inc);
        self.maybe_end(cx);
    }

    fn on_signal(&mut self, _cx: &mut Ctx, sig: &proto::Signal) {
        if self.running {
            let target = if sig.group { -self.pid } else { self.pid };
            let _ = sys::kill(target, sig.signum as i32);
        }
    }

    fn on_resize(&mut self, _cx: &mut Ctx, size: proto::Resize) {
        self.io.on_resize(size);
    }

    fn on_cancel(&mut self, cx: &mut Ctx) {
        self.cancelled = true;
        self.chain = None;
        if self.running {
            self.kill(); // concluded when reaped
        } else if self.exit.is_some() {
            self.io.finish(cx, true, &[]);
            self.maybe_end(cx);
        }
    }

    fn on_event(&mut self, cx: &mut Ctx, slot: u8, events: u32) {
        self.io.on_event(cx, slot, events);
        self.maybe_end(cx);
    }

    fn on_exit(&mut self, cx: &mut Ctx, r: &Reaped) {
        if !self.running || r.pid != self.pid {
            return;
        }
        self.running = false;
        self.peak_rss_kib = self.peak_rss_kib.max(r.maxrss_kib);
        let (exit_code, signal) = r.code_and_signal();
        if exit_code == 0 && signal == 0 && !self.cancelled && !self.timed_out {
            if let Some(chain) = self.chain.take() {
                self.step = 1;
                match self.start_chain(cx, chain) {
                    Ok(pid) => {
                        self.pid = pid;
                        self.running = true;
                        cx.watch_child(pid);
                        self.io.release_child_ends();
                    }
                    Err(e) => {
                        let code = e.exit_code().unwrap_or(126);
                        self.conclude(cx, code, 0, e.message().as_bytes());
                    }
                }
                return;
            }
        }
        self.conclude(cx, exit_code, signal, &[]);
    }

    fn on_deadline(&mut self, _cx: &mut Ctx, at: u64) {
        if at == self.deadline && self.running {
            self.kill();
            self.timed_out = true;
            self.chain = None;
        }
    }

    fn on_pause(&mut self, cx: &mut Ctx) {
        self.io.sync(cx);
    }

    fn pump(&mut self, cx: &mut Ctx) {
        self.io.pump(cx);
        self.maybe_end(cx);
    }

    fn wants_pump(&self) -> bool {
        !self.done && self.io.wants_pump()
    }

    fn abort(&mut self, cx: &mut Ctx) {
        if self.running {
            self.kill();
            cx.forget_child(self.pid);
            self.running = false;
        }
        self.settle_group(cx);
        cx.clear_deadline(self.deadline);
        self.done = true;
    }

    fn done(&self) -> bool {
        self.done
    }
}
