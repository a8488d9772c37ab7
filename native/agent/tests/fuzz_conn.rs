//! Fuzzing of the agent's connection handling (framing, HELLO, streams, flow control, signals:
//! `conn.rs` and the streams behind it) through the real binary in `--serve-unix` mode, for a
//! fixed time budget. Each case opens a connection, sends a random sequence of frames (a HELLO,
//! EXECs of harmless programs, DATA, WINDOW, SIGNAL, RESIZE, CANCEL, PING, unknown types),
//! mutated at the byte level and written in random pieces, then closes it. After every case the
//! agent must still be running and answer a PING on a new connection, and everything it sent
//! must be well-formed and within the windows it was given; at the end, none of its children
//! may be left and its descriptors and memory must be where they started.
//!
//! The agent runs on the host here (as the test user): a mutation that would make a frame one
//! that touches the host (a WRITE_FILE, READ_FILE, TCP_CONNECT, SPAWN_BENCH, WORKLOAD_*,
//! SHUTDOWN, or an EXEC of anything but the allow-listed programs) has its type byte replaced
//! by an unknown one before sending; its decoders get those payloads in `src/fuzz.rs`.
//!
//! The FS_* requests are let through only when every path they name is inside the case's
//! sandbox directory (literally: below it, without a `..` component); the sandbox holds a few
//! directories, files and a symlink within it, and the fuzzer makes, lists, renames, removes
//! and watches there.
//!
//! PROXY_LISTEN is let through only for an address of 127.77.0.0/16 (the case's own, so it
//! cannot take a port another program on the host uses); while a case runs, guest clients
//! connect there, write, and close or reset, so PROXY_CONN streams meet the random frames
//! (ids from 2^31 are among the targets).
//!
//! A failure prints its seed and case: `SM_FUZZ_SEED=<seed> SM_FUZZ_CASE=<case> cargo test
//! --test fuzz_conn` replays it. `SM_FUZZ_SEED=random` explores; `SM_FUZZ_BUDGET_SCALE=4` runs
//! four times longer.

// Raw socket calls go through common::sock, the only module allowed `unsafe`.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;
/// What a forbidden frame becomes: a type no version defines.
const NEUTERED: u8 = 0x7f;
const MAX_PAYLOAD: usize = 1 << 20;
const INITIAL_WINDOW: u64 = 262_144;
/// The only programs an EXEC may name (absolute, so no PATH the fuzzer writes matters).
const ALLOWED: &[&[u8]] = &[b"/bin/cat", b"/bin/true", b"/bin/echo", b"/bin/sleep"];
const DEFAULT_SEED: u64 = 0x5eed_0010;

struct Rng(u64);

impl Rng {
    fn new(seed: u64, case: u64) -> Rng {
        let mut r = Rng(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}


fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[ty, flags, 0, 0]);
    out.extend_from_slice(&stream.to_le_bytes());
    out.extend_from_slice(payload);
}

struct Frame {
    ty: u8,
    flags: u8,
    stream: u32,
    reserved: [u8; 2],
    /// Offset of the frame in its stream.
    at: usize,
    payload: Vec<u8>,
}

/// Frames of a byte stream as PROTOCOL.md defines them, up to the end or a header announcing
/// more than MAX_PAYLOAD (`true`: the stream breaks there).
fn frames(b: &[u8]) -> (Vec<Frame>, bool) {
    let mut out = Vec::new();
    let mut off = 0;
    while b.len() - off >= 12 {
        let len = u32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as usize;
        if len > MAX_PAYLOAD {
            return (out, true);
        }
        if b.len() - off - 12 < len {
            break;
        }
        out.push(Frame {
            ty: b[off + 4],
            flags: b[off + 5],
            reserved: [b[off + 6], b[off + 7]],
            stream: u32::from_le_bytes(b[off + 8..off + 12].try_into().unwrap()),
            at: off,
            payload: b[off + 12..off + 12 + len].to_vec(),
        });
        off += 12 + len;
    }
    (out, false)
}

/// Field values by tag, in order; None if truncated.
fn fields(p: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < p.len() {
        if p.len() - off < 5 {
            return None;
        }
        let len = u32::from_le_bytes(p[off + 1..off + 5].try_into().unwrap()) as usize;
        if p.len() - off - 5 < len {
            return None;
        }
        out.push((p[off], &p[off + 5..off + 5 + len]));
        off += 5 + len;
    }
    Some(out)
}

