//! Terminal stdio of an exec stream (EXEC `tty` = 1): a pseudo-terminal whose slave is the
//! process's stdin, stdout, stderr and controlling terminal. The master carries everything:
//! what the process writes goes out on channel 1 (channel 2 only ever gets its EOF), channel-0
//! DATA is typed input, channel-0 EOF types the terminal's VEOF character once.
//!
//! The agent keeps its own descriptor of the slave while a process may run, so the master
//! never reads EIO in between (a chain's second command opens the same slave). After the last
//! reap it closes it and drains the master: Linux's `n_tty_read` flushes the pty's pending
//! buffer work (`tty_buffer_flush_work`) before it answers EAGAIN or EIO, so reading until
//! EAGAIN (or EIO: no slave descriptor left anywhere) collects everything the process wrote
//! before it exited, without waiting for background processes that keep the terminal open.

use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::proto;
use crate::stream::{Ctx, InWindow, Violation, Watched};
use crate::exec_io::ExecIo;
use crate::sys::{self, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT};

const SLOT_MASTER: u8 = 3;
/// ^D, should the terminal's settings be unreadable.
const DEFAULT_VEOF: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A process runs (or may still start) on the terminal.
    Running,
    /// The last process was reaped: reading what the terminal still holds.
    Draining,
    /// Channel 1 is complete.
    Done,
}

pub struct TtyIo {
    master: Watched,
    /// The agent's descriptor of the slave (while a process may run) and its path.
    slave: Option<OwnedFd>,
    path: CString,
    phase: Phase,
    /// Typed input not yet written to the master.
    input: VecDeque<u8>,
    /// Channel 0: what the host may still send, and credit owed to it.
    in_window: InWindow,
    in_eof: bool,
    /// Channel-0 EOF arrived: VEOF still to be typed (after `input`).
    veof_pending: bool,
    /// Writing to the master failed: input is discarded (and credited).
    input_dead: bool,
    /// Channel-1 window: bytes the agent may still send.
    out_window: u64,
    /// The master reported EIO or hangup while running: stop reading until the drain.
    read_hup: bool,
    /// Sent on channel 1 after the drain (a chain's start-failure message).
    trailer: Vec<u8>,
}

impl TtyIo {
    pub fn new(cols: u16, rows: u16) -> io::Result<TtyIo> {
        let pty = sys::open_pty(cols, rows)?;
        Ok(TtyIo {
            master: Watched::new(pty.master),
            slave: Some(pty.slave),
            path: pty.path,
            phase: Phase::Running,
            input: VecDeque::new(),
            in_window: InWindow::new(),
            in_eof: false,
            veof_pending: false,
            input_dead: false,
            out_window: proto::INITIAL_WINDOW as u64,
            read_hup: false,
            trailer: Vec::new(),
        })
    }

