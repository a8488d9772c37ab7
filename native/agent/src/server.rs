//! The event loop: one epoll set over the host connections (virtio ports, or unix sockets in
//! development mode), the streams' descriptors, a SIGCHLD signalfd and a timerfd for deadlines.
//! Single-threaded; nothing in it blocks on a host or a child. Events are routed by token to a
//! connection (`conn.rs`), which routes them on to one of its streams (`stream.rs`).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

use crate::conn::Conn;
use crate::shared::Shared;
use crate::cgroup::Hierarchy;
use crate::identity::Identity;
use crate::proxy::Proxy;
use crate::stream::Procs;
use crate::token::{token, ConnId, Token, T_CGROUP, T_CONN, T_DNS, T_LISTENER, T_PROXY, T_SIGNAL, T_STREAM, T_TIMER};
use crate::sys::{self, Epoll, Event, TimerFd, EPOLLIN};
use crate::workload::Workload;

/// Development mode serves at most this many unix connections at once.
pub const MAX_UNIX_CONNS: usize = 8;

#[derive(Debug)]
pub enum ServerError {
    Setup(&'static str, io::Error),
    Wait(io::Error),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Setup(what, e) => write!(f, "{what}: {e}"),
            ServerError::Wait(e) => write!(f, "epoll_wait: {e}"),
        }
    }
}

/// A virtio port to serve (PID-1 mode).
pub struct Port {
    pub fd: OwnedFd,
    pub name: String,
    /// The primary port honours SHUTDOWN.
    pub primary: bool,
}

/// Where the hosts are.
pub enum Listen {
    Ports(Vec<Port>),
    Unix(UnixListener),
}

pub struct Server {
    sh: Shared,
    sigfd: OwnedFd,
    timer: TimerFd,
    listener: Option<UnixListener>,
    listening: bool,
    /// Connections by slot (the slot is part of every epoll token).
    conns: Vec<Option<Conn>>,
}

