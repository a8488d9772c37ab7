//! SPAWN_BENCH streams: spawn and reap a program `count` times, one after another, and answer
//! with the spawn-to-reap times (the guest's own process-start floor).

use crate::exec::{self, Prepared};
use crate::proto;
use crate::stream::{Ctx, Stream};
use crate::sys::{self, pid_t, Reaped};

const MAX_BENCH_COUNT: u32 = 1_000_000;

pub struct BenchStream {
    prepared: Prepared,
    remaining: u32,
    samples: Vec<u64>,
    /// The run in progress: pid and start time.
    current: Option<(pid_t, u64)>,
    done: bool,
}

pub fn open(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    let req = match proto::SpawnBench::parse(payload) {
        Ok(r) if r.count > MAX_BENCH_COUNT => {
            cx.error(proto::BAD_REQUEST, "count too large", None);
            return None;
        }
        Ok(r) => r,
        Err(e) => {
            cx.error(proto::BAD_REQUEST, &e.to_string(), None);
            return None;
        }
    };
    let prepared = match exec::prepare(&req.argv, &req.env, None, sys::geteuid(), sys::getegid()) {
        Ok(p) => p,
        Err(e) => {
            let code = match e.exit_code() {
                None => proto::BAD_REQUEST,
                Some(127) => proto::NOT_FOUND,
                Some(_) => proto::IO,
            };
            cx.error(code, &e.to_string(), None);
            return None;
        }
    };
    let mut b = BenchStream {
        prepared,
        remaining: req.count,
        samples: Vec::with_capacity(req.count as usize),
        current: None,
        done: false,
    };
    b.next(cx);
    Some(Box::new(b))
}

impl BenchStream {
    /// Starts the next run, or ends the stream when all are done.
    fn next(&mut self, cx: &mut Ctx) {
        if self.remaining == 0 {
            let samples = std::mem::take(&mut self.samples);
            cx.send(proto::OK, 0, &proto::ok_samples(&samples));
            self.done = true;
            return;
        }
        self.remaining -= 1;
        let null = cx.devnull();
        let t0 = sys::monotonic_ns();
        match self.prepared.start([null, null, null], None, None) {
            Ok(pid) => {
                self.current = Some((pid, t0));
                cx.watch_child(pid);
            }
            Err(e) => {
                cx.error(proto::IO, &e.to_string(), None);
                self.done = true;
            }
        }
    }

    fn kill(&mut self, cx: &mut Ctx) {
        if let Some((pid, _)) = self.current.take() {
            let _ = sys::kill(-pid, libc::SIGKILL);
            cx.forget_child(pid);
        }
    }
}

impl Stream for BenchStream {
    fn on_exit(&mut self, cx: &mut Ctx, r: &Reaped) {
        match self.current {
            Some((pid, t0)) if pid == r.pid => {
                self.current = None;
                self.samples.push(sys::monotonic_ns().saturating_sub(t0));
                self.next(cx);
            }
            _ => {}
        }
    }

    fn on_cancel(&mut self, cx: &mut Ctx) {
        self.kill(cx);
        cx.error(proto::IO, "cancelled", None);
        self.done = true;
    }

    fn abort(&mut self, cx: &mut Ctx) {
        self.kill(cx);
    }

    fn done(&self) -> bool {
        self.done
    }
}