/// An EXEC the harness lets through: its fields parse, and argv[0] and the chain's argv[0]
/// (when there is a chain) are allow-listed programs.
fn exec_allowed(payload: &[u8]) -> bool {
    let Some(fs) = fields(payload) else { return false };
    let first = |tag| fs.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v);
    first(1).is_some_and(|a| ALLOWED.contains(&a)) && first(11).is_none_or(|c| ALLOWED.contains(&c))
}

/// A PROXY_LISTEN the harness lets through: every `addr` field is in 127.77.0.0/16, and there
/// is one (the default, 127.0.0.1, is the host's own).
fn proxy_allowed(payload: &[u8]) -> bool {
    let Some(fs) = fields(payload) else { return false };
    let addrs: Vec<&[u8]> = fs.iter().filter(|(t, _)| *t == 2).map(|(_, v)| *v).collect();
    let ours = |a: &[u8]| std::str::from_utf8(a).ok().and_then(|a| a.parse::<std::net::Ipv4Addr>().ok()).is_some_and(|ip| ip.octets()[..2] == [127, 77]);
    !addrs.is_empty() && addrs.iter().all(|a| ours(a))
}

/// Where FS_* requests may act: a directory of the test's own.
fn sandbox() -> PathBuf {
    std::env::temp_dir().join(format!("sm-agent-fuzz-{}", std::process::id())).join("fs")
}

/// An FS_* request the harness lets through: its fields parse, and every path field (tag 1,
/// and FS_RENAME's tag 2) is below the sandbox, without a `..` component.
fn fs_allowed(ty: u8, payload: &[u8]) -> bool {
    let Some(fs) = fields(payload) else { return false };
    let root = sandbox();
    let root = root.to_str().unwrap().as_bytes();
    let inside = |p: &[u8]| p.len() > root.len() + 1 && p.starts_with(root) && p[root.len()] == b'/' && !p.split(|&c| c == b'/').any(|c| c == b"..");
    fs.iter().filter(|(t, _)| *t == 1 || (ty == FS_RENAME && *t == 2)).all(|(_, v)| inside(v))
}

/// Rewrites the type of every frame that would touch the host into an unknown one.
fn neuter(wire: &mut [u8]) {
    for f in frames(wire).0 {
        let forbidden = match f.ty {
            EXEC => !exec_allowed(&f.payload),
            PROXY_LISTEN => !proxy_allowed(&f.payload),
            FS_STAT | FS_LIST | FS_MKDIR | FS_RENAME | FS_REMOVE | FS_WATCH => !fs_allowed(f.ty, &f.payload),
            WRITE_FILE | READ_FILE | SPAWN_BENCH | TCP_CONNECT | WORKLOAD_START | WORKLOAD_SIGNAL | SHUTDOWN => true,
            _ => false,
        };
        if forbidden {
            wire[f.at + 4] = NEUTERED;
        }
    }
}

fn exec_payload(r: &mut Rng) -> Vec<u8> {
    let mut f = Fields::default().bytes(1, r.pick(ALLOWED));
    for _ in 0..r.below(3) {
        let arg: Vec<u8> = match r.below(3) {
            0 => r.pick(&[&b"0.01"[..], b"0.2", b"-n", b"--", b"x"]).to_vec(),
            _ => {
                let n = r.below(12);
                r.bytes(n)
            }
        };
        f = f.bytes(1, &arg);
    }
    for _ in 0..r.below(3) {
        let n = r.below(20);
        let e = if r.chance(2) { b"PATH=/nonexistent".to_vec() } else { r.bytes(n) };
        f = f.bytes(2, &e);
    }
    if r.chance(3) {
        let n = r.below(10);
        let cwd = if r.chance(2) { r.pick(&[&b"/"[..], b"/tmp", b"/nonexistent", b"rel"]).to_vec() } else { r.bytes(n) };
        f = f.bytes(3, &cwd);
    }
    if r.chance(2) {
        f = f.bytes(4, &[0u64, 1, 50, 2_000, r.next()][r.below(5)].to_le_bytes());
    }
    if r.chance(4) {
        f = f.bytes(5, &[0u32, 65534, r.next() as u32][r.below(3)].to_le_bytes());
    }
    if r.chance(2) {
        f = f.bytes(7, &[r.below(3) as u8]);
    }
    if r.chance(3) {
        f = f.bytes(8, &[r.below(3) as u8]).bytes(9, &(r.next() as u16).to_le_bytes()).bytes(10, &(r.next() as u16).to_le_bytes());
    }
    if r.chance(4) {
        f = f.bytes(11, r.pick(ALLOWED));
    }
    if r.chance(5) {
        let n = r.below(30);
        f = f.bytes(r.next() as u8, &r.bytes(n));
    }
    f.0
}

