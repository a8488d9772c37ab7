//! The stdio side of an exec stream, as a trait: pipes (pipes.rs) or a pseudo-terminal (pty.rs)
//! implement it, and the exec stream (stream_exec.rs) drives whichever it was given. Its own
//! module, so that neither implementation depends on the stream that uses it.

use std::ffi::CStr;
use std::os::fd::RawFd;

use crate::proto;
use crate::stream::{Ctx, Violation};

/// The stdio side of an exec stream.
pub trait ExecIo {
    /// Descriptors for the next process's 0, 1 and 2, and the terminal to make its
    /// controlling one.
    fn child_stdio(&self, devnull: RawFd) -> ([RawFd; 3], Option<&CStr>);
    /// No further process will start: close the child ends the agent kept.
    fn release_child_ends(&mut self);
    /// Channel-0 DATA.
    fn on_input(&mut self, cx: &mut Ctx, eof: bool, payload: &[u8]) -> Result<(), Violation>;
    fn on_window(&mut self, cx: &mut Ctx, channel: u8, inc: u32);
    fn on_event(&mut self, cx: &mut Ctx, slot: u8, events: u32);
    fn on_resize(&mut self, _size: proto::Resize) {}
    /// (Re)registers descriptors for what is wanted now (after a pause change, say).
    fn sync(&mut self, cx: &mut Ctx);
    /// The last process has been reaped: forward what it left behind (nothing if `discard`),
    /// then `trailer` (a start-failure message for stderr), then end the output.
    fn finish(&mut self, cx: &mut Ctx, discard: bool, trailer: &[u8]);
    /// Output still to forward after `finish` that no descriptor signals.
    fn pump(&mut self, _cx: &mut Ctx) {}
    fn wants_pump(&self) -> bool {
        false
    }
    /// Everything is forwarded (only after `finish`).
    fn output_done(&self) -> bool;
}
