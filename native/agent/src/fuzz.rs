//! Fuzzing of the agent's decoders (`proto.rs`, and `exec::prepare` behind EXEC), std only:
//! cargo-fuzz and proptest are not available offline. A seeded generator makes random frames
//! and payloads, well-formed ones and mutations of them, for a fixed time budget. Every decoder
//! must return (Ok or Err, never panic), quickly, and allocate at most a small multiple of its
//! input; framing must match a reference parser written from PROTOCOL.md whatever the split;
//! well-formed requests must round-trip.
//!
//! A failure prints its seed and case; `SM_FUZZ_SEED=<seed> SM_FUZZ_CASE=<case> cargo test
//! fuzz_` replays that one case. `SM_FUZZ_SEED=random` explores; `SM_FUZZ_BUDGET_SCALE=4` runs
//! four times longer. The connection itself (`conn.rs`) is fuzzed through the real binary in
//! `tests/fuzz_conn.rs`.

use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::exec;
use crate::proto::*;
use crate::proto_fs::*;
use crate::watch::parse_events;
use crate::sys::alloc_count;

const DEFAULT_SEED: u64 = 0x5eed_0010;
/// One decoder call taking this long is a hang.
const HANG: Duration = Duration::from_secs(2);

/// splitmix64: small, fast, and every case is reproducible from (seed, case).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, case: u64) -> Rng {
        let mut r = Rng(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        r.next();
        r
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// A length that is mostly small, sometimes large.
    pub fn len(&mut self, small: usize, large: usize) -> usize {
        if self.chance(16) {
            self.below(large + 1)
        } else {
            self.below(small + 1)
        }
    }
}

struct Budget {
    seed: u64,
    /// Replay one case only.
    only: Option<u64>,
    until: Instant,
}