/// A path in the sandbox: mostly one of a few names, so requests meet each other's files.
fn fs_path(r: &mut Rng) -> Vec<u8> {
    let root = sandbox().to_str().unwrap().as_bytes().to_vec();
    let rel: &[u8] = r.pick(&[&b"a"[..], b"a/b", b"a/b/c", b"d", b"d/e", b"f", b"link", b"link/x", b"n/m", b"a/./b", b"a//b", b"a/"]);
    [root, b"/".to_vec(), rel.to_vec()].concat()
}

/// One FS_* request on sandbox paths, with its flags and numbers now and then out of range.
fn fs_frame(r: &mut Rng) -> (u8, Vec<u8>) {
    let ty = r.pick(&[FS_STAT, FS_LIST, FS_MKDIR, FS_RENAME, FS_REMOVE, FS_WATCH]);
    let mut f = Fields::default().bytes(1, &fs_path(r));
    let flag = |r: &mut Rng| [0u8, 1, 1, 2][r.below(4)];
    f = match ty {
        FS_STAT | FS_REMOVE | FS_WATCH => f.bytes(2, &[flag(r)]),
        FS_LIST => f.bytes(2, &[0u32, 1, 2, 9][r.below(4)].to_le_bytes()).bytes(3, &[0u32, 1, 3, 200_000][r.below(4)].to_le_bytes()),
        FS_MKDIR => f.bytes(2, &[0o755u32, 0o7777, r.next() as u32][r.below(3)].to_le_bytes()).bytes(3, &[flag(r)]),
        _ => f.bytes(2, &fs_path(r)),
    };
    (ty, f.0)
}

/// A PROXY_LISTEN on the case's address, with a few env entries and a small `max_streams`.
fn proxy_listen_payload(r: &mut Rng, at: SocketAddr) -> Vec<u8> {
    let mut f = Fields::default().bytes(1, &at.port().to_le_bytes()).bytes(2, at.ip().to_string().as_bytes());
    for _ in 0..r.below(3) {
        let e: &[u8] = r.pick(&[&b"http_proxy=http://127.77.0.1:3128"[..], b"PATH=/nonexistent", b"K=", b"=bad", b"bad"]);
        f = f.bytes(3, e);
    }
    if r.chance(2) {
        f = f.bytes(4, &[0u32, 1, 2, 4097, r.next() as u32][r.below(5)].to_le_bytes());
    }
    f.0
}

