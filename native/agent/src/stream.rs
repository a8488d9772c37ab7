//! What the event loop knows about a stream: the `Stream` trait it dispatches to, the context
//! a stream gets with every call (its id, its connection's output queue and pause state, the
//! epoll set, the agent's process table). Epoll tokens are ./token.rs's.
//!
//! A stream owns its descriptors and registers them itself (`Watched`); the loop routes their
//! events back by token. It ends by sending its one terminal message and reporting `done()`;
//! the connection then forgets it. `abort()` ends it silently (connection closed, id reused).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::background::Background;
use crate::cgroup::{ExecGroup, Hierarchy};
use crate::proto::{self, Header};
use crate::sys::{self, pid_t, Epoll, Reaped};
use crate::token::{token, ConnId, T_STREAM};

/// Above this much queued output a connection stops every producer (and stops reading its
/// host) until it has drained below OUT_LOW.
pub const OUT_HIGH: usize = 4 << 20;
pub const OUT_LOW: usize = 1 << 20;
/// How long a frame that nobody waits for (STARTED) may sit in the queue before it is written.
/// Writing it at once would cost a trip through the virtio port while the new process waits
/// for the CPU; usually it leaves with the process's first output or its EXIT instead.
const LAZY_FLUSH_NS: u64 = 2_000_000;

// ---------------------------------------------------------------------------------------------
// A connection's output queue

pub struct Output {
    buf: Vec<u8>,
    pos: usize,
    /// Frames that leave only with the next frame sent (`hold`).
    held: Vec<u8>,
    /// Set while everything queued is lazy: the monotonic time by which it must be written.
    pub lazy_deadline: Option<u64>,
    /// False while there is nobody to send to (disconnected, or after GOAWAY): frames are dropped.
    pub open: bool,
}

impl Output {
    pub fn new() -> Output {
        Output { buf: Vec::new(), pos: 0, held: Vec::new(), lazy_deadline: None, open: false }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.held.clear();
        self.pos = 0;
        self.lazy_deadline = None;
    }

    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn send(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        if !self.open {
            return;
        }
        self.lazy_deadline = None;
        if !self.held.is_empty() {
            self.buf.append(&mut self.held);
        }
        proto::encode_frame(&mut self.buf, ty, flags, stream, payload);
    }

    /// Queues a frame that nobody waits for, to leave with the next frame sent (on any stream),
    /// however late: an exec's STARTED when the host collects its output and exit anyway. It
    /// then costs no write, no trip through the virtio port and no wake-up of its own.
    pub fn hold(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        if self.open {
            proto::encode_frame(&mut self.held, ty, flags, stream, payload);
        }
    }

    /// Queues a frame that may wait up to LAZY_FLUSH_NS for company.
    pub fn send_lazy(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        let was_empty = self.pending() == 0;
        self.send(ty, flags, stream, payload);
        if was_empty && self.open {
            self.lazy_deadline = Some(sys::monotonic_ns() + LAZY_FLUSH_NS);
        }
    }

    pub fn window(&mut self, stream: u32, channel: u8, inc: u64) {
        let mut left = inc;
        while left > 0 {
            let n = left.min(u32::MAX as u64);
            self.send(proto::WINDOW, channel, stream, &proto::window(n as u32));
            left -= n;
        }
    }

    pub fn error(&mut self, stream: u32, code: u32, message: &str, errno: Option<i32>) {
        self.send(proto::STREAM_ERROR, 0, stream, &proto::error_fields(code, message, errno));
    }

    /// Reads at most `max` bytes from `fd` straight into a DATA frame on `channel`.
    /// Ok(0) is end of file; nothing is queued for Ok(0) or an error.
    pub fn read_data(&mut self, stream: u32, channel: u8, fd: RawFd, max: usize) -> io::Result<usize> {
        if !self.open {
            // Nobody to send to: the bytes would be dropped, so leave them where they are.
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        // Held frames go first (a STARTED before its stream's first DATA), read or not.
        if !self.held.is_empty() {
            self.buf.append(&mut self.held);
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; proto::HEADER_LEN]);
        match sys::read_append(fd, &mut self.buf, max) {
            Ok(n) if n > 0 => {
                let h = Header { len: n as u32, ty: proto::DATA, flags: channel, stream };
                self.buf[start..start + proto::HEADER_LEN].copy_from_slice(&h.encode());
                self.lazy_deadline = None;
                Ok(n)
            }
            other => {
                self.buf.truncate(start);
                other
            }
        }
    }