impl Budget {
    fn new(ms: u64) -> Budget {
        let seed = match std::env::var("SM_FUZZ_SEED").ok().as_deref() {
            Some("random") => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
            Some(s) => s.parse().expect("SM_FUZZ_SEED must be a number or \"random\""),
            None => DEFAULT_SEED,
        };
        let only = std::env::var("SM_FUZZ_CASE").ok().map(|c| c.parse().expect("SM_FUZZ_CASE must be a number"));
        let scale: u64 = std::env::var("SM_FUZZ_BUDGET_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
        Budget { seed, only, until: Instant::now() + Duration::from_millis(ms * scale) }
    }

    /// Runs `case` for every case number until the budget is spent; returns how many ran.
    fn run(&self, name: &str, mut case: impl FnMut(&mut Rng) -> Result<(), String>) -> u64 {
        let mut n = 0;
        loop {
            let id = self.only.unwrap_or(n);
            let mut rng = Rng::new(self.seed, id);
            let r = panic::catch_unwind(AssertUnwindSafe(|| case(&mut rng)));
            let failure = match r {
                Ok(Ok(())) => None,
                Ok(Err(msg)) => Some(msg),
                Err(p) => Some(format!("panic: {}", p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default())),
            };
            if let Some(msg) = failure {
                panic!("{name}: case {id} failed: {msg}\nreplay: SM_FUZZ_SEED={} SM_FUZZ_CASE={id} cargo test {name}", self.seed);
            }
            n += 1;
            if self.only.is_some() || Instant::now() >= self.until {
                return n;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generators

const TYPES: &[u8] = &[
    HELLO, HELLO_OK, PING, PONG, SHUTDOWN, GOAWAY, EXEC, STARTED, DATA, WINDOW, EXIT, SIGNAL, STREAM_ERROR, RESIZE, CANCEL,
    WRITE_FILE, READ_FILE, OK, SPAWN_BENCH, WORKLOAD_START, WORKLOAD_SIGNAL, TCP_CONNECT, LIST_BACKGROUND,
    KILL_BACKGROUND, PROXY_LISTEN, PROXY_STOP, PROXY_CONN, RESOLVE, FS_STAT, FS_LIST, FS_MKDIR, FS_RENAME, FS_REMOVE, FS_WATCH,
];

fn field_value(r: &mut Rng) -> Vec<u8> {
    match r.below(6) {
        0..=2 => {
            let n = [1, 2, 4, 8][r.below(4)];
            r.bytes(n)
        }
        3 => {
            let words: &[&[u8]] = &[
                b"true", b"/bin/sh", b"PATH=/bin", b"/tmp/x", b"::1", b"127.0.0.1", b"", b"a-vm.id_1", b"http_proxy=http://127.0.0.1:3128",
                b"=x", b"NOEQUALS", b"/", b"/a/../b", b"//x", b"/tmp/", b"/a/./b",
            ];
            words[r.below(words.len())].to_vec()
        }
        _ => {
            let n = r.len(24, 2048);
            r.bytes(n)
        }
    }
}

/// Fields that mostly use the tags the messages define, with values mostly of a typed width.
fn fields_payload(r: &mut Rng) -> Vec<u8> {
    let mut w = FieldWriter::new();
    for _ in 0..r.below(10) {
        let tag = if r.chance(6) { r.next() as u8 } else { 1 + r.below(12) as u8 };
        w = w.bytes(tag, &field_value(r));
    }
    w.finish()
}

fn payload(r: &mut Rng) -> Vec<u8> {
    match r.below(10) {
        0..=5 => fields_payload(r),
        6 | 7 => {
            let n = r.len(64, 4096);
            r.bytes(n)
        }
        8 => (r.next() as u32).to_le_bytes().to_vec(),
        _ => vec![0x61; [MAX_PAYLOAD, MAX_PAYLOAD - 1, 70_000, r.below(300_000)][r.below(4)]],
    }
}

fn frame(r: &mut Rng, out: &mut Vec<u8>) {
    let ty = if r.chance(8) { r.next() as u8 } else { TYPES[r.below(TYPES.len())] };
    let flags = if r.chance(4) { r.next() as u8 } else { [0, 1, 2, 3, 0x80, 0x81][r.below(6)] };
    let stream = match r.below(4) {
        0 => 0,
        1 => u32::MAX,
        2 => r.next() as u32,
        _ => r.below(8) as u32,
    };
    encode_frame(out, ty, flags, stream, &payload(r));
}

/// Byte-level mutations: flips, overwrites, length-like u32s, cuts, inserts, deletes, repeats.
pub fn mutate(r: &mut Rng, b: &mut Vec<u8>) {
    for _ in 0..r.below(4) {
        if b.is_empty() {
            let n = 1 + r.below(16);
            b.extend(r.bytes(n));
            continue;
        }
        let i = r.below(b.len());
        match r.below(7) {
            0 => b[i] ^= 1 << r.below(8),
            1 => b[i] = r.next() as u8,
            2 if i + 4 <= b.len() => {
                let v = [0, 1, 4, MAX_PAYLOAD as u32, MAX_PAYLOAD as u32 + 1, u32::MAX, r.next() as u32][r.below(7)];
                b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 => b.truncate(i),
            4 => {
                let n = 1 + r.below(16);
                let ins = r.bytes(n);
                b.splice(i..i, ins);
            }
            5 => {
                let end = (i + 1 + r.below(16)).min(b.len());
                b.drain(i..end);
            }
            _ => {
                let end = (i + 1 + r.below(64)).min(b.len());
                let dup = b[i..end].to_vec();
                b.splice(i..i, dup);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reference framing, from PROTOCOL.md section 1

#[derive(Debug, PartialEq, Eq)]
struct RefFrame {
    ty: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Frames of a whole stream; `Err(frames)` when a header announces more than MAX_PAYLOAD.
fn reference_frames(b: &[u8]) -> Result<Vec<RefFrame>, Vec<RefFrame>> {
    let mut out = Vec::new();
    let mut off = 0;
    while b.len() - off >= 12 {
        let len = u32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as usize;
        if len > 1 << 20 {
            return Err(out);
        }
        if b.len() - off - 12 < len {
            break;
        }
        let stream = u32::from_le_bytes(b[off + 8..off + 12].try_into().unwrap());
        out.push(RefFrame { ty: b[off + 4], flags: b[off + 5], stream, payload: b[off + 12..off + 12 + len].to_vec() });
        off += 12 + len;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Targets

/// Random and mutated streams, cut into random reads and reassembled the way a connection does
/// (append, decode every complete frame, keep the rest), decode to the reference's frames.
#[test]
fn fuzz_frames() {
    let n = Budget::new(2_500).run("fuzz_frames", |r| {
        let mut wire = Vec::new();
        if r.chance(5) {
            let n = r.len(64, 600);
            wire = r.bytes(n);
        } else {
            for _ in 0..r.below(8) {
                frame(r, &mut wire);
            }
            if !r.chance(4) {
                mutate(r, &mut wire);
            }
        }
        let want = reference_frames(&wire);
        let mut got = Vec::new();
        let mut inbuf: Vec<u8> = Vec::new();
        let mut failed = false;
        let mut off = 0;
        let mut reads = 0;
        'feed: while off < wire.len() {
            // Small reads mostly (headers cut anywhere), sometimes a large one; past 4096
            // reads, 256 KiB ones (the agent's own READ_CHUNK).
            let n = if reads > 4096 { 256 * 1024 } else if r.chance(3) { 1 + r.below(300_000) } else { 1 + r.below(13) };
            reads += 1;
            let end = (off + n).min(wire.len());
            inbuf.extend_from_slice(&wire[off..end]);
            off = end;
            let mut pos = 0;
            loop {
                match decode_frame(&inbuf[pos..]) {
                    Ok(None) => break,
                    Ok(Some((h, total))) => {
                        if h.len as usize + HEADER_LEN != total {
                            return Err(format!("header says {} bytes, frame is {total}", h.len));
                        }
                        got.push(RefFrame { ty: h.ty, flags: h.flags, stream: h.stream, payload: inbuf[pos + HEADER_LEN..pos + total].to_vec() });
                        pos += total;
                    }
                    Err(ProtoError::Oversized(len)) if len as usize > MAX_PAYLOAD => {
                        failed = true;
                        break 'feed;
                    }
                    Err(e) => return Err(format!("unexpected error {e:?}")),
                }
            }
            inbuf.drain(..pos);
            if inbuf.len() >= HEADER_LEN + MAX_PAYLOAD {
                return Err(format!("{} bytes buffered without a complete frame", inbuf.len()));
            }
        }
        match (want, failed) {
            (Ok(w), false) | (Err(w), true) if w == got => Ok(()),
            (w, _) => Err(format!("framing differs from the reference: got {} frames (failed {failed}), want {:?}", got.len(), w.map(|f| f.len()))),
        }
    });
    assert!(n > 50, "only {n} cases ran");
}

/// Runs a decoder on `input`: no panic (the caller catches it), no hang, and at most
/// 16 bytes allocated per input byte (plus 4 KiB) at any moment.
fn bounded<T>(what: &str, input: &[u8], f: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
    alloc_count::reset();
    let t0 = Instant::now();
    let out = f(input);
    let took = t0.elapsed();
    let peak = alloc_count::peak();
    if took > HANG {
        return Err(format!("{what}: {took:?} for {} bytes", input.len()));
    }
    if peak > 16 * input.len() + 4096 {
        return Err(format!("{what}: allocated {peak} bytes for {} bytes of input", input.len()));
    }
    Ok(out)
}

/// The transparent-egress DNS responder's parser on mutated queries: no panic, no hang, and what
/// it accepts has a host-name-sized name and answers that start with the query's id.
#[test]
fn fuzz_dns_queries() {
    use crate::dns_wire::{build_response, parse_query, Answer};
    let n = Budget::new(1_000).run("fuzz_dns_queries", |r| {
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1];
        for l in ["Web", "test"] {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        if r.chance(3) {
            let n = r.len(16, 600);
            q.extend(r.bytes(n));
        }
        for _ in 0..1 + r.below(4) {
            mutate(r, &mut q);
        }
        if let Ok(query) = bounded("DnsQuery", &q, parse_query)? {
            if query.name.len() > 253 || query.name.split('.').any(|l| l.len() > 63) {
                return Err(format!("a DNS name of {} bytes let through", query.name.len()));
            }
            let out = build_response(&query, &Answer::A([198, 18, 0, 1].into(), 60));
            if out[..2] != q[..2] || out.len() > 12 + 255 + 4 + 16 {
                return Err("a DNS answer does not match its query".into());
            }
        }
        Ok(())
    });
    assert!(n > 0);
}

/// Every request decoder, and EXEC's preparation (PATH lookup, C strings: no process is
/// started), on random, well-formed and mutated payloads.
#[test]
fn fuzz_requests() {
    let n = Budget::new(3_000).run("fuzz_requests", |r| {
        let mut p = match r.below(4) {
            0 => {
                let n = r.len(64, 70_000);
                r.bytes(n)
            }
            _ => fields_payload(r),
        };
        if r.chance(2) {
            mutate(r, &mut p);
        }
        bounded("fields", &p, |p| {
            for f in fields(p).take(1 << 20) {
                let Ok(f) = f else { break };
                let _ = (f.u8(), f.u16(), f.u32(), f.i32(), f.u64(), f.u64s());
            }
        })?;
        let _ = bounded("Hello", &p, Hello::parse)?;
        let _ = bounded("Signal", &p, Signal::parse)?;
        let _ = bounded("WriteFile", &p, WriteFile::parse)?;
        let _ = bounded("ReadFile", &p, ReadFile::parse)?;
        let _ = bounded("SpawnBench", &p, SpawnBench::parse)?;
        let _ = bounded("Resize", &p, Resize::parse)?;
        let _ = bounded("TcpConnect", &p, TcpConnect::parse)?;
        let _ = bounded("window", &p, parse_window)?;
        let _ = bounded("inotify events", &p, |p| parse_events(p).len())?;
        let ok_path = |what: &str, path: &[u8], root_ok: bool| {
            if normalised(path) && (root_ok || path != b"/") {
                Ok(())
            } else {
                Err(format!("{what} let through the path {path:?}"))
            }
        };
        if let Ok(s) = bounded("FsStat", &p, FsStat::parse)? {
            ok_path("FS_STAT", &s.path, true)?;
        }
        if let Ok(l) = bounded("FsList", &p, FsList::parse)? {
            ok_path("FS_LIST", &l.path, true)?;
            if l.depth == 0 || !(1..=MAX_LIST_ENTRIES).contains(&l.max_entries) {
                return Err(format!("FS_LIST let through {l:?}"));
            }
        }
        if let Ok(m) = bounded("FsMkdir", &p, FsMkdir::parse)? {
            ok_path("FS_MKDIR", &m.path, false)?;
            if m.mode > 0o7777 {
                return Err(format!("FS_MKDIR let through {m:?}"));
            }
        }
        if let Ok(m) = bounded("FsRename", &p, FsRename::parse)? {
            ok_path("FS_RENAME", &m.from, false)?;
            ok_path("FS_RENAME", &m.to, false)?;
        }
        for root_ok in [false, true] {
            if let Ok(m) = bounded("PathRecursive", &p, |p| PathRecursive::parse(p, root_ok))? {
                ok_path("FS_REMOVE/FS_WATCH", &m.path, root_ok)?;
            }
        }
        if let Ok(l) = bounded("ProxyListen", &p, ProxyListen::parse)? {
            let bad_env = |e: &Vec<u8>| e.len() > MAX_PROXY_ENV_LEN || env_key(e).is_empty() || env_key(e).len() == e.len();
            if (l.addr.port() == 0 && l.mode == ProxyMode::Proxy) || l.env.len() > MAX_PROXY_ENV || l.env.iter().any(bad_env) || !(1..=MAX_PROXY_STREAMS).contains(&l.max_streams) {
                return Err(format!("PROXY_LISTEN let through {l:?}"));
            }
        }
        if let Ok(a) = bounded("ResolveAnswer", &p, ResolveAnswer::parse)? {
            if a.verdict > 3 {
                return Err(format!("RESOLVE's answer let through {a:?}"));
            }
        }
        if let Ok(e) = bounded("Exec", &p, Exec::parse)? {
            if e.tty && (e.cols == 0 || e.rows == 0) {
                return Err(format!("a terminal of {}x{}", e.cols, e.rows));
            }
            let t0 = Instant::now();
            let _ = exec::prepare(&e.argv, &e.env, e.cwd.as_deref(), e.uid, e.gid);
            if t0.elapsed() > HANG {
                return Err("exec::prepare hung".into());
            }
        }
        if let Ok(h) = Hello::parse(&p) {
            if h.entropy.len() > 256 || h.vm_id.as_deref().is_some_and(|id| !valid_vm_id(id)) {
                return Err(format!("HELLO let through {h:?}"));
            }
        }
        Ok(())
    });
    assert!(n > 100, "only {n} cases ran");
}

/// Well-formed requests, with unknown tags mixed in, decode to what was encoded.
#[test]
fn fuzz_round_trip() {
    let n = Budget::new(1_000).run("fuzz_round_trip", |r| {
        let text = |r: &mut Rng| {
            let n = r.len(12, 300);
            r.bytes(n)
        };
        let noise = |r: &mut Rng, w: FieldWriter| if r.chance(3) { w.bytes(32 + r.below(200) as u8, &field_value(r)) } else { w };
        let mut want = Exec { argv: vec![b"prog".to_vec()], ..Exec::default() };
        let mut first = text(r);
        first.insert(0, b'x');
        want.argv = vec![first];
        want.argv.extend((0..r.below(5)).map(|_| text(r)));
        want.env = (0..r.below(5)).map(|_| text(r)).collect();
        want.cwd = r.chance(2).then(|| text(r));
        want.timeout_ms = r.next();
        want.uid = r.next() as u32;
        want.gid = r.next() as u32;
        want.stdin_pipe = r.chance(2);
        want.tty = r.chance(2);
        want.cols = 1 + r.below(u16::MAX as usize) as u16;
        want.rows = 1 + r.below(u16::MAX as usize) as u16;
        if r.chance(2) {
            let mut c = text(r);
            c.insert(0, b'y');
            want.chain = vec![c, text(r)];
        }
        let mut w = FieldWriter::new();
        for a in &want.argv {
            w = noise(r, w.bytes(1, a));
        }
        for e in &want.env {
            w = noise(r, w.bytes(2, e));
        }
        if let Some(c) = &want.cwd {
            w = w.bytes(3, c);
        }
        w = noise(r, w.u64(4, want.timeout_ms).u32(5, want.uid).u32(6, want.gid));
        w = w.u8(7, want.stdin_pipe as u8).u8(8, want.tty as u8).u16(9, want.cols).u16(10, want.rows);
        for c in &want.chain {
            w = w.bytes(11, c);
        }
        let got = Exec::parse(&w.finish()).map_err(|e| format!("{e}"))?;
        if got != want {
            return Err(format!("Exec: got {got:?}, want {want:?}"));
        }

        let id: Vec<u8> = (0..1 + r.below(MAX_VM_ID)).map(|_| b"abcXYZ019._-"[r.below(12)]).collect();
        let n = r.below(400);
        let entropy = r.bytes(n);
        let p = noise(r, FieldWriter::new().u16(1, 2).u16(2, 2).u64(3, 77)).bytes(4, &entropy).bytes(5, &id).finish();
        let h = Hello::parse(&p).map_err(|e| format!("{e}"))?;
        let want = Hello { version_min: 2, version_max: 2, host_time_ns: Some(77), entropy: entropy[..entropy.len().min(256)].to_vec(), vm_id: Some(id) };
        if h != want {
            return Err(format!("Hello: got {h:?}, want {want:?}"));
        }

        let path = [b"/".to_vec(), text(r)].concat();
        let p = noise(r, FieldWriter::new().bytes(1, &path)).u32(2, 0o7777).u64(3, 5).u32(4, 1).u32(5, 2).u8(6, 0).finish();
        let wf = WriteFile::parse(&p).map_err(|e| format!("{e}"))?;
        if wf != (WriteFile { path, mode: 0o7777, size: Some(5), uid: Some(1), gid: Some(2), mkdirs: false }) {
            return Err(format!("WriteFile: {wf:?}"));
        }
        let (signum, cols, port) = (r.next() as u32, r.next() as u16, 1 + r.below(65535) as u16);
        let s = Signal::parse(&FieldWriter::new().u32(1, signum).u8(2, 1).finish()).map_err(|e| format!("{e}"))?;
        let z = Resize::parse(&FieldWriter::new().u16(1, cols).u16(2, 3).finish()).map_err(|e| format!("{e}"))?;
        let t = TcpConnect::parse(&FieldWriter::new().u16(1, port).bytes(2, b"::1").finish()).map_err(|e| format!("{e}"))?;
        if s != (Signal { signum, group: true }) || z != (Resize { cols, rows: 3 }) || t.addr.port() != port {
            return Err(format!("{s:?} {z:?} {t:?}"));
        }

        let env: Vec<Vec<u8>> = (0..r.below(MAX_PROXY_ENV + 1))
            .map(|_| {
                let (k, v) = (1 + r.below(20), r.len(30, MAX_PROXY_ENV_LEN - 21));
                let key: Vec<u8> = (0..k).map(|_| b"abcXYZ_019"[r.below(10)]).collect();
                [key, b"=".to_vec(), r.bytes(v)].concat()
            })
            .collect();
        let max_streams = r.below(MAX_PROXY_STREAMS as usize + 1) as u32;
        let mut w = noise(r, FieldWriter::new().u16(1, port)).bytes(2, b"127.0.0.2");
        for e in &env {
            w = noise(r, w.bytes(3, e));
        }
        let l = ProxyListen::parse(&w.u32(4, max_streams).finish()).map_err(|e| format!("{e}"))?;
        let want = ProxyListen { addr: SocketAddr::new([127, 0, 0, 2].into(), port), mode: ProxyMode::Proxy, env, max_streams: if max_streams == 0 { DEFAULT_PROXY_STREAMS } else { max_streams } };
        if l != want {
            return Err(format!("ProxyListen: got {l:?}, want {want:?}"));
        }

        // FS_*: a normalised path of random components (no '/', not '.' or '..').
        let fs_path = |r: &mut Rng| {
            let mut p = Vec::new();
            for _ in 0..1 + r.below(4) {
                let mut c: Vec<u8> = (0..1 + r.below(8)).map(|_| (r.next() as u8).max(1)).filter(|&b| b != b'/').collect();
                if c.is_empty() || c == b"." || c == b".." {
                    c = b"x".to_vec();
                }
                p.push(b'/');
                p.extend(c);
            }
            p
        };
        let (path, to, flag) = (fs_path(r), fs_path(r), r.chance(2));
        let (depth, max) = (1 + r.below(1000) as u32, 1 + r.below(MAX_LIST_ENTRIES as usize) as u32);
        let mode = r.next() as u32;
        let got = FsStat::parse(&noise(r, FieldWriter::new().bytes(1, &path)).u8(2, flag as u8).finish()).map_err(|e| format!("{e}"))?;
        if got != (FsStat { path: path.clone(), follow: flag }) {
            return Err(format!("FsStat: {got:?}"));
        }
        let got = FsList::parse(&noise(r, FieldWriter::new().u32(2, depth)).bytes(1, &path).u32(3, max).finish()).map_err(|e| format!("{e}"))?;
        if got != (FsList { path: path.clone(), depth, max_entries: max as u64 }) {
            return Err(format!("FsList: {got:?}"));
        }
        let got = FsMkdir::parse(&noise(r, FieldWriter::new().bytes(1, &path)).u32(2, mode).u8(3, flag as u8).u32(4, 7).u32(5, 8).finish()).map_err(|e| format!("{e}"))?;
        if got != (FsMkdir { path: path.clone(), mode: mode & 0o7777, parents: flag, uid: Some(7), gid: Some(8) }) {
            return Err(format!("FsMkdir: {got:?}"));
        }
        let got = FsRename::parse(&noise(r, FieldWriter::new().bytes(2, &to)).bytes(1, &path).finish()).map_err(|e| format!("{e}"))?;
        if got != (FsRename { from: path.clone(), to }) {
            return Err(format!("FsRename: {got:?}"));
        }
        let got = PathRecursive::parse(&noise(r, FieldWriter::new().bytes(1, &path)).u8(2, flag as u8).finish(), false).map_err(|e| format!("{e}"))?;
        if got != (PathRecursive { path, recursive: flag }) {
            return Err(format!("PathRecursive: {got:?}"));
        }
        Ok(())
    });
    assert!(n > 100, "only {n} cases ran");
}

/// The allocation bound is measured, not assumed: a decoder that copies its input (EXEC's
/// argv) is seen allocating, and one over the bound fails.
#[test]
fn allocation_is_measured() {
    let p = FieldWriter::new().bytes(1, &[b'a'; 100_000]).finish();
    alloc_count::reset();
    let e = Exec::parse(&p).unwrap();
    assert!(alloc_count::peak() >= 100_000, "peak {}", alloc_count::peak());
    drop(e);
    assert!(bounded("copy", &[0u8; 10], |_| vec![0u8; 1 << 20]).is_err());
    assert!(bounded("small", &[0u8; 10], |_| vec![0u8; 100]).is_ok());
}