/// One case's byte stream: usually a HELLO first, then a mix of frames on stream ids 0-8 (and
/// now and then the agent's, from 2^31); with `proxy`, a PROXY_LISTEN there early on.
fn case_wire(r: &mut Rng, proxy: Option<SocketAddr>) -> Vec<u8> {
    let mut w = Vec::new();
    if !r.chance(8) {
        // The protocol's version (PROTOCOL.md), now and then an older one the agent refuses.
        let version = if r.chance(10) { 1u16 } else { 5 };
        frame(&mut w, HELLO, 0, 0, &Fields::default().bytes(1, &version.to_le_bytes()).bytes(2, &5u16.to_le_bytes()).0);
    }
    let mut execs = 0;
    if let Some(at) = proxy {
        let p = proxy_listen_payload(r, at);
        frame(&mut w, PROXY_LISTEN, 0, 1 + r.below(8) as u32, &p);
    }
    for _ in 0..r.below(16) {
        let stream = match r.below(10) {
            0 => r.next() as u32,
            1 if proxy.is_some() => (1 << 31) + r.below(4) as u32,
            _ => r.below(9) as u32,
        };
        match r.below(15) {
            13 | 14 => {
                let (ty, p) = fs_frame(r);
                frame(&mut w, ty, 0, stream, &p);
            }
            12 if proxy.is_some() => {
                let p = if r.chance(3) { Vec::new() } else { proxy_listen_payload(r, proxy.unwrap()) };
                frame(&mut w, if p.is_empty() { PROXY_STOP } else { PROXY_LISTEN }, 0, stream, &p);
            }
            0 | 1 if execs < 3 => {
                execs += 1;
                let p = exec_payload(r);
                frame(&mut w, EXEC, 0, stream, &p);
            }
            2 | 3 => {
                let n = match r.below(8) {
                    0 => 70_000 + r.below(300_000),
                    _ => r.below(200),
                };
                let flags = (r.below(4) as u8) | if r.chance(4) { 0x80 } else { 0 };
                let p = r.bytes(n);
                frame(&mut w, DATA, flags, stream, &p);
            }
            4 => {
                let inc = [0u32, 1, 65_536, u32::MAX, r.next() as u32][r.below(5)];
                let p = if r.chance(8) { r.bytes(3) } else { inc.to_le_bytes().to_vec() };
                frame(&mut w, WINDOW, r.below(4) as u8, stream, &p);
            }
            5 => {
                let signum = [0u32, 1, 2, 9, 15, 18, 19, 28, 64, 65, r.next() as u32][r.below(11)];
                frame(&mut w, SIGNAL, 0, stream, &Fields::default().bytes(1, &signum.to_le_bytes()).bytes(2, &[r.below(3) as u8]).0);
            }
            6 => {
                let (c, rw) = (r.next() as u16, r.next() as u16);
                frame(&mut w, RESIZE, 0, stream, &Fields::default().bytes(1, &c.to_le_bytes()).bytes(2, &rw.to_le_bytes()).0);
            }
            7 => frame(&mut w, CANCEL, 0, stream, &[]),
            8 => {
                let n = [0, 8, 4096, 5000][r.below(4)];
                let p = r.bytes(n);
                frame(&mut w, PING, 0, stream, &p);
            }
            9 => {
                let n = r.below(64);
                let p = r.bytes(n);
                frame(&mut w, HELLO, 0, stream, &p);
            }
            _ => {
                let ty = r.next() as u8;
                let n = r.below(64);
                let p = r.bytes(n);
                frame(&mut w, ty, r.next() as u8, stream, &p);
            }
        }
    }
    if r.chance(2) {
        mutate(r, &mut w);
    }
    neuter(&mut w);
    w
}

