//! The protocol server: one epoll loop over the host channel, child pipes, a SIGCHLD signalfd
//! and a timerfd for exec timeouts. Single-threaded; nothing in it blocks on the host or a child.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use crate::exec::{self, ExecError, Prepared};
use crate::files;
use crate::proto::{self, ExitInfo, Header};
use crate::sys::{self, pid_t, Epoll, Event, TimerFd, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT};

/// Stop producing (and reading the host) above this much queued output; resume below LOW.
const OUT_HIGH: usize = 4 << 20;
const OUT_LOW: usize = 1 << 20;
const READ_CHUNK: usize = 256 * 1024;
/// How often a disconnected virtio port is checked for the host coming back.
const RECONNECT_POLL_NS: u64 = 20_000_000;
/// How long a frame that nobody waits for (STARTED) may sit in the queue before it is written.
/// Writing it at once would cost a trip through the virtio port while the new process waits
/// for the CPU; usually it leaves with the process's first output or its EXIT instead.
const LAZY_FLUSH_NS: u64 = 2_000_000;
const MAX_BENCH_COUNT: u32 = 1_000_000;
const FEATURES: &str = "exec,files,bench";

// epoll tokens: low byte = kind, bits 8..40 = stream id.
const T_CONN: u64 = 1;
const T_SIGNAL: u64 = 2;
const T_TIMER: u64 = 3;
const T_LISTENER: u64 = 4;
const T_STDIN: u64 = 5;
const T_STDOUT: u64 = 6; // T_STDOUT + 1 = stderr

fn token(kind: u64, id: u32) -> u64 {
    (id as u64) << 8 | kind
}

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

/// Where the host is.
pub enum Transport {
    /// PID-1 mode: the virtio-serial port (opened once, kept for the VM's life).
    Port { fd: OwnedFd, connected: bool },
    /// Development mode: a listening unix socket, one connection at a time.
    Unix { listener: UnixListener, conn: Option<UnixStream> },
}

/// A child → host byte channel (stdout or stderr).
struct OutChan {
    fd: Option<OwnedFd>,
    window: u64,
    registered: bool,
    /// Set when the process has been reaped: bytes still to forward (what was in the pipe).
    remaining: Option<usize>,
}

/// The host → child stdin channel.
struct InChan {
    fd: Option<OwnedFd>,
    buf: VecDeque<u8>,
    /// Bytes the host may still send before it needs a WINDOW.
    window: u64,
    eof: bool,
    registered: bool,
}

struct ExecStream {
    pid: pid_t,
    start_ns: u64,
    stdin: InChan,
    out: [OutChan; 2],
    exit: Option<ExitInfo>,
    timed_out: bool,
    cancelled: bool,
    deadline: u64,
}

struct BenchStream {
    prepared: Prepared,
    remaining: u32,
    samples: Vec<u64>,
    current: Option<(pid_t, u64)>,
}

struct WriteStream {
    writer: files::Writer,
    window: u64,
}

struct ReadStream {
    reader: files::Reader,
    window: u64,
}

enum Stream {
    Exec(ExecStream),
    Bench(BenchStream),
    Write(WriteStream),
    Read(ReadStream),
}

