//! Pipe stdio of an exec stream: stdin fed by channel 0, stdout and stderr forwarded on
//! channels 1 and 2.
//!
//! Once the last process is reaped, each output pipe forwards exactly what it holds at that
//! moment (FIONREAD) and ends: output that background processes write later, holding the
//! pipe open, is not waited for.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::proto;
use crate::stream::{Ctx, InWindow, Violation, Watched};
use crate::exec_io::ExecIo;
use crate::sys::{self, EPOLLIN, EPOLLOUT};

// Descriptor slots in epoll tokens.
const SLOT_STDIN: u8 = 0;
const SLOT_STDOUT: u8 = 1; // + 1: stderr

/// The host → child stdin channel.
struct InChan {
    /// Our write end (None: stdin is /dev/null, or closed).
    fd: Option<Watched>,
    buf: VecDeque<u8>,
    /// What the host may still send, and credit owed to it.
    window: InWindow,
    eof: bool,
}

/// A child → host byte channel (stdout or stderr).
struct OutChan {
    fd: Option<Watched>,
    window: u64,
    /// Set once the last process is reaped: bytes still to forward (what was in the pipe).
    remaining: Option<usize>,
    /// Sent after the pipe's bytes (a chain's start-failure message on stderr).
    trailer: Vec<u8>,
}

impl OutChan {
    fn new(fd: OwnedFd) -> OutChan {
        OutChan { fd: Some(Watched::new(fd)), window: proto::INITIAL_WINDOW as u64, remaining: None, trailer: Vec::new() }
    }

    fn done(&self) -> bool {
        self.fd.is_none() && self.trailer.is_empty()
    }

    /// Sends what the window allows of the trailer, once the pipe is done.
    fn send_trailer(&mut self, cx: &mut Ctx, channel: u8) {
        if self.fd.is_some() || self.trailer.is_empty() {
            return;
        }
        let n = self.trailer.len().min(self.window as usize).min(proto::MAX_DATA);
        if n > 0 {
            cx.send(proto::DATA, channel, &self.trailer[..n]);
            self.trailer.drain(..n);
            self.window -= n as u64;
        }
    }
}

/// The child's ends, kept while another command may still start on them.
struct ChildEnds {
    /// stdin's read end (None: /dev/null).
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

pub struct PipeIo {
    stdin: InChan,
    out: [OutChan; 2],
    child: Option<ChildEnds>,
}

impl PipeIo {
    pub fn new(stdin_pipe: bool) -> io::Result<PipeIo> {
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        let stdin = if stdin_pipe { Some(sys::pipe()?) } else { None };
        sys::set_pipe_nonblocking(out_r.as_raw_fd())?;
        sys::set_pipe_nonblocking(err_r.as_raw_fd())?;
        if let Some((_, w)) = &stdin {
            sys::set_pipe_nonblocking(w.as_raw_fd())?;
        }
        let (stdin_r, stdin_w) = match stdin {
            Some((r, w)) => (Some(r), Some(Watched::new(w))),
            None => (None, None),
        };
        Ok(PipeIo {
            stdin: InChan { fd: stdin_w, buf: VecDeque::new(), window: InWindow::new(), eof: false },
            out: [OutChan::new(out_r), OutChan::new(err_r)],
            child: Some(ChildEnds { stdin: stdin_r, stdout: out_w, stderr: err_w }),
        })
    }

    fn close_stdin(&mut self) {
        self.stdin.fd = None;
        self.stdin.buf.clear();
    }

    fn sync_out(&mut self, cx: &mut Ctx, ci: usize) {
        let chan = &mut self.out[ci];
        let want = chan.window > 0 && !cx.paused && chan.remaining != Some(0);
        let tok = cx.token(SLOT_STDOUT + ci as u8);
        if let Some(w) = chan.fd.as_mut() {
            // Cannot fail for a valid pipe; if it did, the channel would stall, so close it.
            if w.want(cx.epoll, tok, if want { EPOLLIN } else { 0 }).is_err() {
                chan.fd = None;
            }
        }
    }

    fn sync_in(&mut self, cx: &mut Ctx) {
        let inp = &mut self.stdin;
        if inp.buf.is_empty() && inp.eof {
            inp.fd = None; // the child reads EOF
        }
        let tok = cx.token(SLOT_STDIN);
        if let Some(w) = inp.fd.as_mut() {
            let want = if inp.buf.is_empty() { 0 } else { EPOLLOUT };
            if w.want(cx.epoll, tok, want).is_err() {
                self.close_stdin();
            }
        }
    }