fn mutate(r: &mut Rng, b: &mut Vec<u8>) {
    for _ in 0..1 + r.below(3) {
        if b.is_empty() {
            return;
        }
        let i = r.below(b.len());
        match r.below(6) {
            0 => b[i] ^= 1 << r.below(8),
            1 => b[i] = r.next() as u8,
            2 if i + 4 <= b.len() => {
                let v = [0, 4, MAX_PAYLOAD as u32, MAX_PAYLOAD as u32 + 1, u32::MAX][r.below(5)];
                b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 => b.truncate(i),
            4 => {
                let n = 1 + r.below(16);
                let ins = r.bytes(n);
                b.splice(i..i, ins);
            }
            _ => {
                let end = (i + 1 + r.below(16)).min(b.len());
                b.drain(i..end);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent and its process

struct Agent {
    child: Child,
    sock: PathBuf,
    dir: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        let dir = std::env::temp_dir().join(format!("sm-agent-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        // The FS_* requests' playground: directories, a file, a symlink within it.
        let fs = sandbox();
        std::fs::create_dir_all(fs.join("a/b")).unwrap();
        std::fs::create_dir_all(fs.join("d")).unwrap();
        std::fs::write(fs.join("f"), b"file").unwrap();
        std::os::unix::fs::symlink(fs.join("a"), fs.join("link")).unwrap();
        let bin = std::env::var_os("SUPERMACHINE_AGENT_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_supermachine-agent")));
        let child = Command::new(bin).arg("--serve-unix").arg(&sock).stdin(Stdio::null()).stderr(Stdio::null()).spawn().expect("start agent");
        let start = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            assert!(start.elapsed() < Duration::from_secs(5), "agent socket did not appear");
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent { child, sock, dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new connection: HELLO, then a PING answered within 5 s.
    fn healthy(&self) -> Result<(), String> {
        let mut s = UnixStream::connect(&self.sock).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut w = Vec::new();
        frame(&mut w, HELLO, 0, 0, &Fields::default().bytes(1, &5u16.to_le_bytes()).bytes(2, &5u16.to_le_bytes()).0);
        frame(&mut w, PING, 0, 7, b"alive?");
        s.write_all(&w).map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let (fs, _) = frames(&buf);
            if fs.iter().any(|f| f.ty == PONG && f.stream == 7 && f.payload == b"alive?") {
                return Ok(());
            }
            match s.read(&mut chunk) {
                Ok(0) => return Err("connection closed before PONG".into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("no PONG within 5 s: {e}")),
            }
        }
    }

    fn children(&self) -> Vec<u32> {
        let me = self.pid();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // ppid is the second field after the parenthesised command name.
            let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { continue };
            if rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(me) {
                out.push(pid);
            }
        }
        out
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }

    fn status(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches(" kB").parse().ok()).unwrap_or(0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Checks what the agent sent on one connection: well-formed frames of agent → host types,
/// nothing after GOAWAY, DATA within the windows it was given. Returns how many PROXY_CONN
/// streams it opened.
fn check_replies(sent: &[u8], received: &[u8]) -> Result<usize, String> {
    let (fs, broken) = frames(received);
    if broken {
        return Err("the agent sent a header over MAX_PAYLOAD".into());
    }
    let mut opens: HashMap<u32, u64> = HashMap::new();
    let mut credit: HashMap<(u32, u8), u64> = HashMap::new();
    for f in &fs {
        if f.ty == PROXY_CONN {
            if f.stream < 1 << 31 {
                return Err(format!("PROXY_CONN on host id {}", f.stream));
            }
            *opens.entry(f.stream).or_default() += 1;
        }
    }
    for f in frames(sent).0 {
        match f.ty {
            EXEC | FS_LIST | FS_WATCH => *opens.entry(f.stream).or_default() += 1,
            WINDOW if f.payload.len() == 4 => {
                *credit.entry((f.stream, f.flags & 3)).or_default() += u32::from_le_bytes(f.payload[..].try_into().unwrap()) as u64
            }
            _ => {}
        }
    }
    let mut data: HashMap<(u32, u8), u64> = HashMap::new();
    let mut goaway = false;
    for f in &fs {
        if goaway {
            return Err(format!("frame {:#x} after GOAWAY", f.ty));
        }
        if f.reserved != [0, 0] {
            return Err("reserved bytes not 0".into());
        }
        match f.ty {
            HELLO_OK | PONG | STARTED | EXIT | STREAM_ERROR | OK | WINDOW | PROXY_CONN => {}
            GOAWAY => goaway = true,
            DATA => {
                let ch = f.flags & 3;
                if !(ch == 1 || ch == 2) || f.payload.len() > 65_536 {
                    return Err(format!("DATA on channel {ch} of {} bytes", f.payload.len()));
                }
                let d = data.entry((f.stream, ch)).or_default();
                *d += f.payload.len() as u64;
                let allowed = INITIAL_WINDOW * opens.get(&f.stream).copied().unwrap_or(0) + credit.get(&(f.stream, ch)).copied().unwrap_or(0);
                if *d > allowed {
                    return Err(format!("stream {} channel {ch}: {d} bytes sent, {allowed} allowed", f.stream));
                }
            }
            other => return Err(format!("the agent sent type {other:#x}")),
        }
    }
    Ok(fs.iter().filter(|f| f.ty == PROXY_CONN).count())
}

/// One case: a connection that gets `wire` in random pieces and is then closed. Returns how
/// many PROXY_CONN streams the agent opened.
fn run_case(agent: &Agent, r: &mut Rng) -> Result<usize, String> {
    let proxy = r.chance(3).then(|| SocketAddr::from(([127, 77, r.below(256) as u8, 1 + r.below(254) as u8], 20_000 + r.below(40_000) as u16)));
    let wire = case_wire(r, proxy);
    let clients = proxy.map(|at| guest_clients(at, r.next()));
    let s = UnixStream::connect(&agent.sock).map_err(|e| format!("connect: {e}"))?;
    let mut reader = s.try_clone().unwrap();
    reader.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let reading = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 65536];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
                Err(e) => return Err(format!("the agent did not close the connection within 10 s of ours: {e}")),
            }
        }
    });
    let mut w = &s;
    let mut off = 0;
    while off < wire.len() {
        let n = if r.chance(3) { 1 + r.below(13) } else { 1 + r.below(70_000) };
        let end = (off + n).min(wire.len());
        // The agent may close first (GOAWAY): a broken pipe ends the case.
        if w.write_all(&wire[off..end]).is_err() {
            break;
        }
        off = end;
    }
    if r.chance(4) {
        // Give processes a moment to run, signals to land.
        std::thread::sleep(Duration::from_millis(r.below(30) as u64));
    }
    if let Some(c) = clients {
        c.join().map_err(|_| "guest clients panicked".to_string())?;
    }
    let _ = s.shutdown(Shutdown::Write);
    let received = reading.join().map_err(|_| "reader panicked".to_string())??;
    let proxied = check_replies(&wire, &received)?;
    if let Ok(Some(status)) = agent.child.try_wait_ref() {
        return Err(format!("the agent exited: {status}"));
    }
    agent.healthy().map(|()| proxied)
}

/// Guest clients of the proxy listener at `at` (if it listens by then): each connects, writes a
/// little or a lot, and closes, half-closes and reads, or resets. Bounded: about 2 s at most.
fn guest_clients(at: SocketAddr, seed: u64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = Rng::new(seed, 0);
        for _ in 0..1 + r.below(4) {
            std::thread::sleep(Duration::from_millis(r.below(40) as u64));
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&at, Duration::from_millis(200)) else { continue };
            let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let n = if r.chance(4) { 300_000 + r.below(300_000) } else { r.below(2000) };
            let _ = s.write_all(&r.bytes(n));
            match r.below(3) {
                0 => {
                    let _ = s.shutdown(Shutdown::Write);
                    let _ = s.read(&mut [0u8; 4096]);
                }
                1 => {
                    let _ = sock::set_linger_reset(&s);
                }
                _ => {}
            }
        }
    })
}