    fn write_input(&mut self, cx: &mut Ctx) {
        let fd = self.master.raw();
        let mut consumed = 0u64;
        while !self.input.is_empty() && !self.input_dead {
            match sys::write(fd, self.input.as_slices().0) {
                Ok(n) => {
                    self.input.drain(..n);
                    consumed += n as u64;
                }
                Err(ref e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => self.input_dead = true,
            }
        }
        if self.input_dead {
            consumed += self.input.len() as u64;
            self.input.clear();
            self.veof_pending = false;
        }
        if self.input.is_empty() && self.veof_pending {
            let veof = sys::veof_char(fd).unwrap_or(DEFAULT_VEOF);
            match sys::write(fd, &[veof]) {
                Ok(_) => self.veof_pending = false,
                Err(ref e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => self.veof_pending = false,
            }
        }
        if consumed > 0 && !self.in_eof {
            self.in_window.consumed(cx, proto::STDIN, consumed);
        }
    }

    /// Reads one chunk from the master into channel 1. Ok(false): nothing more to read now
    /// (EAGAIN), Err: EIO or end (no slave left, or hangup).
    fn read_chunk(&mut self, cx: &mut Ctx) -> io::Result<bool> {
        let max = (self.out_window as usize).min(proto::MAX_DATA);
        match cx.read_data(proto::STDOUT, self.master.raw(), max) {
            Ok(0) => Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => {
                self.out_window -= n as u64;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn end_output(&mut self, cx: &mut Ctx) {
        self.phase = Phase::Done;
        self.send_trailer(cx);
    }

    fn send_trailer(&mut self, cx: &mut Ctx) {
        if self.phase != Phase::Done || self.trailer.is_empty() {
            return;
        }
        let n = self.trailer.len().min(self.out_window as usize).min(proto::MAX_DATA);
        if n > 0 {
            cx.send(proto::DATA, proto::STDOUT, &self.trailer[..n]);
            self.trailer.drain(..n);
            self.out_window -= n as u64;
        }
    }
}

impl ExecIo for TtyIo {
    fn child_stdio(&self, _devnull: RawFd) -> ([RawFd; 3], Option<&CStr>) {
        let fd = self.slave.as_ref().expect("the slave is kept until the last start").as_raw_fd();
        ([fd, fd, fd], Some(&self.path))
    }

    /// Kept until the last process is reaped (see the module comment), not only until it
    /// starts; closed by `finish`.
    fn release_child_ends(&mut self) {}

    fn on_input(&mut self, cx: &mut Ctx, eof: bool, payload: &[u8]) -> Result<(), Violation> {
        if self.in_eof {
            return Ok(());
        }
        let len = payload.len() as u64;
        if !self.in_window.take(len) {
            return Err(Violation("terminal input beyond the window".into()));
        }
        self.in_eof = eof;
        if self.phase != Phase::Running || self.input_dead {
            // Nobody reads any more: discard, but keep the host unblocked.
            if len > 0 && !eof {
                self.in_window.consumed(cx, proto::STDIN, len);
            }
            return Ok(());
        }
        self.input.extend(payload);
        self.veof_pending |= eof;
        self.write_input(cx);
        self.sync(cx);
        Ok(())
    }

    fn on_window(&mut self, cx: &mut Ctx, channel: u8, inc: u32) {
        if channel != proto::STDOUT || (self.phase == Phase::Done && self.trailer.is_empty()) {
            return;
        }
        self.out_window = self.out_window.saturating_add(inc as u64);
        self.send_trailer(cx);
        self.sync(cx);
    }

    fn on_event(&mut self, cx: &mut Ctx, slot: u8, events: u32) {
        if slot != SLOT_MASTER || self.phase != Phase::Running {
            return;
        }
        if events & (EPOLLOUT | EPOLLERR) != 0 {
            self.write_input(cx);
        }
        let readable = events & (EPOLLIN | EPOLLHUP | EPOLLERR) != 0;
        if readable && self.out_window > 0 && cx.can_produce() && !self.read_hup && self.read_chunk(cx).is_err() {
            self.read_hup = true;
        }
        self.sync(cx);
    }

    fn on_resize(&mut self, size: proto::Resize) {
        if self.phase == Phase::Running {
            let _ = sys::set_winsize(self.master.raw(), size.cols, size.rows);
        }
    }

    fn sync(&mut self, cx: &mut Ctx) {
        let mut want = 0;
        if self.phase == Phase::Running {
            if self.out_window > 0 && !cx.paused && !self.read_hup {
                want |= EPOLLIN;
            }
            if !self.input_dead && (!self.input.is_empty() || self.veof_pending) {
                want |= EPOLLOUT;
            }
        }
        let tok = cx.token(SLOT_MASTER);
        if self.master.want(cx.epoll, tok, want).is_err() {
            self.read_hup = true;
            self.input_dead = true;
        }
    }

    fn finish(&mut self, cx: &mut Ctx, discard: bool, trailer: &[u8]) {
        self.slave = None;
        self.input.clear();
        self.veof_pending = false;
        if discard {
            self.trailer.clear();
            self.end_output(cx);
        } else {
            self.trailer.extend_from_slice(trailer);
            self.phase = Phase::Draining;
        }
        self.sync(cx); // out of the epoll set: the drain is pumped
    }

    /// One chunk of the drain.
    fn pump(&mut self, cx: &mut Ctx) {
        if self.phase != Phase::Draining || self.out_window == 0 || !cx.can_produce() {
            return;
        }
        match self.read_chunk(cx) {
            Ok(true) => {}
            Ok(false) | Err(_) => self.end_output(cx),
        }
    }

    fn wants_pump(&self) -> bool {
        self.phase == Phase::Draining && self.out_window > 0
    }

    fn output_done(&self) -> bool {
        self.phase == Phase::Done && self.trailer.is_empty()
    }
}