impl Server {
    pub fn new(listen: Listen, init_mode: bool, cgroups: Option<Hierarchy>) -> Result<Server, ServerError> {
        let epoll = Epoll::new().map_err(|e| ServerError::Setup("epoll_create1", e))?;
        let sigfd = sys::sigchld_fd().map_err(|e| ServerError::Setup("signalfd", e))?;
        let timer = TimerFd::new().map_err(|e| ServerError::Setup("timerfd_create", e))?;
        let devnull: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| ServerError::Setup("open /dev/null", e))?
            .into();
        let ctl = |e| ServerError::Setup("epoll_ctl", e);
        epoll.add(sigfd.as_raw_fd(), EPOLLIN, token(T_SIGNAL, 0, 0, 0)).map_err(ctl)?;
        epoll.add(timer.raw(), EPOLLIN, token(T_TIMER, 0, 0, 0)).map_err(ctl)?;
        let mut proxy = Proxy::default();
        if init_mode {
            // The guest's own agent: load transparent egress's program now, before any snapshot.
            proxy.preload();
        }
        let mut s = Server {
            sh: Shared { epoll, procs: Procs::new(devnull, cgroups), workload: Workload::default(), identity: Identity::default(), init_mode, proxy },
            sigfd,
            timer,
            listener: None,
            listening: false,
            conns: Vec::new(),
        };
        match listen {
            Listen::Ports(ports) => {
                for (slot, p) in ports.into_iter().enumerate() {
                    s.conns.push(Some(Conn::port(slot as ConnId, p.fd, p.name, p.primary)));
                }
            }
            Listen::Unix(listener) => {
                listener.set_nonblocking(true).map_err(|e| ServerError::Setup("listener", e))?;
                s.listener = Some(listener);
                s.conns.resize_with(MAX_UNIX_CONNS, || None);
            }
        }
        Ok(s)
    }

    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events: Vec<Event> = Vec::with_capacity(128);
        loop {
            self.collect();
            let now = sys::monotonic_ns();
            let mut wake_at: Option<u64> = None;
            for conn in self.conns.iter_mut().flatten() {
                if let Some(t) = conn.prepare(&mut self.sh, now) {
                    wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
                }
            }
            // Replies are written: now the work they did not wait for.
            if let Some(h) = self.sh.procs.cgroups.as_mut() {
                h.settle_pending();
            }
            self.timer.set(self.sh.procs.next_deadline().unwrap_or(0));
            let busy = self.conns.iter().flatten().any(Conn::busy);
            let timeout_ms = match wake_at {
                _ if busy => 0,
                Some(t) => (t.saturating_sub(sys::monotonic_ns()) / 1_000_000).max(1) as i32,
                None => -1,
            };
            self.sh.epoll.wait(&mut events, timeout_ms).map_err(ServerError::Wait)?;
            for ev in &events {
                self.dispatch(*ev);
            }
            for conn in self.conns.iter_mut().flatten() {
                conn.pump_ready(&mut self.sh);
            }
        }
    }

    fn dispatch(&mut self, ev: Event) {
        let t = Token::decode(ev.token);
        match t.kind {
            T_SIGNAL => {
                sys::drain(self.sigfd.as_raw_fd());
                self.reap();
            }
            T_TIMER => {
                self.timer.fired();
                self.reap(); // an exit that raced with its deadline is not a timeout
                self.on_timer();
            }
            T_LISTENER => {} // accepted in collect(), once this batch of events is handled
            T_CONN => {
                if let Some(Some(conn)) = self.conns.get_mut(t.conn as usize) {
                    conn.on_event(&mut self.sh, ev.events);
                }
                self.check_shutdown();
            }
            T_STREAM => {
                if let Some(Some(conn)) = self.conns.get_mut(t.conn as usize) {
                    conn.on_stream_event(&mut self.sh, t.id, t.slot, ev.events);
                }
            }
            T_CGROUP => self.sh.procs.on_cgroup_event(&self.sh.epoll, t.id),
            T_PROXY => {
                if let Some(Some(conn)) = self.conns.get_mut(t.conn as usize) {
                    conn.on_proxy_ready(&mut self.sh);
                }
            }
            T_DNS => {
                if let Some(Some(conn)) = self.conns.get_mut(t.conn as usize) {
                    conn.on_dns_ready(&mut self.sh);
                }
            }
            _ => {}
        }
    }

    fn reap(&mut self) {
        while let Some(r) = sys::reap_any() {
            if self.sh.workload.reaped(&r) {
                continue;
            }
            let Some((slot, id)) = self.sh.procs.take_child(r.pid) else { continue }; // an orphan
            if let Some(Some(conn)) = self.conns.get_mut(slot as usize) {
                conn.on_child_exit(&mut self.sh, id, &r);
            }
        }
    }

    fn on_timer(&mut self) {
        let now = sys::monotonic_ns();
        while let Some((at, slot, id)) = self.sh.procs.pop_due(now) {
            if let Some(Some(conn)) = self.conns.get_mut(slot as usize) {
                conn.on_deadline(&mut self.sh, id, at);
            }
        }
    }

    /// SHUTDOWN: kill everything and reboot (PID 1), or end the development server.
    fn check_shutdown(&mut self) {
        if !self.conns.iter().flatten().any(|c| c.shutdown) {
            return;
        }
        if self.sh.init_mode {
            sys::kill_all();
            sys::sync();
            sys::reboot();
        }
        for conn in self.conns.iter_mut().flatten() {
            conn.abort_all(&mut self.sh);
        }
        std::process::exit(0);
    }

    /// Frees the slots of closed development-mode connections and accepts new ones.
    fn collect(&mut self) {
        for slot in self.conns.iter_mut() {
            if slot.as_ref().is_some_and(Conn::closed) {
                *slot = None;
            }
        }
        let Some(listener) = &self.listener else { return };
        while let Some(free) = self.conns.iter().position(Option::is_none) {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) => break, // WouldBlock: nobody waiting (other errors: try again later)
            };
            if stream.set_nonblocking(true).is_ok() {
                self.conns[free] = Some(Conn::unix(free as ConnId, stream));
            }
        }
        // Full: leave further clients in the backlog until a slot frees.
        let want = self.conns.iter().any(Option::is_none);
        if want != self.listening {
            let fd = listener.as_raw_fd();
            if want {
                self.listening = self.sh.epoll.add(fd, EPOLLIN, token(T_LISTENER, 0, 0, 0)).is_ok();
            } else {
                self.sh.epoll.delete(fd);
                self.listening = false;
            }
        }
    }
}