trait TryWaitRef {
    fn try_wait_ref(&self) -> std::io::Result<Option<String>>;
}

impl TryWaitRef for Child {
    /// Whether the process is gone, without reaping it (`try_wait` needs `&mut`).
    fn try_wait_ref(&self) -> std::io::Result<Option<String>> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.id()))?;
        let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
        Ok(matches!(state, Some('Z') | Some('X')).then(|| format!("state {state:?}")))
    }
}

#[test]
fn fuzz_connection() {
    let seed = match std::env::var("SM_FUZZ_SEED").ok().as_deref() {
        Some("random") => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
        Some(s) => s.parse().expect("SM_FUZZ_SEED must be a number or \"random\""),
        None => DEFAULT_SEED,
    };
    let only: Option<u64> = std::env::var("SM_FUZZ_CASE").ok().map(|c| c.parse().unwrap());
    let scale: u64 = std::env::var("SM_FUZZ_BUDGET_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let until = Instant::now() + Duration::from_millis(9_000 * scale);

    let agent = Agent::start();
    agent.healthy().unwrap();
    let fds0 = agent.fds();
    let mut cases = 0u64;
    let mut proxied = 0;
    loop {
        let id = only.unwrap_or(cases);
        let mut r = Rng::new(seed, id);
        match run_case(&agent, &mut r) {
            Ok(n) => proxied += n,
            Err(msg) => panic!("fuzz_connection: case {id} failed: {msg}\nreplay: SM_FUZZ_SEED={seed} SM_FUZZ_CASE={id} cargo test --test fuzz_conn"),
        }
        cases += 1;
        if only.is_some() || Instant::now() >= until {
            break;
        }
    }
    // Every process a closed connection started is killed and reaped.
    let start = Instant::now();
    while !agent.children().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "children left after {cases} cases (seed {seed}): {:?}", agent.children());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The last case's connection may still be closing on the agent's side: give it a moment
    // (a leak stays).
    let start = Instant::now();
    let mut fds = agent.fds();
    while fds > fds0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        fds = agent.fds();
    }
    let hwm = agent.status("VmHWM:");
    eprintln!("fuzz_connection: {cases} cases (seed {seed}), {proxied} PROXY_CONN streams; agent fds {fds0} -> {fds}, peak RSS {hwm} kB");
    assert!(only.is_some() || cases >= 20, "only {cases} cases ran");
    assert!(only.is_some() || proxied > 0, "no case got as far as a PROXY_CONN stream in {cases} cases");
    assert!(fds <= fds0, "the agent holds {fds} descriptors, {fds0} before (seed {seed})");
    // A frame buffer (1 MiB), output queues and windows: far under this.
    assert!(hwm < 64 * 1024, "agent peak RSS {hwm} kB (seed {seed})");
}