    fn pump_output(&mut self, cx: &mut Ctx, ci: usize) {
        let channel = ci as u8 + 1;
        let chan = &mut self.out[ci];
        let Some(fd) = chan.fd.as_ref().map(Watched::raw) else { return };
        if chan.window > 0 && cx.can_produce() {
            let mut max = (chan.window as usize).min(proto::MAX_DATA);
            if let Some(r) = chan.remaining {
                max = max.min(r);
            }
            match if max > 0 { cx.read_data(channel, fd, max) } else { Ok(0) } {
                Ok(n) if n > 0 => {
                    chan.window -= n as u64;
                    if let Some(r) = chan.remaining.as_mut() {
                        *r -= n;
                        if *r == 0 {
                            chan.fd = None;
                        }
                    }
                }
                Err(ref e) if e.kind() == io::ErrorKind::WouldBlock && chan.remaining.is_none() => {}
                // EOF, an error, or nothing left of what the exited process wrote.
                _ => chan.fd = None,
            }
        }
        chan.send_trailer(cx, channel);
        self.sync_out(cx, ci);
    }

    fn pump_stdin(&mut self, cx: &mut Ctx) {
        let inp = &mut self.stdin;
        let mut consumed = 0u64;
        if let Some(fd) = inp.fd.as_ref().map(Watched::raw) {
            while !inp.buf.is_empty() {
                match sys::write(fd, inp.buf.as_slices().0) {
                    Ok(n) => {
                        inp.buf.drain(..n);
                        consumed += n as u64;
                    }
                    Err(ref e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        // The child closed its stdin: the rest is discarded (and credited).
                        consumed += inp.buf.len() as u64;
                        inp.fd = None;
                        inp.buf.clear();
                        break;
                    }
                }
            }
        }
        if consumed > 0 && !inp.eof {
            inp.window.consumed(cx, proto::STDIN, consumed);
        }
        self.sync_in(cx);
    }
}

impl ExecIo for PipeIo {
    fn child_stdio(&self, devnull: RawFd) -> ([RawFd; 3], Option<&CStr>) {
        let c = self.child.as_ref().expect("child ends are kept until the last start");
        let stdin = c.stdin.as_ref().map_or(devnull, |f| f.as_raw_fd());
        ([stdin, c.stdout.as_raw_fd(), c.stderr.as_raw_fd()], None)
    }

    fn release_child_ends(&mut self) {
        self.child = None;
    }

    fn on_input(&mut self, cx: &mut Ctx, eof: bool, payload: &[u8]) -> Result<(), Violation> {
        let inp = &mut self.stdin;
        if inp.eof {
            return Ok(());
        }
        let len = payload.len() as u64;
        if !inp.window.take(len) {
            return Err(Violation("stdin DATA beyond the window".into()));
        }
        inp.eof = eof;
        if inp.fd.is_none() {
            // stdin is /dev/null or already closed: discard, but keep the host unblocked.
            if len > 0 && !eof {
                inp.window.consumed(cx, proto::STDIN, len);
            }
            return Ok(());
        }
        inp.buf.extend(payload);
        self.pump_stdin(cx);
        Ok(())
    }

    fn on_window(&mut self, cx: &mut Ctx, channel: u8, inc: u32) {
        if channel != proto::STDOUT && channel != proto::STDERR {
            return;
        }
        let ci = channel as usize - 1;
        let chan = &mut self.out[ci];
        if chan.done() {
            return;
        }
        chan.window = chan.window.saturating_add(inc as u64);
        chan.send_trailer(cx, channel);
        self.sync_out(cx, ci);
    }

    fn on_event(&mut self, cx: &mut Ctx, slot: u8, _events: u32) {
        match slot {
            SLOT_STDIN => self.pump_stdin(cx),
            1 | 2 => self.pump_output(cx, (slot - SLOT_STDOUT) as usize),
            _ => {}
        }
    }

    fn sync(&mut self, cx: &mut Ctx) {
        self.sync_in(cx);
        self.sync_out(cx, 0);
        self.sync_out(cx, 1);
    }

    fn finish(&mut self, cx: &mut Ctx, discard: bool, trailer: &[u8]) {
        self.close_stdin();
        self.out[1].trailer.extend_from_slice(trailer);
        for ci in 0..2 {
            let chan = &mut self.out[ci];
            // Forward only what the process wrote before it exited.
            let left = match &chan.fd {
                Some(w) if !discard => sys::bytes_readable(w.raw()).unwrap_or(0),
                _ => 0,
            };
            if discard {
                chan.trailer.clear();
            }
            if left == 0 {
                chan.fd = None;
            } else {
                chan.remaining = Some(left);
            }
            chan.send_trailer(cx, ci as u8 + 1);
            self.sync_out(cx, ci);
        }
    }

    fn output_done(&self) -> bool {
        self.out.iter().all(OutChan::done)
    }
}