pub struct Server {
    /// PID-1 mode: apply HELLO's clock and entropy, SHUTDOWN reboots.
    init_mode: bool,
    epoll: Epoll,
    sigfd: OwnedFd,
    timer: TimerFd,
    transport: Transport,
    devnull: OwnedFd,
    /// The image's workload (ENTRYPOINT/CMD), at most one; its pid survives snapshots with the
    /// rest of the guest's memory.
    workload: Option<pid_t>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    /// Set while everything queued is lazy: the monotonic time by which it must be written.
    lazy_deadline: Option<u64>,
    /// Events currently registered for the connection (None: not registered).
    conn_mask: Option<u32>,
    want_write: bool,
    hello: bool,
    /// GOAWAY sent: discard all input, send nothing more.
    dead: bool,
    paused: bool,
    reconnect_at: u64,
    streams: HashMap<u32, Stream>,
    children: HashMap<pid_t, u32>,
    deadlines: BTreeSet<(u64, u32)>,
    readers: BTreeSet<u32>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn sync_out(epoll: &Epoll, paused: bool, id: u32, ci: usize, chan: &mut OutChan) {
    let Some(fd) = chan.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
    let want = chan.window > 0 && !paused;
    if want != chan.registered {
        if want {
            // Cannot fail for a valid pipe descriptor; if it did, the channel would stall, so close it.
            if epoll.add(fd, EPOLLIN, token(T_STDOUT + ci as u64, id)).is_err() {
                chan.fd = None;
                return;
            }
        } else {
            epoll.delete(fd);
        }
        chan.registered = want;
    }
}

// Closing a pipe end also removes it from the epoll set: the agent holds the only reference to
// its end (children get the other end; posix_spawn/fork children close theirs on exec before the
// agent runs again). So no EPOLL_CTL_DEL — one syscall less per channel.
fn close_out(chan: &mut OutChan) {
    chan.fd = None;
    chan.registered = false;
}

fn close_in(chan: &mut InChan) {
    chan.fd = None;
    chan.registered = false;
    chan.buf.clear();
}

fn new_out(fd: OwnedFd) -> OutChan {
    OutChan { fd: Some(fd), window: proto::INITIAL_WINDOW as u64, registered: false, remaining: None }
}

impl Server {
    pub fn new(transport: Transport, init_mode: bool) -> Result<Server, ServerError> {
        let epoll = Epoll::new().map_err(|e| ServerError::Setup("epoll_create1", e))?;
        let sigfd = sys::sigchld_fd().map_err(|e| ServerError::Setup("signalfd", e))?;
        let timer = TimerFd::new().map_err(|e| ServerError::Setup("timerfd_create", e))?;
        let devnull: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| ServerError::Setup("open /dev/null", e))?
            .into();
        epoll.add(sigfd.as_raw_fd(), EPOLLIN, T_SIGNAL).map_err(|e| ServerError::Setup("epoll_ctl", e))?;
        epoll.add(timer.raw(), EPOLLIN, T_TIMER).map_err(|e| ServerError::Setup("epoll_ctl", e))?;
        let mut s = Server {
            init_mode,
            epoll,
            sigfd,
            timer,
            transport,
            devnull,
            workload: None,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            lazy_deadline: None,
            conn_mask: None,
            want_write: false,
            hello: false,
            dead: false,
            paused: false,
            reconnect_at: 0,
            streams: HashMap::new(),
            children: HashMap::new(),
            deadlines: BTreeSet::new(),
            readers: BTreeSet::new(),
        };
        match &mut s.transport {
            Transport::Unix { listener, .. } => {
                listener.set_nonblocking(true).map_err(|e| ServerError::Setup("listener", e))?;
                s.epoll
                    .add(listener.as_raw_fd(), EPOLLIN, T_LISTENER)
                    .map_err(|e| ServerError::Setup("epoll_ctl", e))?;
            }
            Transport::Port { fd, connected } => {
                // The host may not be attached yet: then the port reports HUP until it is.
                *connected = !sys::poll_hup(fd.as_raw_fd());
                if !*connected {
                    s.reconnect_at = sys::monotonic_ns() + RECONNECT_POLL_NS;
                }
            }
        }
        Ok(s)
    }

    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events: Vec<Event> = Vec::with_capacity(128);
        loop {
            let mut timeout_ms = -1;
            match self.lazy_deadline {
                Some(t) if sys::monotonic_ns() < t => {
                    timeout_ms = ((t - sys::monotonic_ns()) / 1_000_000).max(1) as i32;
                }
                _ => {
                    self.lazy_deadline = None;
                    self.flush();
                }
            }
            self.update_pause();
            self.update_conn_interest();
            self.arm_timer();
            let busy = !self.readers.is_empty() && !self.paused;
            self.epoll.wait(&mut events, if busy { 0 } else { timeout_ms }).map_err(ServerError::Wait)?;
            for ev in &events {
                self.dispatch(*ev);
            }
            self.pump_readers();
        }
    }

    fn dispatch(&mut self, ev: Event) {
        let id = (ev.token >> 8) as u32;
        match ev.token & 0xff {
            T_CONN => {
                if ev.events & EPOLLOUT != 0 {
                    self.flush();
                }
                if ev.events & (EPOLLIN | EPOLLHUP | EPOLLERR) != 0 {
                    self.on_conn_readable();
                }
            }
            T_SIGNAL => {
                sys::drain(self.sigfd.as_raw_fd());
                self.reap();
            }
            T_TIMER => {
                self.timer.fired();
                self.reap(); // an exit that raced with its deadline is not a timeout
                self.on_timer();
            }
            T_LISTENER => self.accept(),
            T_STDIN => self.pump_stdin(id),
            k @ (T_STDOUT | 7) => self.pump_output(id, (k - T_STDOUT) as usize),
            _ => {}
        }
    }

    // -----------------------------------------------------------------------------------------
    // Connection

    fn conn_fd(&self) -> Option<RawFd> {
        match &self.transport {
            Transport::Port { fd, connected: true } => Some(fd.as_raw_fd()),
            Transport::Port { .. } => None,
            Transport::Unix { conn, .. } => conn.as_ref().map(|c| c.as_raw_fd()),
        }
    }

    fn accept(&mut self) {
        let Transport::Unix { listener, conn } = &mut self.transport else { return };
        if conn.is_some() {
            return;
        }
        let Ok((stream, _)) = listener.accept() else { return };
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        self.epoll.delete(listener.as_raw_fd());
        *conn = Some(stream);
        self.conn_mask = None;
        self.reset_connection_state();
    }

    fn reset_connection_state(&mut self) {
        self.inbuf.clear();
        self.out.clear();
        self.out_pos = 0;
        self.want_write = false;
        self.hello = false;
        self.dead = false;
        self.paused = false;
    }

    /// The host went away: end every stream (killing their processes) and wait for a new host.
    fn disconnect(&mut self) {
        self.reset_streams();
        if let Some(fd) = self.conn_fd() {
            if self.conn_mask.is_some() {
                self.epoll.delete(fd);
            }
        }
        self.conn_mask = None;
        self.reset_connection_state();
        match &mut self.transport {
            Transport::Unix { listener, conn } => {
                *conn = None;
                let _ = self.epoll.add(listener.as_raw_fd(), EPOLLIN, T_LISTENER);
            }
            Transport::Port { connected, .. } => {
                *connected = false;
                self.reconnect_at = sys::monotonic_ns() + RECONNECT_POLL_NS;
            }
        }
    }

    fn update_conn_interest(&mut self) {
        let Some(fd) = self.conn_fd() else { return };
        let mut want = if self.paused && !self.dead { 0 } else { EPOLLIN };
        if self.want_write {
            want |= EPOLLOUT;
        }
        if want == 0 {
            want = EPOLLOUT; // paused implies queued output; keep HUP/ERR reporting alive
        }
        if self.conn_mask == Some(want) {
            return;
        }
        let r = if self.conn_mask.is_some() {
            self.epoll.modify(fd, want, T_CONN)
        } else {
            self.epoll.add(fd, want, T_CONN)
        };
        match r {
            Ok(()) => self.conn_mask = Some(want),
            Err(_) => self.disconnect(),
        }
    }

    fn on_conn_readable(&mut self) {
        let Some(fd) = self.conn_fd() else { return };
        match sys::read_append(fd, &mut self.inbuf, READ_CHUNK) {
            Ok(n) if n > 0 => {}
            Err(ref e) if would_block(e) => return,
            _ => {
                // EOF or error: the host side closed (a virtio port reads 0 when the host is gone).
                self.disconnect();
                return;
            }
        }
        if self.dead {
            self.inbuf.clear();
            return;
        }
        self.process_input();
    }

    fn process_input(&mut self) {
        let buf = std::mem::take(&mut self.inbuf);
        let mut pos = 0;
        loop {
            match proto::decode_frame(&buf[pos..]) {
                Ok(None) => break,
                Ok(Some((h, total))) => {
                    let payload = &buf[pos + proto::HEADER_LEN..pos + total];
                    pos += total;
                    self.on_frame(h, payload);
                    if self.dead {
                        pos = buf.len();
                        break;
                    }
                }
                Err(e) => {
                    self.goaway(proto::PROTOCOL, &e.to_string());
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

    fn send(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        if self.dead || self.conn_fd().is_none() {
            return;
        }
        self.lazy_deadline = None;
        proto::encode_frame(&mut self.out, ty, flags, stream, payload);
    }

    /// Queues a frame that may wait up to LAZY_FLUSH_NS for company (see run()).
    fn send_lazy(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        let was_empty = self.pending_out() == 0;
        self.send(ty, flags, stream, payload);
        if was_empty {
            self.lazy_deadline = Some(sys::monotonic_ns() + LAZY_FLUSH_NS);
        }
    }

    fn send_window(&mut self, stream: u32, channel: u8, inc: u64) {
        let mut left = inc;
        while left > 0 {
            let n = left.min(u32::MAX as u64);
            self.send(proto::WINDOW, channel, stream, &proto::window(n as u32));
            left -= n;
        }
    }

    fn stream_error(&mut self, id: u32, code: u32, message: &str) {
        self.send(proto::STREAM_ERROR, 0, id, &proto::error_fields(code, message));
    }

    fn goaway(&mut self, code: u32, message: &str) {
        self.reset_streams();
        self.send(proto::GOAWAY, 0, 0, &proto::error_fields(code, message));
        self.dead = true;
    }

    fn flush(&mut self) {
        let Some(fd) = self.conn_fd() else {
            self.out.clear();
            self.out_pos = 0;
            return;
        };
        while self.out_pos < self.out.len() {
            match sys::write(fd, &self.out[self.out_pos..]) {
                Ok(n) => self.out_pos += n,
                Err(ref e) if would_block(e) => break,
                Err(_) => {
                    self.disconnect();
                    return;
                }
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            self.lazy_deadline = None;
            self.want_write = false;
            if self.dead && matches!(self.transport, Transport::Unix { .. }) {
                self.disconnect(); // development mode: GOAWAY delivered, close the connection
            }
        } else {
            self.want_write = true;
            if self.out_pos >= OUT_LOW {
                self.out.drain(..self.out_pos);
                self.out_pos = 0;
            }
        }
    }

    fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    fn update_pause(&mut self) {
        let pending = self.pending_out();
        let paused = if self.paused { pending > OUT_LOW } else { pending >= OUT_HIGH };
        if paused == self.paused {
            return;
        }
        self.paused = paused;
        for (&id, stream) in self.streams.iter_mut() {
            if let Stream::Exec(ex) = stream {
                for (ci, chan) in ex.out.iter_mut().enumerate() {
                    sync_out(&self.epoll, paused, id, ci, chan);
                }
            }
        }
    }

    fn arm_timer(&mut self) {
        let mut next = self.deadlines.first().map_or(0, |&(t, _)| t);
        if matches!(self.transport, Transport::Port { connected: false, .. }) && (next == 0 || self.reconnect_at < next) {
            next = self.reconnect_at.max(1);
        }
        self.timer.set(next);
    }

    fn on_timer(&mut self) {
        let now = sys::monotonic_ns();
        while let Some(&(t, id)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(Stream::Exec(ex)) = self.streams.get_mut(&id) {
                if ex.exit.is_none() && ex.deadline == t {
                    let _ = sys::kill(-ex.pid, libc::SIGKILL);
                    ex.timed_out = true;
                }
            }
        }
        if let Transport::Port { fd, connected } = &mut self.transport {
            if !*connected && now >= self.reconnect_at {
                if sys::poll_hup(fd.as_raw_fd()) {
                    self.reconnect_at = now + RECONNECT_POLL_NS;
                } else {
                    *connected = true;
                    self.conn_mask = None;
                    self.reset_connection_state();
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Frames

    fn on_frame(&mut self, h: Header, payload: &[u8]) {
        if !self.hello && h.ty != proto::HELLO {
            return;
        }
        match h.ty {
            proto::HELLO => self.on_hello(payload),
            proto::PING => self.send(proto::PONG, 0, h.stream, payload),
            proto::SHUTDOWN => self.shutdown(),
            proto::EXEC | proto::WRITE_FILE | proto::READ_FILE | proto::SPAWN_BENCH => self.open_stream(h, payload),
            proto::DATA => self.on_data(h, payload),
            proto::WINDOW => self.on_window(h, payload),
            proto::SIGNAL => self.on_signal(h.stream, payload),
            proto::CANCEL => self.on_cancel(h.stream),
            proto::RESIZE => {}
            proto::WORKLOAD_START if h.stream != 0 => self.start_workload(h.stream, payload),
            proto::WORKLOAD_SIGNAL if h.stream != 0 => self.signal_workload(h.stream, payload),
            other => {
                let msg = format!("unsupported message type 0x{other:02x}");
                if h.stream == 0 {
                    self.goaway(proto::UNSUPPORTED, &msg);
                } else {
                    self.abort_stream(h.stream);
                    self.stream_error(h.stream, proto::UNSUPPORTED, &msg);
                }
            }
        }
    }

    fn on_hello(&mut self, payload: &[u8]) {
        let hello = match proto::Hello::parse(payload) {
            Ok(h) => h,
            Err(e) => return self.goaway(proto::PROTOCOL, &format!("bad HELLO: {e}")),
        };
        if hello.version_min > proto::VERSION || hello.version_max < proto::VERSION {
            let msg = format!(
                "agent speaks version {} only, host offered {}..={}",
                proto::VERSION,
                hello.version_min,
                hello.version_max
            );
            return self.goaway(proto::VERSION_ERR, &msg);
        }
        if self.init_mode {
            if let Some(ns) = hello.host_time_ns {
                if let Err(e) = sys::set_realtime_ns(ns) {
                    eprintln!("supermachine-agent: cannot set the clock: {e}");
                }
            }
            if let Err(e) = sys::add_entropy(&hello.entropy) {
                eprintln!("supermachine-agent: cannot add entropy: {e}");
            }
        }
        self.hello = true;
        let ok = proto::hello_ok(env!("CARGO_PKG_VERSION"), sys::monotonic_ns() / 1_000_000, FEATURES);
        self.send(proto::HELLO_OK, 0, 0, &ok);
    }

    fn shutdown(&mut self) -> ! {
        if self.init_mode {
            sys::kill_all();
            sys::sync();
            sys::reboot();
        }
        self.reset_streams();
        std::process::exit(0);
    }

    fn open_stream(&mut self, h: Header, payload: &[u8]) {
        let id = h.stream;
        if id == 0 {
            return self.goaway(proto::PROTOCOL, "a stream cannot be opened on id 0");
        }
        if self.streams.contains_key(&id) {
            // The id's one terminal message is this error, so the old stream ends with it.
            self.abort_stream(id);
            return self.stream_error(id, proto::STREAM_IN_USE, "stream id already in use");
        }
        match h.ty {
            proto::EXEC => self.open_exec(id, payload),
            proto::WRITE_FILE => self.open_write(id, payload),
            proto::READ_FILE => self.open_read(id, payload),
            _ => self.open_bench(id, payload),
        }
    }

    /// Removes a stream without a terminal message, killing its process group.
    fn abort_stream(&mut self, id: u32) {
        let Some(stream) = self.streams.remove(&id) else { return };
        self.readers.remove(&id);
        match stream {
            Stream::Exec(mut ex) => {
                if ex.exit.is_none() {
                    let _ = sys::kill(-ex.pid, libc::SIGKILL);
                    self.children.remove(&ex.pid);
                }
                self.deadlines.remove(&(ex.deadline, id));
                close_in(&mut ex.stdin);
                for chan in ex.out.iter_mut() {
                    close_out(chan);
                }
            }
            Stream::Bench(b) => {
                if let Some((pid, _)) = b.current {
                    let _ = sys::kill(-pid, libc::SIGKILL);
                    self.children.remove(&pid);
                }
            }
            Stream::Write(_) | Stream::Read(_) => {}
        }
    }

    fn reset_streams(&mut self) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.abort_stream(id);
        }
        self.deadlines.clear();
        self.readers.clear();
    }

    // -----------------------------------------------------------------------------------------
    // EXEC

    fn open_exec(&mut self, id: u32, payload: &[u8]) {
        let req = match proto::Exec::parse(payload) {
            Ok(r) => r,
            Err(e) => return self.stream_error(id, proto::BAD_REQUEST, &e.to_string()),
        };
        if req.tty != 0 {
            return self.stream_error(id, proto::UNSUPPORTED, "tty is not supported in protocol version 1");
        }
        let prepared = match exec::prepare(&req.argv, &req.env, req.cwd.as_deref(), req.uid, req.gid) {
            Ok(p) => p,
            Err(ExecError::BadRequest(m)) => return self.stream_error(id, proto::BAD_REQUEST, &m),
            Err(ExecError::NotFound(m)) => return self.exec_failed(id, 127, &m),
            Err(ExecError::CannotStart(m)) => return self.exec_failed(id, 126, &m),
        };
        let pipes = (|| -> io::Result<_> {
            let out = sys::pipe()?;
            let err = sys::pipe()?;
            let stdin = if req.stdin_pipe { Some(sys::pipe()?) } else { None };
            sys::set_pipe_nonblocking(out.0.as_raw_fd())?;
            sys::set_pipe_nonblocking(err.0.as_raw_fd())?;
            if let Some((_, w)) = &stdin {
                sys::set_pipe_nonblocking(w.as_raw_fd())?;
            }
            Ok((out, err, stdin))
        })();
        let ((out_r, out_w), (err_r, err_w), stdin) = match pipes {
            Ok(p) => p,
            Err(e) => return self.exec_failed(id, 126, &format!("supermachine: cannot create pipes: {}\n", sys::io_text(&e))),
        };
        let stdin_fd = stdin.as_ref().map_or(self.devnull.as_raw_fd(), |(r, _)| r.as_raw_fd());
        let start_ns = sys::monotonic_ns();
        let pid = match prepared.start([stdin_fd, out_w.as_raw_fd(), err_w.as_raw_fd()]) {
            Ok(pid) => pid,
            Err(ExecError::NotFound(m)) => return self.exec_failed(id, 127, &m),
            Err(ExecError::BadRequest(m) | ExecError::CannotStart(m)) => return self.exec_failed(id, 126, &m),
        };
        drop((out_w, err_w));
        let stdin_w = stdin.map(|(_, w)| w);
        self.send_lazy(proto::STARTED, 0, id, &proto::started(pid as u32));
        let deadline = if req.timeout_ms > 0 { start_ns.saturating_add(req.timeout_ms.saturating_mul(1_000_000)) } else { 0 };
        let mut ex = ExecStream {
            pid,
            start_ns,
            stdin: InChan {
                fd: stdin_w,
                buf: VecDeque::new(),
                window: proto::INITIAL_WINDOW as u64,
                eof: false,
                registered: false,
            },
            out: [new_out(out_r), new_out(err_r)],
            exit: None,
            timed_out: false,
            cancelled: false,
            deadline,
        };
        for (ci, chan) in ex.out.iter_mut().enumerate() {
            sync_out(&self.epoll, self.paused, id, ci, chan);
        }
        if deadline > 0 {
            self.deadlines.insert((deadline, id));
        }
        self.children.insert(pid, id);
        self.streams.insert(id, Stream::Exec(ex));
    }

    /// The process could not be started: message on stderr, EOFs, EXIT `code`.
    fn exec_failed(&mut self, id: u32, code: i32, message: &str) {
        let msg = &message.as_bytes()[..message.len().min(proto::MAX_DATA)];
        self.send(proto::DATA, proto::STDERR, id, msg);
        self.finish_exec(id, ExitInfo { exit_code: code, ..ExitInfo::default() });
    }

    fn finish_exec(&mut self, id: u32, info: ExitInfo) {
        self.send(proto::DATA, proto::FLAG_EOF | proto::STDOUT, id, &[]);
        self.send(proto::DATA, proto::FLAG_EOF | proto::STDERR, id, &[]);
        self.send(proto::EXIT, 0, id, &info.encode());
    }

    /// Ends an exec stream once its process is reaped and both output channels are done.
    fn maybe_finish(&mut self, id: u32) {
        let Some(Stream::Exec(ex)) = self.streams.get(&id) else { return };
        let Some(info) = ex.exit else { return };
        if ex.out.iter().any(|c| c.fd.is_some()) {
            return;
        }
        self.streams.remove(&id);
        self.finish_exec(id, info);
    }

    fn pump_output(&mut self, id: u32, ci: usize) {
        if self.pending_out() >= OUT_HIGH {
            return self.update_pause(); // stops every producer until the host has read enough
        }
        let Some(Stream::Exec(ex)) = self.streams.get_mut(&id) else { return };
        let chan = &mut ex.out[ci];
        let Some(fd) = chan.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        if chan.window == 0 || self.dead {
            sync_out(&self.epoll, self.paused, id, ci, chan);
            return;
        }
        let mut max = (chan.window as usize).min(proto::MAX_DATA);
        if let Some(r) = chan.remaining {
            max = max.min(r);
        }
        let start = self.out.len();
        self.out.extend_from_slice(&[0; proto::HEADER_LEN]);
        let r = if max > 0 { sys::read_append(fd, &mut self.out, max) } else { Ok(0) };
        match r {
            Ok(n) if n > 0 => {
                let h = Header { len: n as u32, ty: proto::DATA, flags: ci as u8 + 1, stream: id };
                self.out[start..start + proto::HEADER_LEN].copy_from_slice(&h.encode());
                chan.window -= n as u64;
                if let Some(r) = chan.remaining.as_mut() {
                    *r -= n;
                    if *r == 0 {
                        close_out(chan);
                    }
                }
                sync_out(&self.epoll, self.paused, id, ci, chan);
            }
            Err(ref e) if would_block(e) && chan.remaining.is_none() => {
                self.out.truncate(start);
            }
            _ => {
                // EOF, an error, or nothing left of what the exited process wrote.
                self.out.truncate(start);
                close_out(chan);
            }
        }
        self.maybe_finish(id);
    }

    fn pump_stdin(&mut self, id: u32) {
        let Some(Stream::Exec(ex)) = self.streams.get_mut(&id) else { return };
        let inp = &mut ex.stdin;
        let mut consumed = 0u64;
        if let Some(fd) = inp.fd.as_ref().map(|f| f.as_raw_fd()) {
            while !inp.buf.is_empty() {
                let front = inp.buf.as_slices().0;
                match sys::write(fd, front) {
                    Ok(n) => {
                        inp.buf.drain(..n);
                        consumed += n as u64;
                    }
                    Err(ref e) if would_block(e) => break,
                    Err(_) => {
                        // The child closed its stdin: the rest is discarded (and credited).
                        consumed += inp.buf.len() as u64;
                        close_in(inp);
                        break;
                    }
                }
            }
        }
        if let Some(fd) = inp.fd.as_ref().map(|f| f.as_raw_fd()) {
            if inp.buf.is_empty() && inp.eof {
                close_in(inp);
            } else {
                let want = !inp.buf.is_empty();
                if want != inp.registered {
                    if want {
                        if self.epoll.add(fd, EPOLLOUT, token(T_STDIN, id)).is_err() {
                            close_in(inp);
                        } else {
                            inp.registered = true;
                        }
                    } else {
                        self.epoll.delete(fd);
                        inp.registered = false;
                    }
                }
            }
        }
        if consumed > 0 && !inp.eof {
            inp.window += consumed;
            self.send_window(id, proto::STDIN, consumed);
        }
    }

    fn reap(&mut self) {
        while let Some(r) = sys::reap_any() {
            if self.workload == Some(r.pid) {
                self.workload = None;
                let (code, signal) = r.code_and_signal();
                eprintln!("supermachine-agent: workload (pid {}) ended: exit {code}, signal {signal}", r.pid);
                continue;
            }
            let Some(id) = self.children.remove(&r.pid) else { continue }; // an orphan
            let now = sys::monotonic_ns();
            match self.streams.get_mut(&id) {
                Some(Stream::Exec(ex)) if ex.pid == r.pid => {
                    let (exit_code, signal) = r.code_and_signal();
                    ex.exit = Some(ExitInfo {
                        exit_code,
                        signal,
                        timed_out: ex.timed_out,
                        peak_rss_kib: r.maxrss_kib,
                        duration_us: now.saturating_sub(ex.start_ns) / 1000,
                    });
                    self.deadlines.remove(&(ex.deadline, id));
                    close_in(&mut ex.stdin);
                    for (ci, chan) in ex.out.iter_mut().enumerate() {
                        // Forward only what the process wrote before it exited.
                        let left = match &chan.fd {
                            Some(fd) if !ex.cancelled => sys::bytes_readable(fd.as_raw_fd()).unwrap_or(0),
                            _ => 0,
                        };
                        if left == 0 {
                            close_out(chan);
                        } else {
                            chan.remaining = Some(left);
                            sync_out(&self.epoll, self.paused, id, ci, chan);
                        }
                    }
                    self.maybe_finish(id);
                }
                Some(Stream::Bench(b)) => {
                    if let Some((_, t0)) = b.current.take() {
                        b.samples.push(now.saturating_sub(t0));
                    }
                    self.bench_next(id);
                }
                _ => {}
            }
        }
    }

    fn on_data(&mut self, h: Header, payload: &[u8]) {
        if h.flags & proto::CHANNEL_MASK != proto::STDIN {
            return;
        }
        let id = h.stream;
        let eof = h.flags & proto::FLAG_EOF != 0;
        let len = payload.len() as u64;
        match self.streams.get_mut(&id) {
            Some(Stream::Exec(ex)) => {
                let inp = &mut ex.stdin;
                if inp.eof {
                    return;
                }
                if len > inp.window {
                    return self.goaway(proto::PROTOCOL, &format!("stream {id}: stdin DATA beyond the window"));
                }
                inp.window -= len;
                inp.eof = eof;
                if inp.fd.is_none() {
                    // stdin is /dev/null or already closed: discard, but keep the host unblocked.
                    if len > 0 && !eof {
                        inp.window += len;
                        self.send_window(id, proto::STDIN, len);
                    }
                    return;
                }
                inp.buf.extend(payload);
                self.pump_stdin(id);
            }
            Some(Stream::Write(w)) => {
                if len > w.window {
                    return self.goaway(proto::PROTOCOL, &format!("stream {id}: file DATA beyond the window"));
                }
                if let Err(e) = w.writer.write(payload) {
                    self.streams.remove(&id);
                    return self.stream_error(id, e.code, &e.message);
                }
                if eof {
                    if let Some(Stream::Write(w)) = self.streams.remove(&id) {
                        match w.writer.finish() {
                            Ok(size) => self.send(proto::OK, 0, id, &proto::ok_size(size)),
                            Err(e) => self.stream_error(id, e.code, &e.message),
                        }
                    }
                } else if len > 0 {
                    self.send_window(id, proto::STDIN, len);
                }
            }
            _ => {}
        }
    }

    fn on_window(&mut self, h: Header, payload: &[u8]) {
        let Ok(inc) = proto::parse_window(payload) else { return };
        let ch = h.flags & proto::CHANNEL_MASK;
        let id = h.stream;
        match self.streams.get_mut(&id) {
            Some(Stream::Exec(ex)) if ch == proto::STDOUT || ch == proto::STDERR => {
                let ci = (ch - 1) as usize;
                let chan = &mut ex.out[ci];
                if chan.fd.is_some() {
                    chan.window = chan.window.saturating_add(inc as u64);
                    sync_out(&self.epoll, self.paused, id, ci, chan);
                }
            }
            Some(Stream::Read(r)) if ch == proto::STDOUT => {
                r.window = r.window.saturating_add(inc as u64);
                self.readers.insert(id);
            }
            _ => {}
        }
    }

    fn on_signal(&mut self, id: u32, payload: &[u8]) {
        let Ok(sig) = proto::Signal::parse(payload) else { return };
        if sig.signum > 64 {
            return;
        }
        if let Some(Stream::Exec(ex)) = self.streams.get(&id) {
            if ex.exit.is_none() {
                let target = if sig.group { -ex.pid } else { ex.pid };
                let _ = sys::kill(target, sig.signum as i32);
            }
        }
    }

    fn on_cancel(&mut self, id: u32) {
        match self.streams.get_mut(&id) {
            Some(Stream::Exec(ex)) => {
                ex.cancelled = true;
                if ex.exit.is_none() {
                    let _ = sys::kill(-ex.pid, libc::SIGKILL);
                } else {
                    for chan in ex.out.iter_mut() {
                        close_out(chan);
                    }
                    self.maybe_finish(id);
                }
            }
            Some(_) => {
                self.abort_stream(id);
                self.stream_error(id, proto::IO, "cancelled");
            }
            None => {}
        }
    }

    // -----------------------------------------------------------------------------------------
    // Files

    fn open_write(&mut self, id: u32, payload: &[u8]) {
        let req = match proto::WriteFile::parse(payload) {
            Ok(r) => r,
            Err(e) => return self.stream_error(id, proto::BAD_REQUEST, &e.to_string()),
        };
        match files::Writer::open(&req) {
            Ok(writer) => {
                let w = WriteStream { writer, window: proto::INITIAL_WINDOW as u64 };
                self.streams.insert(id, Stream::Write(w));
            }
            Err(e) => self.stream_error(id, e.code, &e.message),
        }
    }

    fn open_read(&mut self, id: u32, payload: &[u8]) {
        let req = match proto::ReadFile::parse(payload) {
            Ok(r) => r,
            Err(e) => return self.stream_error(id, proto::BAD_REQUEST, &e.to_string()),
        };
        match files::Reader::open(&req) {
            Ok(reader) => {
                self.streams.insert(id, Stream::Read(ReadStream { reader, window: proto::INITIAL_WINDOW as u64 }));
                self.readers.insert(id);
            }
            Err(e) => self.stream_error(id, e.code, &e.message),
        }
    }

    /// Sends one chunk for every READ_FILE stream that has window (regular files are always
    /// "ready", so they are driven from the loop rather than by epoll).
    fn pump_readers(&mut self) {
        let ids: Vec<u32> = self.readers.iter().copied().collect();
        for id in ids {
            if self.pending_out() >= OUT_HIGH || self.dead {
                return;
            }
            let Some(Stream::Read(rs)) = self.streams.get_mut(&id) else {
                self.readers.remove(&id);
                continue;
            };
            if rs.window == 0 {
                self.readers.remove(&id);
                continue;
            }
            let max = (rs.window as usize).min(proto::MAX_DATA);
            let start = self.out.len();
            self.out.resize(start + proto::HEADER_LEN + max, 0);
            match rs.reader.read(&mut self.out[start + proto::HEADER_LEN..]) {
                Ok(n) if n > 0 => {
                    self.out.truncate(start + proto::HEADER_LEN + n);
                    let h = Header { len: n as u32, ty: proto::DATA, flags: proto::STDOUT, stream: id };
                    self.out[start..start + proto::HEADER_LEN].copy_from_slice(&h.encode());
                    rs.window -= n as u64;
                }
                Ok(_) => {
                    self.out.truncate(start);
                    let size = rs.reader.size();
                    self.streams.remove(&id);
                    self.readers.remove(&id);
                    self.send(proto::DATA, proto::FLAG_EOF | proto::STDOUT, id, &[]);
                    self.send(proto::OK, 0, id, &proto::ok_size(size));
                }
                Err(e) => {
                    self.out.truncate(start);
                    self.streams.remove(&id);
                    self.readers.remove(&id);
                    self.stream_error(id, e.code, &e.message);
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Workload

    /// Starts the image's workload: a process of its own session whose output goes to the
    /// agent's console, not to a stream, so that it outlives connections and snapshots.
    fn start_workload(&mut self, id: u32, payload: &[u8]) {
        if let Some(pid) = self.workload {
            return self.stream_error(id, proto::STREAM_IN_USE, &format!("a workload is already running (pid {pid})"));
        }
        let req = match proto::Exec::parse(payload) {
            Ok(r) => r,
            Err(e) => return self.stream_error(id, proto::BAD_REQUEST, &e.to_string()),
        };
        let prepared = match exec::prepare(&req.argv, &req.env, req.cwd.as_deref(), req.uid, req.gid) {
            Ok(p) => p,
            Err(ExecError::BadRequest(m)) => return self.stream_error(id, proto::BAD_REQUEST, &m),
            Err(ExecError::NotFound(m)) => return self.stream_error(id, proto::NOT_FOUND, m.trim_end()),
            Err(ExecError::CannotStart(m)) => return self.stream_error(id, proto::IO, m.trim_end()),
        };
        match prepared.start([self.devnull.as_raw_fd(), 1, 2]) {
            Ok(pid) => {
                self.workload = Some(pid);
                self.send(proto::OK, 0, id, &proto::ok_pid(pid as u32));
            }
            Err(e) => self.stream_error(id, proto::IO, e.to_string().trim_end()),
        }
    }

    /// Signals the workload's process group.
    fn signal_workload(&mut self, id: u32, payload: &[u8]) {
        let sig = match proto::Signal::parse(payload) {
            Ok(s) if s.signum >= 1 && s.signum <= 64 => s,
            Ok(_) => return self.stream_error(id, proto::BAD_REQUEST, "signum must be 1 to 64"),
            Err(e) => return self.stream_error(id, proto::BAD_REQUEST, &e.to_string()),
        };
        match self.workload {
            Some(pid) => match sys::kill(-pid, sig.signum as i32) {
                Ok(()) => self.send(proto::OK, 0, id, &[]),
                Err(e) => self.stream_error(id, proto::IO, &format!("kill: {e}")),
            },
            None => self.stream_error(id, proto::NOT_FOUND, "no workload is running"),
        }
    }

    // -----------------------------------------------------------------------------------------
    // SPAWN_BENCH

    fn open_bench(&mut self, id: u32, payload: &[u8]) {
        let req = match proto::SpawnBench::parse(payload) {
            Ok(r) => r,
            Err(e) => return self.stream_error(id, proto::BAD_REQUEST, &e.to_string()),
        };
        if req.count > MAX_BENCH_COUNT {
            return self.stream_error(id, proto::BAD_REQUEST, "count too large");
        }
        let (uid, gid) = (sys::geteuid(), sys::getegid());
        let prepared = match exec::prepare(&req.argv, &req.env, None, uid, gid) {
            Ok(p) => p,
            Err(ExecError::BadRequest(m)) => return self.stream_error(id, proto::BAD_REQUEST, &m),
            Err(ExecError::NotFound(m)) => return self.stream_error(id, proto::NOT_FOUND, m.trim_end()),
            Err(ExecError::CannotStart(m)) => return self.stream_error(id, proto::IO, m.trim_end()),
        };
        let b = BenchStream {
            prepared,
            remaining: req.count,
            samples: Vec::with_capacity(req.count as usize),
            current: None,
        };
        self.streams.insert(id, Stream::Bench(b));
        self.bench_next(id);
    }

    /// Starts the next benchmark run, or ends the stream when all are done.
    fn bench_next(&mut self, id: u32) {
        let null = self.devnull.as_raw_fd();
        let Some(Stream::Bench(b)) = self.streams.get_mut(&id) else { return };
        if b.remaining == 0 {
            let samples = std::mem::take(&mut b.samples);
            self.streams.remove(&id);
            return self.send(proto::OK, 0, id, &proto::ok_samples(&samples));
        }
        b.remaining -= 1;
        let t0 = sys::monotonic_ns();
        match b.prepared.start([null, null, null]) {
            Ok(pid) => {
                b.current = Some((pid, t0));
                self.children.insert(pid, id);
            }
            Err(e) => {
                self.streams.remove(&id);
                self.stream_error(id, proto::IO, &e.to_string());
            }
        }
    }
}
