//! TCP_CONNECT streams: a TCP connection from the guest to one of its own ports, carried on
//! channel 0 (host → socket) and channel 1 (socket → host). A PROXY_CONN stream (`proxy.rs`)
//! is the same stream over a socket accepted on the proxy listener (`accepted`).
//!
//! The connect is non-blocking (the socket becomes writable when it is done, SO_ERROR tells
//! how). Flow control reaches the guest peer both ways: channel-0 credit goes back only as
//! bytes reach the socket, and the socket is not read while the channel-1 window is 0 (or the
//! connection's output is paused), so the peer's writes block in its socket buffer rather than
//! in the agent.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;

use crate::proto;
use crate::stream::{Ctx, InWindow, Stream, Violation, Watched};
use crate::sys::{self, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT};

const CONNECT_TIMEOUT_NS: u64 = 10_000_000_000;
const SLOT_SOCKET: u8 = 0;

#[derive(Debug)]
pub enum TcpError {
    BadRequest(String),
    /// A system call failed (ECONNREFUSED becomes REFUSED).
    Os(&'static str, io::Error),
    ConnectTimeout,
    Cancelled,
}

impl TcpError {
    fn code(&self) -> u32 {
        match self {
            TcpError::BadRequest(_) => proto::BAD_REQUEST,
            TcpError::Os(_, e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => proto::REFUSED,
            _ => proto::IO,
        }
    }

    fn errno(&self) -> Option<i32> {
        match self {
            TcpError::Os(_, e) => e.raw_os_error(),
            TcpError::ConnectTimeout => Some(libc::ETIMEDOUT),
            _ => None,
        }
    }
}

impl fmt::Display for TcpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TcpError::BadRequest(m) => f.write_str(m),
            TcpError::Os(what, e) => write!(f, "{what}: {}", sys::io_text(e)),
            TcpError::ConnectTimeout => f.write_str("connect: no answer within 10 s"),
            TcpError::Cancelled => f.write_str("cancelled"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Open,
    Done,
}

pub struct TcpStream {
    sock: Option<Watched>,
    state: State,
    deadline: u64,
    /// Host → socket bytes not yet written (at most one window).
    tx: VecDeque<u8>,
    /// Channel-0 window: bytes the host may still send.
    tx_window: InWindow,
    tx_eof: bool,
    /// SHUT_WR done (after channel-0 EOF and everything before it).
    tx_shut: bool,
    /// Channel-1 window: bytes the agent may still send.
    rx_window: u64,
    /// The peer's EOF was forwarded.
    rx_eof: bool,
}

impl TcpStream {
    fn new(sock: OwnedFd, state: State) -> TcpStream {
        TcpStream {
            sock: Some(Watched::new(sock)),
            state,
            deadline: 0,
            tx: VecDeque::new(),
            tx_window: InWindow::new(),
            tx_eof: false,
            tx_shut: false,
            rx_window: proto::INITIAL_WINDOW as u64,
            rx_eof: false,
        }
    }
}

/// A stream over an already-connected socket (PROXY_CONN): what a TCP_CONNECT stream is after
/// STARTED. The caller has announced the stream; nothing is sent here unless the socket cannot
/// be watched (then the stream ends with STREAM_ERROR at once).
pub fn accepted(cx: &mut Ctx, sock: OwnedFd) -> Box<dyn Stream> {
    let mut s = TcpStream::new(sock, State::Open);
    s.sync(cx);
    Box::new(s)
}

pub fn open(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    let req = match proto::TcpConnect::parse(payload) {
        Ok(r) => r,
        Err(e) => {
            fail_now(cx, &TcpError::BadRequest(e.to_string()));
            return None;
        }
    };
    let (sock, connected) = match sys::tcp_connect(&req.addr) {
        Ok(s) => s,
        Err(e) => {
            fail_now(cx, &TcpError::Os("connect", e));
            return None;
        }
    };
    let mut s = TcpStream::new(sock, State::Connecting);
    if connected {
        s.established(cx);
    } else {
        s.deadline = sys::monotonic_ns() + CONNECT_TIMEOUT_NS;
        cx.set_deadline(s.deadline);
        s.sync(cx);
    }
    Some(Box::new(s))
}

fn fail_now(cx: &mut Ctx, e: &TcpError) {
    cx.error(e.code(), &e.to_string(), e.errno());
}

impl TcpStream {
    fn established(&mut self, cx: &mut Ctx) {
        cx.clear_deadline(self.deadline);
        self.state = State::Open;
        cx.send(proto::STARTED, 0, &[]);
        self.write_tx(cx);
        self.sync(cx);
    }

    /// Ends the stream with STREAM_ERROR; `reset` closes with a reset (SO_LINGER 0).
    fn fail(&mut self, cx: &mut Ctx, e: TcpError, reset: bool) {
        self.close(cx, reset);
        fail_now(cx, &e);
    }

    fn close(&mut self, cx: &mut Ctx, reset: bool) {
        if let Some(w) = self.sock.take() {
            if reset {
                let _ = sys::set_linger_reset(w.raw());
            }
        }
        cx.clear_deadline(self.deadline);
        self.state = State::Done;
        self.tx.clear();
    }