    /// Writes as much as `fd` takes. Ok(true): everything queued is written.
    pub fn write_to(&mut self, fd: RawFd) -> io::Result<bool> {
        while self.pos < self.buf.len() {
            match sys::write(fd, &self.buf[self.pos..]) {
                Ok(n) => self.pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.pos == self.buf.len() {
            // Written out; held frames wait on.
            self.buf.clear();
            self.pos = 0;
            self.lazy_deadline = None;
            return Ok(true);
        }
        if self.pos >= OUT_LOW {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(false)
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's process table (shared by all connections)

pub struct Procs {
    /// Children started for streams: pid → (connection, stream). Others are reaped silently.
    children: HashMap<pid_t, (ConnId, u32)>,
    /// Stream deadlines (exec timeouts, connect timeouts), earliest first.
    deadlines: BTreeSet<(u64, ConnId, u32)>,
    /// Read-write /dev/null, the stdin of processes without one.
    pub devnull: OwnedFd,
    /// The cgroup hierarchy (PID-1 mode, when the kernel has cgroup v2): every exec gets a group.
    pub cgroups: Option<Hierarchy>,
    /// Processes execs left running.
    pub background: Background,
}

impl Procs {
    pub fn new(devnull: OwnedFd, cgroups: Option<Hierarchy>) -> Procs {
        Procs { children: HashMap::new(), deadlines: BTreeSet::new(), devnull, cgroups, background: Background::default() }
    }

    /// The stream a reaped child belongs to (and forgets it).
    pub fn take_child(&mut self, pid: pid_t) -> Option<(ConnId, u32)> {
        self.children.remove(&pid)
    }

    /// An exec is over: its group is reused (or removed) if nothing runs in it any more, and
    /// kept as a leftover otherwise.
    pub fn settle_exec(&mut self, epoll: &Epoll, group: ExecGroup, argv: Vec<Vec<u8>>, detach: bool, killed: bool) {
        let idle = if group.populated() { self.background.adopt(epoll, group, argv, detach, killed) } else { Some(group) };
        self.recycle(idle);
    }

    /// An exec is over and its group was found empty after its outcome was read (the exec's
    /// reply does not wait for what follows): it is reused or removed once the reply is written
    /// (`Hierarchy::settle_pending`).
    pub fn settle_empty_exec(&mut self, group: ExecGroup) {
        match self.cgroups.as_mut() {
            Some(h) => h.recycle_later(group),
            None => group.discard(),
        }
    }

    /// A leftover's `cgroup.events` changed.
    pub fn on_cgroup_event(&mut self, epoll: &Epoll, id: u32) {
        let idle = self.background.on_event(epoll, id);
        self.recycle(idle);
    }

    fn recycle(&mut self, group: Option<ExecGroup>) {
        match (group, self.cgroups.as_mut()) {
            (Some(g), Some(h)) => h.recycle(g),
            (Some(g), None) => g.discard(),
            (None, _) => {}
        }
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|&(t, _, _)| t)
    }

    /// Pops the earliest deadline if it is due at `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<(u64, ConnId, u32)> {
        match self.deadlines.first() {
            Some(&(t, _, _)) if t <= now => self.deadlines.pop_first(),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The context of one stream call

pub struct Ctx<'a> {
    pub id: u32,
    pub conn: ConnId,
    pub epoll: &'a Epoll,
    pub out: &'a mut Output,
    pub procs: &'a mut Procs,
    /// The connection's output is above the high-water mark: produce nothing.
    pub paused: bool,
    /// Environment entries every EXEC gets unless it sets their KEY (the proxy's, while it listens).
    pub proxy_env: &'a [Vec<u8>],
}

/// The agent's side of a host → agent channel (stdin, a TCP stream's channel 0): how much the
/// host may still send, and consumed bytes whose credit has not gone back yet. Credit goes back
/// in lumps of at least a quarter window, so small messages (a request on a TCP connection, a
/// keystroke) cost no WINDOW frame, and no host wake-up, each. The host never runs dry: what is
/// held back is always under a quarter of the window.
pub struct InWindow {
    window: u64,
    owed: u64,
}

const CREDIT_LUMP: u64 = proto::INITIAL_WINDOW as u64 / 4;

impl InWindow {
    pub fn new() -> InWindow {
        InWindow { window: proto::INITIAL_WINDOW as u64, owed: 0 }
    }

    /// Accounts `len` bytes of DATA from the host; false if that is beyond the window.
    pub fn take(&mut self, len: u64) -> bool {
        if len > self.window {
            return false;
        }
        self.window -= len;
        true
    }

    /// `n` bytes were consumed (written on, or discarded): their credit goes back, batched.
    pub fn consumed(&mut self, cx: &mut Ctx, channel: u8, n: u64) {
        self.owed += n;
        if self.owed >= CREDIT_LUMP {
            self.window += self.owed;
            cx.window(channel, self.owed);
            self.owed = 0;
        }
    }
}

impl Default for InWindow {
    fn default() -> Self {
        InWindow::new()
    }
}

impl Ctx<'_> {
    pub fn token(&self, slot: u8) -> u64 {
        token(T_STREAM, self.conn, slot, self.id)
    }

    pub fn send(&mut self, ty: u8, flags: u8, payload: &[u8]) {
        self.out.send(ty, flags, self.id, payload);
    }

    pub fn send_lazy(&mut self, ty: u8, flags: u8, payload: &[u8]) {
        self.out.send_lazy(ty, flags, self.id, payload);
    }

    pub fn hold(&mut self, ty: u8, flags: u8, payload: &[u8]) {
        self.out.hold(ty, flags, self.id, payload);
    }

    pub fn window(&mut self, channel: u8, inc: u64) {
        self.out.window(self.id, channel, inc);
    }

    pub fn error(&mut self, code: u32, message: &str, errno: Option<i32>) {
        self.out.error(self.id, code, message, errno);
    }

    pub fn eof(&mut self, channel: u8) {
        self.send(proto::DATA, proto::FLAG_EOF | channel, &[]);
    }

    /// Whether a producer may queue more output now.
    pub fn can_produce(&self) -> bool {
        !self.paused && self.out.open && self.out.pending() < OUT_HIGH
    }

    pub fn read_data(&mut self, channel: u8, fd: RawFd, max: usize) -> io::Result<usize> {
        self.out.read_data(self.id, channel, fd, max)
    }

    pub fn watch_child(&mut self, pid: pid_t) {
        self.procs.children.insert(pid, (self.conn, self.id));
    }

    /// The child will not be reaped for this stream (it was killed on abort): reap it silently.
    pub fn forget_child(&mut self, pid: pid_t) {
        self.procs.children.remove(&pid);
    }

    pub fn set_deadline(&mut self, at: u64) {
        if at > 0 {
            self.procs.deadlines.insert((at, self.conn, self.id));
        }
    }

    pub fn clear_deadline(&mut self, at: u64) {
        self.procs.deadlines.remove(&(at, self.conn, self.id));
    }

    pub fn devnull(&self) -> RawFd {
        self.procs.devnull.as_raw_fd()
    }
}

// ---------------------------------------------------------------------------------------------
// A descriptor in the epoll set

/// A descriptor the stream owns, with the events it is registered for (0: not registered).
/// Dropping it closes the descriptor, which also takes it out of the epoll set: the agent holds
/// the only reference (children get other ends, or copies that close on exec), so no
/// EPOLL_CTL_DEL is needed on that path.
pub struct Watched {
    fd: OwnedFd,
    events: u32,
}

impl Watched {
    pub fn new(fd: OwnedFd) -> Watched {
        Watched { fd, events: 0 }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Registers for exactly `events` (0: leaves the set, so that HUP/ERR stop reporting too).
    pub fn want(&mut self, epoll: &Epoll, token: u64, events: u32) -> io::Result<()> {
        if events == self.events {
            return Ok(());
        }
        let r = if events == 0 {
            epoll.delete(self.raw());
            Ok(())
        } else if self.events == 0 {
            epoll.add(self.raw(), events, token)
        } else {
            epoll.modify(self.raw(), events, token)
        };
        if r.is_ok() {
            self.events = events;
        }
        r
    }
}

// ---------------------------------------------------------------------------------------------
// The trait the loop dispatches to

/// A host → agent DATA that breaks the protocol (beyond the window): the connection ends
/// with GOAWAY PROTOCOL.
#[derive(Debug)]
pub struct Violation(pub String);

pub trait Stream {
    /// DATA from the host on `channel`.
    fn on_data(&mut self, _cx: &mut Ctx, _channel: u8, _eof: bool, _payload: &[u8]) -> Result<(), Violation> {
        Ok(())
    }
    /// WINDOW credit from the host for an agent → host `channel`.
    fn on_window(&mut self, _cx: &mut Ctx, _channel: u8, _inc: u32) {}
    fn on_signal(&mut self, _cx: &mut Ctx, _sig: &proto::Signal) {}
    fn on_resize(&mut self, _cx: &mut Ctx, _size: proto::Resize) {}
    /// CANCEL: end as soon as possible with the usual terminal message.
    fn on_cancel(&mut self, cx: &mut Ctx);
    /// Readiness of the stream's descriptor registered with `cx.token(slot)`.
    fn on_event(&mut self, _cx: &mut Ctx, _slot: u8, _events: u32) {}
    /// A child registered with `watch_child` was reaped.
    fn on_exit(&mut self, _cx: &mut Ctx, _reaped: &Reaped) {}
    /// A deadline registered with `set_deadline` is due.
    fn on_deadline(&mut self, _cx: &mut Ctx, _at: u64) {}
    /// `cx.paused` changed: (de)register producers.
    fn on_pause(&mut self, _cx: &mut Ctx) {}
    /// Work that no descriptor signals (a regular file, a drain): called while `wants_pump`.
    fn pump(&mut self, _cx: &mut Ctx) {}
    fn wants_pump(&self) -> bool {
        false
    }
    /// Ends the stream without a terminal message: kill its processes, close its descriptors.
    fn abort(&mut self, cx: &mut Ctx);
    /// A HELLO ends it (silently, like `abort`): state a restored or handed-off VM must not
    /// carry over to a host that knows nothing of it (FS_WATCH).
    fn ends_on_hello(&self) -> bool {
        false
    }
    /// The terminal message has been sent.
    fn done(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// The frame types in `out`'s queue, in order.
    fn queued(out: &Output) -> Vec<(u8, u32)> {
        let mut types = Vec::new();
        let mut rest = &out.buf[out.pos..];
        while let Ok(Some((h, total))) = proto::decode_frame(rest) {
            types.push((h.ty, h.stream));
            rest = &rest[total..];
        }
        types
    }

    #[test]
    fn a_held_frame_leaves_with_the_next_one_and_before_it() {
        let mut out = Output::new();
        out.open = true;
        out.hold(proto::STARTED, 0, 7, &[]);
        // Held alone: nothing to write, and no deadline that would force a write.
        assert_eq!(out.pending(), 0);
        assert_eq!(out.lazy_deadline, None);
        // A DATA read straight from a pipe comes after it.
        let (r, w) = sys::pipe().unwrap();
        sys::write(w.as_raw_fd(), b"hi\n").unwrap();
        assert_eq!(out.read_data(7, proto::STDOUT, r.as_raw_fd(), 100).unwrap(), 3);
        assert_eq!(queued(&out), vec![(proto::STARTED, 7), (proto::DATA, 7)]);
        // And before any frame sent, on any stream.
        out.hold(proto::STARTED, 0, 9, &[]);
        out.send(proto::EXIT, 0, 8, &[]);
        assert_eq!(queued(&out), vec![(proto::STARTED, 7), (proto::DATA, 7), (proto::STARTED, 9), (proto::EXIT, 8)]);
        // Writing out what is queued leaves a held frame held.
        out.hold(proto::STARTED, 0, 5, &[]);
        let (r2, w2) = sys::pipe().unwrap();
        assert!(out.write_to(w2.as_raw_fd()).unwrap());
        drop(r2);
        out.send(proto::EXIT, 0, 5, &[]);
        assert_eq!(queued(&out), vec![(proto::STARTED, 5), (proto::EXIT, 5)]);
        // Nobody to send to: dropped.
        out.clear();
        out.open = false;
        out.hold(proto::STARTED, 0, 1, &[]);
        out.open = true;
        out.send(proto::EXIT, 0, 1, &[]);
        assert_eq!(queued(&out), vec![(proto::EXIT, 1)]);
    }
}
