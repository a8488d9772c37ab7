//! One host connection (a virtio port, or an accepted unix socket in development mode): framing,
//! the output queue and its high-water pause, HELLO state, and the connection's streams, to
//! which it dispatches frames. Connections are independent: each has its own stream ids, flow
//! control and pause; only the process table, the workload and the proxy listener (in `Shared`)
//! are common. The connection that owns the proxy listener accepts its clients as PROXY_CONN
//! streams, the only ones the agent opens (ids from 2^31 up).
//!
//! A virtio port stays open for the VM's life; its host side comes and goes. While the host is
//! away the port is registered edge-triggered, so the agent wakes only when the port changes
//! (see `Conn::update_interest`).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::proto::{self, Header};
use crate::shared::Shared;
use crate::stream::{Ctx, Output, Stream, Violation, OUT_HIGH, OUT_LOW};
use crate::token::{token, ConnId, T_CONN};
use crate::sys::{self, Reaped, EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLOUT};
use crate::{bench, files, fs_ops, proxy, stream_exec, tcp, watch};

const READ_CHUNK: usize = 256 * 1024;

pub enum Transport {
    /// A virtio-serial port, opened once for the VM's life. `connected` follows its host side.
    Port { fd: OwnedFd, name: String, connected: bool },
    /// An accepted development-mode connection; None once it has closed.
    Unix(Option<UnixStream>),
}

pub struct Conn {
    slot: ConnId,
    transport: Transport,
    /// SHUTDOWN is honoured (the primary port; every development-mode connection).
    shutdown_allowed: bool,
    inbuf: Vec<u8>,
    out: Output,
    /// Events the connection descriptor is registered for.
    registered: Option<u32>,
    /// The last write hit EAGAIN: wait for EPOLLOUT.
    want_write: bool,
    hello: bool,
    /// GOAWAY sent: discard all input, send nothing more.
    dead: bool,
    paused: bool,
    /// The host asked for SHUTDOWN (the server acts on it).
    pub shutdown: bool,
    streams: HashMap<u32, Box<dyn Stream>>,
    /// Streams whose `pump` is to be called (their work is not signalled by a descriptor).
    ready: BTreeSet<u32>,
    /// Open PROXY_CONN streams (ids from 2^31 up).
    proxy_streams: usize,
    /// The next PROXY_CONN id to try (increasing, wrapping within 2^31..=2^32-1).
    next_proxy_id: u32,
}

impl Conn {
    pub fn port(slot: ConnId, fd: OwnedFd, name: String, primary: bool) -> Conn {
        // Starts "disconnected": the first event of the edge-triggered registration tells.
        Conn::new(slot, Transport::Port { fd, name, connected: false }, primary)
    }

    pub fn unix(slot: ConnId, stream: UnixStream) -> Conn {
        let mut c = Conn::new(slot, Transport::Unix(Some(stream)), true);
        c.out.open = true;
        c
    }

    fn new(slot: ConnId, transport: Transport, shutdown_allowed: bool) -> Conn {
        Conn {
            slot,
            transport,
            shutdown_allowed,
            inbuf: Vec::new(),
            out: Output::new(),
            registered: None,
            want_write: false,
            hello: false,
            dead: false,
            paused: false,
            shutdown: false,
            streams: HashMap::new(),
            ready: BTreeSet::new(),
            proxy_streams: 0,
            next_proxy_id: proto::AGENT_STREAM_MIN,
        }
    }

    /// A development-mode connection that has ended (the server frees its slot).
    pub fn closed(&self) -> bool {
        matches!(self.transport, Transport::Unix(None))
    }

    /// The descriptor to talk to the host on, if one is there.
    fn fd(&self) -> Option<RawFd> {
        match &self.transport {
            Transport::Port { fd, connected: true, .. } => Some(fd.as_raw_fd()),
            Transport::Port { .. } => None,
            Transport::Unix(s) => s.as_ref().map(|s| s.as_raw_fd()),
        }
    }