    /// Writes what the socket takes, returns the credit, and half-closes after EOF.
    fn write_tx(&mut self, cx: &mut Ctx) {
        let Some(fd) = self.sock.as_ref().map(Watched::raw) else { return };
        let mut written = 0u64;
        while !self.tx.is_empty() {
            match sys::write(fd, self.tx.as_slices().0) {
                Ok(n) => {
                    self.tx.drain(..n);
                    written += n as u64;
                }
                Err(ref e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return self.fail(cx, TcpError::Os("write", e), false),
            }
        }
        if written > 0 && !self.tx_eof {
            self.tx_window.consumed(cx, proto::STDIN, written);
        }
        if self.tx.is_empty() && self.tx_eof && !self.tx_shut {
            if let Err(e) = sys::shutdown_write(fd) {
                return self.fail(cx, TcpError::Os("shutdown", e), false);
            }
            self.tx_shut = true;
        }
        self.maybe_finish(cx);
    }

    /// Forwards one chunk of what the socket received.
    fn read_rx(&mut self, cx: &mut Ctx) {
        let Some(fd) = self.sock.as_ref().map(Watched::raw) else { return };
        if self.rx_eof || self.rx_window == 0 || !cx.can_produce() {
            return;
        }
        let max = (self.rx_window as usize).min(proto::MAX_DATA);
        match cx.read_data(proto::STDOUT, fd, max) {
            Ok(0) => {
                self.rx_eof = true;
                cx.eof(proto::STDOUT);
                self.maybe_finish(cx);
            }
            Ok(n) => self.rx_window -= n as u64,
            Err(ref e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => self.fail(cx, TcpError::Os("read", e), false),
        }
    }

    fn maybe_finish(&mut self, cx: &mut Ctx) {
        if self.state == State::Open && self.rx_eof && self.tx_shut {
            self.close(cx, false);
            cx.send(proto::OK, 0, &[]);
        }
    }

    fn sync(&mut self, cx: &mut Ctx) {
        let want = match self.state {
            State::Connecting => EPOLLOUT,
            State::Open => {
                let mut w = 0;
                if !self.rx_eof && self.rx_window > 0 && !cx.paused {
                    w |= EPOLLIN;
                }
                if !self.tx.is_empty() {
                    w |= EPOLLOUT;
                }
                w
            }
            State::Done => return,
        };
        let tok = cx.token(SLOT_SOCKET);
        if let Some(w) = self.sock.as_mut() {
            if let Err(e) = w.want(cx.epoll, tok, want) {
                self.fail(cx, TcpError::Os("epoll_ctl", e), true);
            }
        }
    }
}

impl Stream for TcpStream {
    fn on_data(&mut self, cx: &mut Ctx, channel: u8, eof: bool, payload: &[u8]) -> Result<(), Violation> {
        if channel != proto::STDIN || self.tx_eof || self.state == State::Done {
            return Ok(());
        }
        let len = payload.len() as u64;
        if !self.tx_window.take(len) {
            return Err(Violation("TCP DATA beyond the window".into()));
        }
        self.tx_eof = eof;
        self.tx.extend(payload);
        if self.state == State::Open {
            self.write_tx(cx);
            self.sync(cx);
        }
        Ok(())
    }

    fn on_window(&mut self, cx: &mut Ctx, channel: u8, inc: u32) {
        if channel != proto::STDOUT || self.rx_eof || self.state == State::Done {
            return;
        }
        self.rx_window = self.rx_window.saturating_add(inc as u64);
        self.sync(cx);
    }

    fn on_event(&mut self, cx: &mut Ctx, slot: u8, events: u32) {
        if slot != SLOT_SOCKET {
            return;
        }
        let Some(fd) = self.sock.as_ref().map(Watched::raw) else { return };
        match self.state {
            State::Connecting => match sys::socket_error(fd) {
                Ok(0) if events & EPOLLOUT != 0 => self.established(cx),
                Ok(0) => {}
                Ok(errno) => self.fail(cx, TcpError::Os("connect", io::Error::from_raw_os_error(errno)), false),
                Err(e) => self.fail(cx, TcpError::Os("connect", e), false),
            },
            State::Open => {
                if events & EPOLLERR != 0 {
                    if let Ok(errno) = sys::socket_error(fd) {
                        if errno != 0 {
                            let e = io::Error::from_raw_os_error(errno);
                            return self.fail(cx, TcpError::Os("socket", e), false);
                        }
                    }
                }
                if events & EPOLLOUT != 0 {
                    self.write_tx(cx);
                }
                if events & (EPOLLIN | EPOLLHUP) != 0 {
                    self.read_rx(cx);
                }
                self.sync(cx);
            }
            State::Done => {}
        }
    }

    fn on_deadline(&mut self, cx: &mut Ctx, at: u64) {
        if at == self.deadline && self.state == State::Connecting {
            self.fail(cx, TcpError::ConnectTimeout, false);
        }
    }

    fn on_pause(&mut self, cx: &mut Ctx) {
        self.sync(cx);
    }

    fn on_cancel(&mut self, cx: &mut Ctx) {
        self.fail(cx, TcpError::Cancelled, true);
    }

    fn abort(&mut self, cx: &mut Ctx) {
        self.close(cx, true);
    }

    fn done(&self) -> bool {
        self.state == State::Done
    }
}