    fn port_name(&self) -> Option<&str> {
        match &self.transport {
            Transport::Port { name, .. } => Some(name),
            Transport::Unix(_) => None,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Loop hooks

    /// Before the loop sleeps: writes what is due, updates the pause and the epoll interest.
    /// Returns the time at which lazily queued output must be written, if any.
    pub fn prepare(&mut self, sh: &mut Shared, now: u64) -> Option<u64> {
        match self.out.lazy_deadline {
            Some(t) if now < t => {}
            _ => {
                self.out.lazy_deadline = None;
                self.flush(sh);
            }
        }
        self.update_pause(sh);
        self.update_interest(sh);
        sh.proxy.update_interest(&sh.epoll, self.slot, self.proxy_streams);
        // Late RESOLVEs are answered SERVFAIL on the DNS socket (not through `out`).
        let dns_due = sh.proxy.dns_expire(self.slot, now);
        match (self.out.lazy_deadline, dns_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the loop must not sleep: some stream has pump work and may produce.
    pub fn busy(&self) -> bool {
        !self.ready.is_empty() && !self.paused && self.out.open
    }

    pub fn on_event(&mut self, sh: &mut Shared, events: u32) {
        if let Transport::Port { connected: false, .. } = self.transport {
            // Edge-triggered wake-up of a port without host: HUP means still nobody there
            // (PORT_OPEN 0, or a stray wake-up); without HUP the host has connected.
            if events & (EPOLLHUP | EPOLLERR) == 0 {
                self.on_host_connected();
            }
            return;
        }
        if events & EPOLLOUT != 0 {
            self.flush(sh);
        }
        if events & (EPOLLIN | EPOLLHUP | EPOLLERR) != 0 {
            self.on_readable(sh);
        }
    }

    pub fn on_stream_event(&mut self, sh: &mut Shared, id: u32, slot: u8, events: u32) {
        self.call(sh, id, |s, cx| s.on_event(cx, slot, events));
    }

    pub fn on_child_exit(&mut self, sh: &mut Shared, id: u32, reaped: &Reaped) {
        self.call(sh, id, |s, cx| s.on_exit(cx, reaped));
    }

    pub fn on_deadline(&mut self, sh: &mut Shared, id: u32, at: u64) {
        self.call(sh, id, |s, cx| s.on_deadline(cx, at));
    }

    /// Gives every stream with pump work one turn (while the output has room).
    pub fn pump_ready(&mut self, sh: &mut Shared) {
        if self.paused || !self.out.open {
            return;
        }
        let ids: Vec<u32> = self.ready.iter().copied().collect();
        for id in ids {
            if self.out.pending() >= OUT_HIGH {
                return;
            }
            self.call(sh, id, |s, cx| s.pump(cx));
        }
    }

    /// Ends every stream of this connection (killing their processes) and closes its proxy
    /// listener, without messages.
    pub fn abort_all(&mut self, sh: &mut Shared) {
        sh.proxy.stop(self.slot);
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.abort_stream(sh, id);
        }
        self.ready.clear();
    }

    // -----------------------------------------------------------------------------------------
    // Stream calls

    /// Calls into one stream with its context, then forgets it if it has ended.
    fn call<R>(&mut self, sh: &mut Shared, id: u32, f: impl FnOnce(&mut dyn Stream, &mut Ctx) -> R) -> Option<R> {
        let s = self.streams.get_mut(&id)?;
        let mut cx = sh.ctx(id, self.slot, &mut self.out, self.paused);
        let r = f(s.as_mut(), &mut cx);
        self.settle(sh, id);
        Some(r)
    }

    fn settle(&mut self, sh: &mut Shared, id: u32) {
        let Some(s) = self.streams.get(&id) else { return };
        if s.done() {
            self.forget(sh, id);
        } else if s.wants_pump() {
            self.ready.insert(id);
        } else {
            self.ready.remove(&id);
        }
    }

    fn abort_stream(&mut self, sh: &mut Shared, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            let mut cx = sh.ctx(id, self.slot, &mut self.out, self.paused);
            s.abort(&mut cx);
        }
        self.forget(sh, id);
    }

    /// Drops an ended stream. One that ends makes room for a proxy client (and descriptors
    /// for a starved listener).
    fn forget(&mut self, sh: &mut Shared, id: u32) {
        self.ready.remove(&id);
        if self.streams.remove(&id).is_some() {
            if id >= proto::AGENT_STREAM_MIN {
                self.proxy_streams -= 1;
            }
            sh.proxy.resume(self.slot);
        }
    }

    // -----------------------------------------------------------------------------------------
    // The proxy listener

    /// The listener has clients waiting: each becomes a PROXY_CONN stream, up to `max_streams`.
    pub fn on_proxy_ready(&mut self, sh: &mut Shared) {
        for _ in 0..proxy::ACCEPT_BATCH {
            let Some((sock, peer_port, dst)) = sh.proxy.accept(self.slot, self.proxy_streams) else { return };
            let slot = self.slot;
            let id = self.next_free_proxy_id(&|i| sh.proxy.dns_owns(slot, i));
            let name = dst.as_ref().and_then(|d| sh.proxy.fake_name(d));
            self.out.send(proto::PROXY_CONN, 0, id, &proto::proxy_conn(peer_port, dst, name.as_deref()));
            let mut cx = sh.ctx(id, self.slot, &mut self.out, self.paused);
            let stream = tcp::accepted(&mut cx, sock);
            self.streams.insert(id, stream);
            self.proxy_streams += 1;
            self.settle(sh, id);
        }
    }

    /// The next id from 2^31 up that no stream uses, nor (`taken`) a pending RESOLVE; or the
    /// DNS responder (`Proxy::dns_owns`). At most MAX_PROXY_STREAMS + 64 are used: one is free.
    fn next_free_proxy_id(&mut self, taken: &dyn Fn(u32) -> bool) -> u32 {
        loop {
            let id = self.next_proxy_id;
            self.next_proxy_id = id.checked_add(1).unwrap_or(proto::AGENT_STREAM_MIN);
            if !self.streams.contains_key(&id) && !taken(id) {
                return id;
            }
        }
    }

    /// The DNS responder has queries: each name the agent has no verdict for becomes a RESOLVE
    /// on an agent id, answered by the host's OK (`on_resolve_answer`).
    pub fn on_dns_ready(&mut self, sh: &mut Shared) {
        let now = sys::monotonic_ns();
        let slot = self.slot;
        let asks = {
            let streams = &self.streams;
            let next = &mut self.next_proxy_id;
            let mut new_id = |taken: &dyn Fn(u32) -> bool| loop {
                let id = *next;
                *next = id.checked_add(1).unwrap_or(proto::AGENT_STREAM_MIN);
                if !streams.contains_key(&id) && !taken(id) {
                    return id;
                }
            };
            sh.proxy.dns_readable(slot, now, &mut new_id)
        };
        for (id, payload) in asks {
            self.out.send(proto::RESOLVE, 0, id, &payload);
        }
    }

    /// The host's OK or STREAM_ERROR on an agent id: a RESOLVE's answer, if it is one.
    fn on_resolve_answer(&mut self, sh: &mut Shared, ty: u8, id: u32, payload: &[u8]) {
        if !sh.proxy.dns_owns(self.slot, id) {
            return;
        }
        let answer = if ty == proto::OK { proto::ResolveAnswer::parse(payload).ok() } else { None };
        sh.proxy.dns_answer(self.slot, id, answer, sys::monotonic_ns());
    }

    /// Closes this connection's listener, if it has one, and ends its PROXY_CONN streams
    /// (resetting their sockets): with `STREAM_ERROR IO` on PROXY_STOP (and a replacing
    /// PROXY_LISTEN), silently on HELLO.
    fn stop_proxy(&mut self, sh: &mut Shared, announce: bool) {
        sh.proxy.stop(self.slot);
        let ids: Vec<u32> = self.streams.keys().copied().filter(|&id| id >= proto::AGENT_STREAM_MIN).collect();
        for id in ids {
            self.abort_stream(sh, id);
            if announce {
                self.out.error(id, proto::IO, "proxy stopped", None);
            }
        }
    }

    fn on_proxy_listen(&mut self, sh: &mut Shared, id: u32, payload: &[u8]) {
        let req = match sh.proxy.check_listen(self.slot, self.shutdown_allowed, payload) {
            Ok((req, replaces)) => {
                if replaces {
                    self.stop_proxy(sh, true);
                }
                req
            }
            Err(e) => return self.out.error(id, e.code(), &e.to_string(), e.errno()),
        };
        match sh.proxy.listen(self.slot, req) {
            Ok(port) => self.out.send(proto::OK, 0, id, &proto::ok_port(port)),
            Err(e) => self.out.error(id, e.code(), &e.to_string(), e.errno()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // The host side

    fn on_host_connected(&mut self) {
        if let Transport::Port { connected, .. } = &mut self.transport {
            *connected = true;
        }
        self.reset_state();
        self.out.open = true;
    }

    fn reset_state(&mut self) {
        self.next_proxy_id = proto::AGENT_STREAM_MIN;
        self.inbuf.clear();
        self.out.clear();
        self.want_write = false;
        self.hello = false;
        self.dead = false;
        self.paused = false;
    }

    /// The host went away: end every stream of this connection and wait for the next host.
    fn disconnect(&mut self, sh: &mut Shared) {
        self.abort_all(sh);
        self.reset_state();
        self.out.open = false;
        match &mut self.transport {
            // Dropping the socket also takes it out of the epoll set.
            Transport::Unix(s) => *s = None,
            // update_interest re-registers the port edge-triggered.
            Transport::Port { connected, .. } => *connected = false,
        }
    }

    /// Registers the connection descriptor for what it needs now.
    ///
    /// A port without host: `port_fops_poll` (drivers/char/virtio_console.c, Linux 6.1)
    /// reports EPOLLHUP, and EPOLLIN too (`will_read_block` is false when !host_connected), for
    /// as long as the host is away, so a level-triggered registration would wake the loop
    /// without end (hence the 20 ms re-poll timer of version 1). Edge-triggered, epoll re-checks
    /// the port only when its waitqueue is woken: by the VIRTIO_CONSOLE_PORT_OPEN control
    /// message (`handle_control_message` wakes `port->waitqueue` whether the host opens or
    /// closes), by incoming data (`in_intr`) and by reclaimed output (`out_intr`) — none of
    /// which happens while nobody is there. EPOLL_CTL_ADD/MOD check readiness once, so the
    /// switch itself costs one event (with HUP). When the host connects, the next event has
    /// EPOLLOUT (writable again) or EPOLLIN (its first bytes) and no HUP: the connection starts
    /// afresh (`on_host_connected`) and goes back to level-triggered interest. An idle port
    /// thus costs no wake-ups, connected or not. (O_ASYNC + F_SETOWN would work too — the same
    /// PORT_OPEN handler calls `send_sigio_to_port` — but would need SIGIO in the signalfd and
    /// a second path into the loop; edge-triggered epoll keeps the port's events where they
    /// were.)
    fn update_interest(&mut self, sh: &mut Shared) {
        let (fd, want) = match &self.transport {
            Transport::Port { fd, connected: false, .. } => (fd.as_raw_fd(), EPOLLIN | EPOLLOUT | EPOLLET),
            _ => {
                let Some(fd) = self.fd() else { return };
                let mut want = if self.paused && !self.dead { 0 } else { EPOLLIN };
                if self.want_write {
                    want |= EPOLLOUT;
                }
                if want == 0 {
                    want = EPOLLOUT; // paused implies queued output; keeps HUP/ERR reporting alive
                }
                (fd, want)
            }
        };
        if self.registered == Some(want) {
            return;
        }
        let tok = token(T_CONN, self.slot, 0, 0);
        let r = match self.registered {
            Some(_) => sh.epoll.modify(fd, want, tok),
            None => sh.epoll.add(fd, want, tok),
        };
        match r {
            Ok(()) => self.registered = Some(want),
            Err(e) => {
                eprintln!("supermachine-agent: cannot watch the host connection: {e}");
                if matches!(self.transport, Transport::Unix(_)) {
                    self.disconnect(sh);
                }
            }
        }
    }

    fn update_pause(&mut self, sh: &mut Shared) {
        let pending = self.out.pending();
        let paused = if self.paused { pending > OUT_LOW } else { pending >= OUT_HIGH };
        if paused == self.paused {
            return;
        }
        self.paused = paused;
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.call(sh, id, |s, cx| s.on_pause(cx));
        }
    }

    fn flush(&mut self, sh: &mut Shared) {
        let Some(fd) = self.fd() else {
            self.out.clear();
            return;
        };
        match self.out.write_to(fd) {
            Ok(true) => {
                self.want_write = false;
                if self.dead && matches!(self.transport, Transport::Unix(_)) {
                    self.disconnect(sh); // development mode: GOAWAY delivered, close the connection
                }
            }
            Ok(false) => self.want_write = true,
            Err(_) => self.disconnect(sh),
        }
    }

    fn on_readable(&mut self, sh: &mut Shared) {
        let Some(fd) = self.fd() else { return };
        match sys::read_append(fd, &mut self.inbuf, READ_CHUNK) {
            Ok(n) if n > 0 => {}
            Err(ref e) if e.kind() == io::ErrorKind::WouldBlock => return,
            _ => {
                // EOF or error: the host side closed (a virtio port reads 0 when the host is gone).
                self.disconnect(sh);
                return;
            }
        }
        if self.dead {
            self.inbuf.clear();
            return;
        }
        self.process_input(sh);
    }

    fn process_input(&mut self, sh: &mut Shared) {
        let buf = std::mem::take(&mut self.inbuf);
        let mut pos = 0;
        loop {
            match proto::decode_frame(&buf[pos..]) {
                Ok(None) => break,
                Ok(Some((h, total))) => {
                    let payload = &buf[pos + proto::HEADER_LEN..pos + total];
                    pos += total;
                    self.on_frame(sh, h, payload);
                    if self.dead || self.shutdown || self.fd().is_none() {
                        pos = buf.len();
                        break;
                    }
                }
                Err(e) => {
                    self.goaway(sh, proto::PROTOCOL, &e.to_string());
                    pos = buf.len();
                    break;
                }
            }
        }
        let mut buf = buf;
        buf.drain(..pos);
        if self.inbuf.is_empty() {
            self.inbuf = buf;
        }
    }

    fn goaway(&mut self, sh: &mut Shared, code: u32, message: &str) {
        self.abort_all(sh);
        self.out.send(proto::GOAWAY, 0, 0, &proto::error_fields(code, message, None));
        self.out.open = false;
        self.dead = true;
    }

    // -----------------------------------------------------------------------------------------
    // Frames

    fn on_frame(&mut self, sh: &mut Shared, h: Header, payload: &[u8]) {
        if !self.hello && h.ty != proto::HELLO {
            return;
        }
        let id = h.stream;
        match h.ty {
            proto::HELLO => self.on_hello(sh, payload),
            proto::PING => self.out.send(proto::PONG, 0, id, payload),
            proto::SHUTDOWN => self.shutdown |= self.shutdown_allowed,
            proto::EXEC | proto::WRITE_FILE | proto::READ_FILE | proto::SPAWN_BENCH | proto::TCP_CONNECT => {
                self.open_stream(sh, h, payload)
            }
            proto::FS_STAT | proto::FS_LIST | proto::FS_MKDIR | proto::FS_RENAME | proto::FS_REMOVE | proto::FS_WATCH => {
                self.open_stream(sh, h, payload)
            }
            proto::DATA => {
                let channel = h.flags & proto::CHANNEL_MASK;
                let eof = h.flags & proto::FLAG_EOF != 0;
                if let Some(Err(Violation(msg))) = self.call(sh, id, |s, cx| s.on_data(cx, channel, eof, payload)) {
                    self.goaway(sh, proto::PROTOCOL, &format!("stream {id}: {msg}"));
                }
            }
            proto::WINDOW => {
                let Ok(inc) = proto::parse_window(payload) else { return };
                let channel = h.flags & proto::CHANNEL_MASK;
                self.call(sh, id, |s, cx| s.on_window(cx, channel, inc));
            }
            proto::SIGNAL => {
                let Ok(sig) = proto::Signal::parse(payload) else { return };
                if sig.signum <= 64 {
                    self.call(sh, id, |s, cx| s.on_signal(cx, &sig));
                }
            }
            proto::RESIZE => {
                let Ok(size) = proto::Resize::parse(payload) else { return };
                if size.is_valid() {
                    self.call(sh, id, |s, cx| s.on_resize(cx, size));
                }
            }
            proto::CANCEL => {
                self.call(sh, id, |s, cx| s.on_cancel(cx));
            }
            proto::WORKLOAD_START if id != 0 => {
                let procs = match sh.procs.cgroups.as_ref().map(|h| h.workload_procs()).transpose() {
                    Ok(f) => f,
                    Err(e) => return self.out.error(id, proto::IO, &format!("workload cgroup: {e}"), e.errno()),
                };
                let devnull = sh.procs.devnull.as_raw_fd();
                match sh.workload.start(payload, devnull, procs.as_ref().map(|f| f.as_raw_fd()), sh.proxy.env()) {
                    Ok(pid) => self.out.send(proto::OK, 0, id, &proto::ok_pid(pid as u32)),
                    Err(e) => self.out.error(id, e.code(), &e.to_string(), e.errno()),
                }
            }
            proto::LIST_BACKGROUND if id != 0 => {
                let list = sh.procs.background.list();
                self.out.send(proto::OK, 0, id, &list);
            }
            proto::KILL_BACKGROUND if id != 0 => match proto::parse_kill_background(payload) {
                Ok(target) => {
                    let n = sh.procs.background.kill(target);
                    self.out.send(proto::OK, 0, id, &proto::ok_killed(n));
                }
                Err(e) => self.out.error(id, proto::BAD_REQUEST, &e.to_string(), None),
            },
            proto::PROXY_LISTEN if id != 0 => self.on_proxy_listen(sh, id, payload),
            proto::OK | proto::STREAM_ERROR if id >= proto::AGENT_STREAM_MIN => self.on_resolve_answer(sh, h.ty, id, payload),
            proto::PROXY_STOP if id != 0 => {
                self.stop_proxy(sh, true);
                self.out.send(proto::OK, 0, id, &[]);
            }
            proto::WORKLOAD_SIGNAL if id != 0 => match sh.workload.signal(payload) {
                Ok(()) => self.out.send(proto::OK, 0, id, &[]),
                Err(e) => self.out.error(id, e.code(), &e.to_string(), e.errno()),
            },
            other => {
                let msg = format!("unsupported message type 0x{other:02x}");
                if id == 0 {
                    self.goaway(sh, proto::UNSUPPORTED, &msg);
                } else {
                    self.abort_stream(sh, id);
                    self.out.error(id, proto::UNSUPPORTED, &msg, None);
                }
            }
        }
    }

    fn on_hello(&mut self, sh: &mut Shared, payload: &[u8]) {
        // A restore or handoff never inherits a listener: the host listens again if it wants.
        self.stop_proxy(sh, false);
        // Nor a directory watch: the host that opened it is not the one saying HELLO.
        let ids: Vec<u32> = self.streams.iter().filter(|(_, s)| s.ends_on_hello()).map(|(&id, _)| id).collect();
        for id in ids {
            self.abort_stream(sh, id);
        }
        let hello = match proto::Hello::parse(payload) {
            Ok(h) => h,
            Err(e) => return self.goaway(sh, proto::PROTOCOL, &format!("bad HELLO: {e}")),
        };
        if hello.version_min > proto::VERSION || hello.version_max < proto::VERSION {
            let msg = format!(
                "agent speaks version {} only, host offered {}..={}",
                proto::VERSION,
                hello.version_min,
                hello.version_max
            );
            return self.goaway(sh, proto::VERSION_ERR, &msg);
        }
        if sh.init_mode {
            if let Some(ns) = hello.host_time_ns {
                if let Err(e) = sys::set_realtime_ns(ns) {
                    eprintln!("supermachine-agent: cannot set the clock: {e}");
                }
            }
            if let Err(e) = sys::add_entropy(&hello.entropy) {
                eprintln!("supermachine-agent: cannot add entropy: {e}");
            }
        }
        // A new VM id (a restore, a handoff): a new identity, drawn from the RNG just reseeded.
        // Only the host library's own port may rename the VM. HELLO_OK names the id taken, so
        // the host can tell that it took.
        let mut taken = None;
        if let (true, true, Some(id)) = (sh.init_mode, self.shutdown_allowed, hello.vm_id.as_deref()) {
            match sh.identity.assume(id) {
                Ok(_) => taken = Some(id),
                Err(e) => eprintln!("supermachine-agent: cannot take the VM id: {e}"),
            }
        }
        self.hello = true;
        let limits = sh.procs.cgroups.as_ref().map(|h| (h.defaults.pids_max, h.defaults.memory_max));
        let ok = proto::hello_ok(env!("CARGO_PKG_VERSION"), sys::monotonic_ns() / 1_000_000, self.port_name(), taken, limits);
        self.out.send(proto::HELLO_OK, 0, 0, &ok);
    }

    fn open_stream(&mut self, sh: &mut Shared, h: Header, payload: &[u8]) {
        let id = h.stream;
        if id == 0 {
            return self.goaway(sh, proto::PROTOCOL, "a stream cannot be opened on id 0");
        }
        if id >= proto::AGENT_STREAM_MIN {
            // The agent's ids: the host opens nothing there. Like a reused id, this is the
            // id's one terminal message, so a PROXY_CONN stream on it ends too.
            self.abort_stream(sh, id);
            return self.out.error(id, proto::BAD_REQUEST, "stream ids from 2^31 up are the agent's", None);
        }
        if self.streams.contains_key(&id) {
            // The id's one terminal message is this error, so the old stream ends with it.
            self.abort_stream(sh, id);
            return self.out.error(id, proto::STREAM_IN_USE, "stream id already in use", None);
        }
        let mut cx = sh.ctx(id, self.slot, &mut self.out, self.paused);
        let stream = match h.ty {
            proto::EXEC => stream_exec::open(&mut cx, payload),
            proto::WRITE_FILE => files::open_write(&mut cx, payload),
            proto::READ_FILE => files::open_read(&mut cx, payload),
            proto::SPAWN_BENCH => bench::open(&mut cx, payload),
            proto::FS_STAT => fs_ops::stat(&mut cx, payload),
            proto::FS_LIST => fs_ops::open_list(&mut cx, payload),
            proto::FS_MKDIR => fs_ops::mkdir(&mut cx, payload),
            proto::FS_RENAME => fs_ops::rename(&mut cx, payload),
            proto::FS_REMOVE => fs_ops::remove(&mut cx, payload),
            proto::FS_WATCH => watch::open(&mut cx, payload),
            _ => tcp::open(&mut cx, payload),
        };
        if let Some(s) = stream {
            self.streams.insert(id, s);
            self.settle(sh, id);
        }
    }
}
