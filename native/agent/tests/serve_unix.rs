//! Drives the real agent binary in `--serve-unix` mode with an independent client written
//! straight from PROTOCOL.md.

// Raw socket calls go through common::sock, the only module allowed `unsafe`.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;
const INITIAL_WINDOW: i64 = 262_144;

struct Agent {
    child: Child,
    sock: PathBuf,
    dir: PathBuf,
}

impl Agent {
    fn start(name: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!("sm-agent-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        // SUPERMACHINE_AGENT_BIN runs the suite against another build (e.g. the static release one).
        let bin = std::env::var_os("SUPERMACHINE_AGENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_supermachine-agent")));
        let child = Command::new(bin)
            .arg("--serve-unix")
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("start agent");
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(5), "agent socket did not appear");
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent { child, sock, dir }
    }

    fn connect(&self) -> Client {
        // The socket file appears at bind(), a moment before listen(): retry a refusal.
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && start.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("connect: {e}"),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Client { s, buf: Vec::new(), next_id: 1, credit: HashMap::new(), auto_credit: true }
    }

    fn hello(&self) -> Client {
        let mut c = self.connect();
        c.send(HELLO, 0, 0, &Fields::new().u16(1, 5).u16(2, 5).u64(3, 0).finish());
        let f = c.recv();
        assert_eq!(f.ty, HELLO_OK);
        c
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}


fn parse_fields(p: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let tag = p[i];
        let len = u32::from_le_bytes(p[i + 1..i + 5].try_into().unwrap()) as usize;
        out.push((tag, p[i + 5..i + 5 + len].to_vec()));
        i += 5 + len;
    }
    assert_eq!(i, p.len(), "fields overrun the payload");
    out
}

fn field(fs: &[(u8, Vec<u8>)], tag: u8) -> &[u8] {
    &fs.iter().find(|(t, _)| *t == tag).unwrap_or_else(|| panic!("missing field {tag}")).1
}

fn fu64(fs: &[(u8, Vec<u8>)], tag: u8) -> u64 {
    u64::from_le_bytes(field(fs, tag).try_into().unwrap())
}

fn fu32(fs: &[(u8, Vec<u8>)], tag: u8) -> u32 {
    u32::from_le_bytes(field(fs, tag).try_into().unwrap())
}

#[derive(Debug)]
struct Frame {
    ty: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

struct Client {
    s: UnixStream,
    buf: Vec<u8>,
    next_id: u32,
    /// (stream, channel) → credit the agent still has; checked on every DATA.
    credit: HashMap<(u32, u8), i64>,
    /// Return credit for every DATA at once (off: the host stops reading).
    auto_credit: bool,
}

#[derive(Default, Debug)]
struct Outcome {
    started: bool,
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    eof: [bool; 2],
    exit: Option<Vec<(u8, Vec<u8>)>>,
    ok: Option<Vec<(u8, Vec<u8>)>>,
    error: Option<(u32, String)>,
    /// STREAM_ERROR errno (field 3), when sent.
    errno: Option<u32>,
    /// PROXY_CONN's `peer_port`: the agent opened this stream.
    proxy_peer: Option<u16>,
}

impl Outcome {
    fn code(&self) -> i32 {
        i32::from_le_bytes(field(self.exit.as_ref().unwrap(), 1).try_into().unwrap())
    }
    fn exit_u32(&self, tag: u8) -> u32 {
        fu32(self.exit.as_ref().unwrap(), tag)
    }
    fn timed_out(&self) -> u8 {
        field(self.exit.as_ref().unwrap(), 3)[0]
    }
    fn step(&self) -> u8 {
        field(self.exit.as_ref().unwrap(), 6)[0]
    }
    fn done(&self) -> bool {
        self.exit.is_some() || self.ok.is_some() || self.error.is_some()
    }
}

impl Client {
    fn send(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut f = Vec::with_capacity(12 + payload.len());
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&[ty, flags, 0, 0]);
        f.extend_from_slice(&stream.to_le_bytes());
        f.extend_from_slice(payload);
        self.s.write_all(&f).unwrap();
    }

    /// The next frame, or None if none arrives within `timeout`.
    fn try_recv(&mut self, timeout: Duration) -> Option<Frame> {
        self.s.set_read_timeout(Some(timeout)).unwrap();
        let mut chunk = [0u8; 65536];
        let r = if self.buf.len() >= 12 { Ok(None) } else { self.s.read(&mut chunk).map(Some) };
        self.s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        match r {
            Ok(Some(n)) => {
                assert!(n > 0, "agent closed the connection");
                self.buf.extend_from_slice(&chunk[..n]);
                Some(self.recv())
            }
            Ok(None) => Some(self.recv()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(e) => panic!("read from agent: {e}"),
        }
    }

    fn recv(&mut self) -> Frame {
        loop {
            if self.buf.len() >= 12 {
                let len = u32::from_le_bytes(self.buf[0..4].try_into().unwrap()) as usize;
                assert!(len <= 1 << 20);
                if self.buf.len() >= 12 + len {
                    let f = Frame {
                        ty: self.buf[4],
                        flags: self.buf[5],
                        stream: u32::from_le_bytes(self.buf[8..12].try_into().unwrap()),
                        payload: self.buf[12..12 + len].to_vec(),
                    };
                    assert_eq!(&self.buf[6..8], &[0, 0], "reserved must be 0");
                    self.buf.drain(..12 + len);
                    return f;
                }
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("read from agent");
            assert!(n > 0, "agent closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.credit.insert((id, 1), INITIAL_WINDOW);
        self.credit.insert((id, 2), INITIAL_WINDOW);
        id
    }

    fn exec(&mut self, argv: &[&str], extra: Fields) -> u32 {
        let id = self.id();
        let mut f = Fields::new();
        for a in argv {
            f = f.bytes(1, a.as_bytes());
        }
        f = f.bytes(2, b"PATH=/usr/local/bin:/usr/bin:/bin");
        f.0.extend_from_slice(&extra.0);
        self.send(EXEC, 0, id, &f.0);
        id
    }

    /// Handles one frame into `outcomes`; returns WINDOW credit granted for stdin (stream, n).
    fn pump(&mut self, outcomes: &mut HashMap<u32, Outcome>) -> Option<(u32, u32)> {
        let f = self.recv();
        let o = outcomes.entry(f.stream).or_default();
        assert!(!o.done(), "frame {:?} after the terminal message", f.ty);
        match f.ty {
            PROXY_CONN => {
                assert!(f.stream >= 1 << 31, "PROXY_CONN on host id {}", f.stream);
                assert!(o.proxy_peer.is_none() && !o.started && o.stdout.is_empty(), "PROXY_CONN on an open stream");
                let fs = parse_fields(&f.payload);
                o.proxy_peer = Some(u16::from_le_bytes(field(&fs, 1).try_into().unwrap()));
            }
            STARTED => {
                assert!(!o.started, "STARTED twice");
                o.started = true;
                o.pid = parse_fields(&f.payload).iter().find(|(t, _)| *t == 1).map(|(_, v)| u32::from_le_bytes(v[..].try_into().unwrap()));
            }
            DATA => {
                let ch = f.flags & 3;
                assert!(ch == 1 || ch == 2, "bad channel");
                assert!(f.payload.len() <= 65536);
                assert!(!o.eof[ch as usize - 1], "DATA after EOF");
                let c = self.credit.entry((f.stream, ch)).or_insert(INITIAL_WINDOW);
                *c -= f.payload.len() as i64;
                assert!(*c >= 0, "agent overran the window");
                if ch == 1 { &mut o.stdout } else { &mut o.stderr }.extend_from_slice(&f.payload);
                if f.flags & EOF != 0 {
                    o.eof[ch as usize - 1] = true;
                } else if !f.payload.is_empty() && self.auto_credit {
                    *c += f.payload.len() as i64;
                    self.send(WINDOW, ch, f.stream, &(f.payload.len() as u32).to_le_bytes());
                }
            }
            EXIT => {
                assert!(o.eof[0] && o.eof[1], "EXIT before EOF on stdout and stderr");
                o.exit = Some(parse_fields(&f.payload));
            }
            OK => o.ok = Some(parse_fields(&f.payload)),
            STREAM_ERROR => {
                let fs = parse_fields(&f.payload);
                o.error = Some((fu32(&fs, 1), String::from_utf8_lossy(field(&fs, 2)).into_owned()));
                o.errno = fs.iter().find(|(t, _)| *t == 3).map(|(_, v)| u32::from_le_bytes(v[..].try_into().unwrap()));
            }
            WINDOW => {
                assert_eq!(f.flags & 3, 0);
                return Some((f.stream, u32::from_le_bytes(f.payload[..].try_into().unwrap())));
            }
            other => panic!("unexpected frame type {other:#x}"),
        }
        None
    }

    fn wait(&mut self, id: u32) -> Outcome {
        let mut outcomes = HashMap::new();
        while !outcomes.get(&id).is_some_and(Outcome::done) {
            self.pump(&mut outcomes);
        }
        outcomes.remove(&id).unwrap()
    }

    fn run(&mut self, argv: &[&str], extra: Fields) -> Outcome {
        let id = self.exec(argv, extra);
        self.wait(id)
    }
}

#[test]
fn hello_ping_and_frames_before_hello() {
    let agent = Agent::start("hello");
    let mut c = agent.connect();
    c.send(PING, 0, 9, b"ignored"); // before HELLO: ignored
    c.send(HELLO, 0, 0, &Fields::new().u16(1, 1).u16(2, 5).bytes(77, b"future field").finish());
    let f = c.recv();
    assert_eq!(f.ty, HELLO_OK);
    let fs = parse_fields(&f.payload);
    assert_eq!(field(&fs, 1), &5u16.to_le_bytes());
    // Development mode runs execs without cgroups: no `limits`, no default limits (tags 6, 7).
    assert_eq!(field(&fs, 4), b"exec,files,bench,tty,chain,tcp,workload,background,proxy,fs");
    assert!(!fs.iter().any(|(t, _)| *t == 6 || *t == 7));
    assert!(!fs.iter().any(|(t, _)| *t == 5), "no port name in development mode");
    assert!(!field(&fs, 2).is_empty());
    fu64(&fs, 3);
    c.send(PING, 0, 42, b"payload");
    let f = c.recv();
    assert_eq!((f.ty, f.stream, &f.payload[..]), (PONG, 42, &b"payload"[..]));
    // Version mismatch → GOAWAY VERSION, then the connection closes; a new one works.
    c.send(HELLO, 0, 0, &Fields::new().u16(1, 6).u16(2, 7).finish());
    let f = c.recv();
    assert_eq!(f.ty, GOAWAY);
    assert_eq!(fu32(&parse_fields(&f.payload), 1), 7);
    let mut c = agent.hello();
    assert_eq!(c.run(&["true"], Fields::new()).code(), 0);
    // Version 4 only (a host from before version 5), or 3 → GOAWAY VERSION too.
    for v in [4u16, 3] {
        let mut old = agent.connect();
        old.send(HELLO, 0, 0, &Fields::new().u16(1, v).u16(2, v).finish());
        let f = old.recv();
        assert_eq!(f.ty, GOAWAY);
        assert_eq!(fu32(&parse_fields(&f.payload), 1), 7);
    }
}

#[test]
fn echo_exit_codes_and_signals() {
    let agent = Agent::start("echo");
    let mut c = agent.hello();
    let o = c.run(&["echo", "hi"], Fields::new());
    assert!(o.started);
    assert_eq!((o.stdout.as_slice(), o.stderr.as_slice(), o.code()), (&b"hi\n"[..], &b""[..], 0));
    let o = c.run(&["sh", "-c", "echo out; echo err >&2; exit 3"], Fields::new());
    assert_eq!((o.stdout.as_slice(), o.stderr.as_slice(), o.code()), (&b"out\n"[..], &b"err\n"[..], 3));
    let o = c.run(&["sh", "-c", "kill -9 $$"], Fields::new());
    assert_eq!((o.code(), o.exit_u32(2), o.timed_out()), (-1, 9, 0));
    assert_eq!(c.run(&["pwd"], Fields::new()).stdout, b"/\n");
    let o = c.run(&["pwd"], Fields::new().bytes(3, b"/tmp"));
    assert_eq!(o.stdout, b"/tmp\n");
    let o = c.run(&["sh", "-c", "echo $FOO"], Fields::new().bytes(2, b"FOO=bar"));
    assert_eq!(o.stdout, b"bar\n");
}

#[test]
fn start_failures() {
    let agent = Agent::start("fail");
    let mut c = agent.hello();
    let o = c.run(&["definitely-not-a-command"], Fields::new());
    assert!(!o.started);
    assert_eq!(o.code(), 127);
    assert_eq!(o.stderr, b"supermachine: definitely-not-a-command: command not found\n");
    let o = c.run(&["true"], Fields::new().bytes(3, b"/no/such/dir"));
    assert_eq!(o.code(), 126);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such/dir"), "{:?}", o.stderr);
    // Malformed request: wrong length for timeout_ms.
    let id = c.id();
    c.send(EXEC, 0, id, &Fields::new().bytes(1, b"true").bytes(4, &[1, 2]).finish());
    assert_eq!(c.wait(id).error.unwrap().0, 1);
    // Unknown message type on a stream.
    let id = c.id();
    c.send(0x7e, 0, id, &[]);
    assert_eq!(c.wait(id).error.unwrap().0, 6);
}

#[test]
fn timeout_and_cancel() {
    let agent = Agent::start("timeout");
    let mut c = agent.hello();
    let t = Instant::now();
    let o = c.run(&["sleep", "10"], Fields::new().u64(4, 300));
    assert!(t.elapsed() < Duration::from_secs(3), "timeout took {:?}", t.elapsed());
    assert_eq!((o.code(), o.exit_u32(2), o.timed_out()), (-1, 9, 1));
    let t = Instant::now();
    let id = c.exec(&["sleep", "10"], Fields::new());
    std::thread::sleep(Duration::from_millis(50));
    c.send(CANCEL, 0, id, &[]);
    let o = c.wait(id);
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!((o.code(), o.timed_out()), (-1, 0));
    // A background process holding the pipes open does not delay EXIT.
    let t = Instant::now();
    let o = c.run(&["sh", "-c", "echo fg; setsid sleep 5 & exit 0"], Fields::new());
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert_eq!((o.stdout.as_slice(), o.code()), (&b"fg\n"[..], 0));
}

#[test]
fn concurrent_execs() {
    let agent = Agent::start("concurrent");
    let mut c = agent.hello();
    let ids: Vec<u32> = (0..20).map(|i| c.exec(&["sh", "-c", &format!("sleep 0.1; echo {i}")], Fields::new())).collect();
    let mut outcomes = HashMap::new();
    while !ids.iter().all(|id| outcomes.get(id).is_some_and(Outcome::done)) {
        c.pump(&mut outcomes);
    }
    for (i, id) in ids.iter().enumerate() {
        let o = &outcomes[id];
        assert_eq!((o.stdout.clone(), o.code()), (format!("{i}\n").into_bytes(), 0));
    }
}

#[test]
fn stdin_to_cat_with_flow_control() {
    let agent = Agent::start("stdin");
    let mut c = agent.hello();
    let input: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let id = c.exec(&["cat"], Fields::new().u8(7, 1));
    let mut window = INITIAL_WINDOW;
    let mut sent = 0;
    let mut outcomes = HashMap::new();
    let mut eof_sent = false;
    while !outcomes.get(&id).is_some_and(Outcome::done) {
        while !eof_sent && window > 0 {
            let n = (input.len() - sent).min(65536).min(window as usize);
            let last = sent + n == input.len();
            c.send(DATA, if last { EOF } else { 0 }, id, &input[sent..sent + n]);
            sent += n;
            window -= n as i64;
            eof_sent = last;
        }
        if let Some((sid, inc)) = c.pump(&mut outcomes) {
            assert_eq!(sid, id);
            window += inc as i64;
        }
    }
    let o = &outcomes[&id];
    assert_eq!(o.code(), 0);
    assert!(o.stdout == input, "cat output differs ({} bytes)", o.stdout.len());
}

#[test]
fn large_output() {
    let agent = Agent::start("large");
    let mut c = agent.hello();
    let o = c.run(&["head", "-c", "5000000", "/dev/zero"], Fields::new());
    assert_eq!((o.stdout.len(), o.code()), (5_000_000, 0));
    assert!(o.stdout.iter().all(|&b| b == 0));
}

#[test]
fn write_then_read_file() {
    let agent = Agent::start("files");
    let mut c = agent.hello();
    let path = agent.dir.join("sub/dir/file.bin");
    let content: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
    let id = c.id();
    let req = Fields::new()
        .bytes(1, path.to_str().unwrap().as_bytes())
        .u32(2, 0o600)
        .u64(3, content.len() as u64)
        .finish();
    c.send(WRITE_FILE, 0, id, &req);
    let (mut window, mut sent) = (INITIAL_WINDOW, 0);
    let mut outcomes = HashMap::new();
    while !outcomes.get(&id).is_some_and(Outcome::done) {
        while sent < content.len() && window > 0 {
            let n = (content.len() - sent).min(65536).min(window as usize);
            let last = sent + n == content.len();
            c.send(DATA, if last { EOF } else { 0 }, id, &content[sent..sent + n]);
            sent += n;
            window -= n as i64;
        }
        if let Some((_, inc)) = c.pump(&mut outcomes) {
            window += inc as i64;
        }
    }
    let o = &outcomes[&id];
    assert!(o.error.is_none(), "{:?}", o.error);
    assert_eq!(fu64(o.ok.as_ref().unwrap(), 1), content.len() as u64);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(&path).unwrap(), content);

    let id = c.id();
    c.send(READ_FILE, 0, id, &Fields::new().bytes(1, path.to_str().unwrap().as_bytes()).finish());
    let o = c.wait(id);
    assert!(o.eof[0]);
    assert_eq!(fu64(o.ok.as_ref().unwrap(), 1), content.len() as u64);
    assert!(o.stdout == content);

    let id = c.id();
    c.send(READ_FILE, 0, id, &Fields::new().bytes(1, b"/no/such/file").finish());
    assert_eq!(c.wait(id).error.unwrap().0, 4);
    let id = c.id();
    c.send(READ_FILE, 0, id, &Fields::new().bytes(1, path.to_str().unwrap().as_bytes()).u64(2, 10).finish());
    assert_eq!(c.wait(id).error.unwrap().0, 5);
}

#[test]
fn spawn_bench_and_exec_rate() {
    let agent = Agent::start("bench");
    let mut c = agent.hello();
    let id = c.id();
    c.send(SPAWN_BENCH, 0, id, &Fields::new().bytes(1, b"/bin/true").u32(2, 20).finish());
    let o = c.wait(id);
    let samples = field(o.ok.as_ref().unwrap(), 2);
    assert_eq!(samples.len(), 20 * 8);
    let mut ns: Vec<u64> = samples.chunks(8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).collect();
    ns.sort();
    assert!(ns[0] > 0);
    let n = 50;
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(c.run(&["/bin/true"], Fields::new()).code(), 0);
    }
    eprintln!(
        "SPAWN_BENCH /bin/true median {} us; EXEC round trip /bin/true {} us",
        ns[10] / 1000,
        t.elapsed().as_micros() / n
    );
}

#[test]
fn background_requests_without_cgroups() {
    // Development mode runs execs without cgroups: nothing is tracked, both requests answer OK,
    // a malformed kill is BAD_REQUEST, and execs carry no exec id.
    let agent = Agent::start("background");
    let mut c = agent.hello();
    c.send(LIST_BACKGROUND, 0, 5, &[]);
    let f = c.recv();
    assert_eq!((f.ty, f.stream, f.payload.len()), (OK, 5, 0));
    c.send(KILL_BACKGROUND, 0, 6, &Fields::new().u8(2, 1).finish());
    let f = c.recv();
    assert_eq!((f.ty, f.stream), (OK, 6));
    assert_eq!(fu32(&parse_fields(&f.payload), 4), 0);
    c.send(KILL_BACKGROUND, 0, 7, &Fields::new().u8(1, 1).finish());
    let f = c.recv();
    assert_eq!((f.ty, f.stream), (STREAM_ERROR, 7));
    assert_eq!(fu32(&parse_fields(&f.payload), 1), 1);
    let id = c.exec(&["true"], Fields::new().u32(12, 5).u64(13, 1 << 20).u8(14, 1));
    let f = loop {
        let f = c.recv();
        if f.ty == STARTED && f.stream == id {
            break f;
        }
        assert_ne!(f.ty, EXIT, "no STARTED");
    };
    assert_eq!(parse_fields(&f.payload).len(), 1, "no exec_id without cgroups");
    assert_eq!(c.wait(id).code(), 0);
}

#[test]
fn garbage_gets_goaway_and_agent_survives() {
    let agent = Agent::start("garbage");
    let mut c = agent.hello();
    let mut bad = Vec::new();
    bad.extend_from_slice(&(2u32 << 20).to_le_bytes());
    bad.extend_from_slice(&[EXEC, 0, 0, 0, 1, 0, 0, 0]);
    c.s.write_all(&bad).unwrap();
    let f = c.recv();
    assert_eq!(f.ty, GOAWAY);
    assert_eq!(fu32(&parse_fields(&f.payload), 1), 8);
    let mut rest = Vec::new();
    assert_eq!(c.s.read_to_end(&mut rest).unwrap(), 0, "connection should close after GOAWAY");
    let mut c = agent.hello();
    assert_eq!(c.run(&["echo", "still alive"], Fields::new()).stdout, b"still alive\n");
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until the process is gone (killed and reaped by the agent).
fn wait_gone(pid: u32) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

impl Client {
    /// Pumps until the stream has sent STARTED; returns its pid.
    fn started_pid(&mut self, id: u32, outcomes: &mut HashMap<u32, Outcome>) -> u32 {
        while !outcomes.get(&id).is_some_and(|o| o.started) {
            assert!(!outcomes.get(&id).is_some_and(Outcome::done), "stream ended before STARTED");
            self.pump(outcomes);
        }
        outcomes[&id].pid.expect("STARTED carries the pid")
    }
}

#[test]
fn connections_are_independent() {
    let agent = Agent::start("conns");
    let mut a = agent.hello();
    let mut b = agent.hello();
    // The same stream id on both connections at once.
    let (mut oa, mut ob) = (HashMap::new(), HashMap::new());
    let ida = a.exec(&["sleep", "100"], Fields::new());
    let idb = b.exec(&["sleep", "100"], Fields::new());
    assert_eq!(ida, idb);
    let pa = a.started_pid(ida, &mut oa);
    let pb = b.started_pid(idb, &mut ob);
    assert_ne!(pa, pb);
    // Each connection answers its own PING and runs its own streams meanwhile.
    a.send(PING, 0, 77, b"a");
    b.send(PING, 0, 77, b"b");
    let (fa, fb) = (a.recv(), b.recv());
    assert_eq!((fa.ty, &fa.payload[..], fb.ty, &fb.payload[..]), (PONG, &b"a"[..], PONG, &b"b"[..]));
    assert_eq!(b.run(&["echo", "on b"], Fields::new()).stdout, b"on b\n");
    // Closing one connection kills only its processes.
    drop(a);
    assert!(wait_gone(pa), "the closed connection's process is still alive");
    assert!(alive(pb), "the other connection's process was killed");
    b.send(CANCEL, 0, idb, &[]);
    let o = b.wait(idb);
    assert_eq!((o.code(), o.exit_u32(2)), (-1, 9));
    assert!(wait_gone(pb));
}

#[test]
fn at_most_eight_connections() {
    let agent = Agent::start("eight");
    let mut open: Vec<Client> = (0..8).map(|_| agent.hello()).collect();
    // The ninth waits in the backlog: its HELLO is answered once a slot frees.
    let mut ninth = agent.connect();
    ninth.send(HELLO, 0, 0, &Fields::new().u16(1, 5).u16(2, 5).finish());
    assert!(ninth.try_recv(Duration::from_millis(300)).is_none(), "a ninth connection was served");
    for c in open.iter_mut() {
        assert_eq!(c.run(&["true"], Fields::new()).code(), 0);
    }
    drop(open.remove(3));
    assert_eq!(ninth.recv().ty, HELLO_OK);
    assert_eq!(ninth.run(&["echo", "9"], Fields::new()).stdout, b"9\n");
}

#[test]
fn stream_errors_carry_errno() {
    let agent = Agent::start("errno");
    let mut c = agent.hello();
    let read = |c: &mut Client, path: &[u8]| {
        let id = c.id();
        c.send(READ_FILE, 0, id, &Fields::new().bytes(1, path).finish());
        c.wait(id)
    };
    let o = read(&mut c, b"/no/such/file");
    assert_eq!((o.error.as_ref().unwrap().0, o.errno), (4, Some(2)));
    let o = read(&mut c, agent.dir.to_str().unwrap().as_bytes());
    assert_eq!((o.error.as_ref().unwrap().0, o.errno), (3, Some(21)), "{:?}", o.error);
    // Writing below a regular file: ENOTDIR.
    let file = agent.dir.join("plain");
    std::fs::write(&file, b"x").unwrap();
    let id = c.id();
    let path = format!("{}/sub/f", file.display());
    c.send(WRITE_FILE, 0, id, &Fields::new().bytes(1, path.as_bytes()).finish());
    let o = c.wait(id);
    assert_eq!((o.error.as_ref().unwrap().0, o.errno), (3, Some(20)), "{:?}", o.error);
    // The file is the direct parent: ENOTDIR too (mkdir -p alone would say EEXIST).
    let id = c.id();
    let path = format!("{}/f", file.display());
    c.send(WRITE_FILE, 0, id, &Fields::new().bytes(1, path.as_bytes()).finish());
    let o = c.wait(id);
    assert_eq!((o.error.as_ref().unwrap().0, o.errno), (3, Some(20)), "{:?}", o.error);
    // A malformed request has no errno.
    let id = c.id();
    c.send(READ_FILE, 0, id, &[]);
    let o = c.wait(id);
    assert_eq!((o.error.as_ref().unwrap().0, o.errno), (1, None));
}

fn tty(cols: u16, rows: u16) -> Fields {
    Fields::new().u8(8, 1).u16(9, cols).u16(10, rows)
}

/// Whether the tests run as root (then the agent can switch credentials).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").unwrap().lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn tty_exec() {
    let agent = Agent::start("tty");
    let mut c = agent.hello();
    let o = c.run(&["tty"], tty(100, 30));
    assert_eq!(o.code(), 0, "{o:?}");
    assert!(text(&o.stdout).starts_with("/dev/pts/") && o.stdout.ends_with(b"\r\n"), "{:?}", text(&o.stdout));
    assert!(o.eof[0] && o.eof[1] && o.stderr.is_empty());
    assert_eq!(text(&c.run(&["stty", "size"], tty(100, 30)).stdout), "30 100\r\n");
    assert_eq!(text(&c.run(&["stty", "size"], Fields::new().u8(8, 1)).stdout), "24 80\r\n");
    // The terminal is the controlling one: /dev/tty opens.
    let o = c.run(&["sh", "-c", "echo via-dev-tty > /dev/tty && echo ok"], tty(80, 24));
    assert_eq!((text(&o.stdout).as_str(), o.code()), ("via-dev-tty\r\nok\r\n", 0));
    // stderr arrives on channel 1; channel 2 carries only its EOF.
    let o = c.run(&["sh", "-c", "echo out; echo err >&2; exit 5"], tty(80, 24));
    assert_eq!((text(&o.stdout).as_str(), o.stderr.as_slice(), o.code()), ("out\r\nerr\r\n", &b""[..], 5));
    // With other credentials (the fork path): still the controlling terminal.
    if running_as_root() {
        let o = c.run(&["sh", "-c", "id -u; stty size; echo x > /dev/tty"], tty(70, 10).u32(5, 65534).u32(6, 65534));
        assert_eq!((text(&o.stdout).as_str(), o.code()), ("65534\r\n10 70\r\nx\r\n", 0));
    }
    // Start failures on a terminal: the message comes on channel 1 as well.
    let o = c.run(&["no-such-command-tty"], tty(80, 24));
    assert_eq!((o.code(), o.stderr.as_slice()), (127, &b""[..]));
    assert_eq!(text(&o.stdout), "supermachine: no-such-command-tty: command not found\n");
}

#[test]
fn tty_input_eof_and_resize() {
    let agent = Agent::start("tty-input");
    let mut c = agent.hello();
    // Typed input is echoed, cat repeats it, and channel-0 EOF (VEOF) ends cat.
    let id = c.exec(&["cat"], tty(80, 24));
    c.send(DATA, 0, id, b"hello\n");
    c.send(DATA, EOF, id, b"");
    let o = c.wait(id);
    assert_eq!((text(&o.stdout).as_str(), o.code()), ("hello\r\nhello\r\n", 0));
    // RESIZE changes what a later `stty size` in the same session prints.
    let id = c.exec(&["sh", "-c", "stty size; read line; stty size"], tty(100, 30));
    let mut outcomes = HashMap::new();
    while !text(&outcomes.get(&id).map_or(Vec::new(), |o: &Outcome| o.stdout.clone())).contains("30 100\r\n") {
        c.pump(&mut outcomes);
    }
    c.send(RESIZE, 0, id, &Fields::new().u16(1, 132).u16(2, 43).finish());
    c.send(RESIZE, 0, id, &Fields::new().u16(1, 0).u16(2, 10).finish()); // zero: ignored
    c.send(RESIZE, 0, 999, &Fields::new().u16(1, 1).u16(2, 1).finish()); // unknown id: ignored
    c.send(DATA, 0, id, b"go\n");
    while !outcomes.get(&id).is_some_and(Outcome::done) {
        c.pump(&mut outcomes);
    }
    let o = &outcomes[&id];
    assert_eq!((text(&o.stdout).as_str(), o.code()), ("30 100\r\ngo\r\n43 132\r\n", 0));
    // RESIZE on a pipe stream is ignored.
    let id = c.exec(&["sh", "-c", "read x; echo $x"], Fields::new().u8(7, 1));
    c.send(RESIZE, 0, id, &Fields::new().u16(1, 100).u16(2, 30).finish());
    c.send(DATA, EOF, id, b"pipe\n");
    assert_eq!(c.wait(id).stdout, b"pipe\n");
}

#[test]
fn tty_output_is_complete_and_background_does_not_block() {
    let agent = Agent::start("tty-drain");
    let mut c = agent.hello();
    // Large output, flow-controlled, and all of it arrives although the process exits at once.
    let o = c.run(&["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' a; echo; echo end"], tty(80, 24));
    assert_eq!(o.code(), 0);
    let out = text(&o.stdout);
    assert!(out.ends_with("\r\nend\r\n"), "tail {:?}", &out[out.len().saturating_sub(20)..]);
    assert_eq!(out.bytes().filter(|&b| b == b'a').count(), 3_000_000);
    // A background process keeping the terminal open does not delay the end.
    let t = Instant::now();
    let o = c.run(&["sh", "-c", "echo fg; (sleep 5 &) ; exit 0"], tty(80, 24));
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    assert_eq!((text(&o.stdout).as_str(), o.code()), ("fg\r\n", 0));
    // A timeout and a cancel end a terminal process like a piped one.
    let o = c.run(&["sleep", "10"], tty(80, 24).u64(4, 300));
    assert_eq!((o.code(), o.exit_u32(2), o.timed_out()), (-1, 9, 1));
    let id = c.exec(&["sleep", "10"], tty(80, 24));
    std::thread::sleep(Duration::from_millis(50));
    c.send(CANCEL, 0, id, &[]);
    assert_eq!(c.wait(id).code(), -1);
}

#[test]
fn tty_drain_waits_for_credit() {
    let agent = Agent::start("tty-credit");
    let mut c = agent.hello();
    c.auto_credit = false;
    // More than the window: the process can still exit (the rest fits in the terminal's
    // buffer), and the drain after the reap has to wait for credit.
    let total = INITIAL_WINDOW as usize + 20_000;
    let id = c.exec(&["head", "-c", &total.to_string(), "/dev/zero"], tty(80, 24));
    let mut outcomes = HashMap::new();
    while let Some(f) = c.try_recv(Duration::from_millis(700)) {
        c.buf.splice(0..0, reframe(&f));
        c.pump(&mut outcomes);
    }
    let o = &outcomes[&id];
    assert_eq!((o.stdout.len(), o.done()), (INITIAL_WINDOW as usize, false));
    c.auto_credit = true;
    c.send(WINDOW, 1, id, &(o.stdout.len() as u32).to_le_bytes());
    *c.credit.get_mut(&(id, 1)).unwrap() += o.stdout.len() as i64;
    while !outcomes.get(&id).is_some_and(Outcome::done) {
        c.pump(&mut outcomes);
    }
    let o = &outcomes[&id];
    assert_eq!((o.stdout.len(), o.code()), (total, 0));
}

/// The bytes of a frame, to put it back in front of the client's buffer.
fn reframe(f: &Frame) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(f.payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&[f.ty, f.flags, 0, 0]);
    b.extend_from_slice(&f.stream.to_le_bytes());
    b.extend_from_slice(&f.payload);
    b
}

fn chain(mut f: Fields, argv: &[&str]) -> Fields {
    for a in argv {
        f = f.bytes(11, a.as_bytes());
    }
    f
}

#[test]
fn chain_runs_after_success_only() {
    let agent = Agent::start("chain");
    let mut c = agent.hello();
    let o = c.run(&["sh", "-c", "exit 0"], chain(Fields::new(), &["echo", "second"]));
    assert_eq!((o.stdout.as_slice(), o.code(), o.step()), (&b"second\n"[..], 0, 1));
    assert!(o.started);
    let o = c.run(&["sh", "-c", "echo first; exit 1"], chain(Fields::new(), &["echo", "second"]));
    assert_eq!((o.stdout.as_slice(), o.code(), o.step()), (&b"first\n"[..], 1, 0));
    let o = c.run(&["sh", "-c", "kill -9 $$"], chain(Fields::new(), &["echo", "second"]));
    assert_eq!((o.stdout.as_slice(), o.code(), o.exit_u32(2), o.step()), (&b""[..], -1, 9, 0));
    // Without a chain, step is 0.
    assert_eq!(c.run(&["true"], Fields::new()).step(), 0);
    // The chain's exit code is the stream's.
    let o = c.run(&["true"], chain(Fields::new(), &["sh", "-c", "exit 7"]));
    assert_eq!((o.code(), o.step()), (7, 1));
}

#[test]
fn chain_start_failures() {
    let agent = Agent::start("chain-fail");
    let mut c = agent.hello();
    let o = c.run(&["sh", "-c", "echo before; echo err >&2"], chain(Fields::new(), &["no-such-chained-cmd"]));
    assert_eq!((o.code(), o.step()), (127, 1));
    assert_eq!(o.stdout, b"before\n");
    assert_eq!(text(&o.stderr), "err\nsupermachine: no-such-chained-cmd: command not found\n");
    // The chain is looked up when it starts: the first command may create it.
    let script = agent.dir.join("made-by-first");
    let make = format!("printf '#!/bin/sh\\necho made\\n' > {0} && chmod +x {0}", script.display());
    let o = c.run(&["sh", "-c", &make], chain(Fields::new(), &[script.to_str().unwrap()]));
    assert_eq!((o.stdout.as_slice(), o.code(), o.step()), (&b"made\n"[..], 0, 1));
    // Not executable: 126.
    let plain = agent.dir.join("plain-file");
    std::fs::write(&plain, b"x").unwrap();
    let o = c.run(&["true"], chain(Fields::new(), &[plain.to_str().unwrap()]));
    assert_eq!((o.code(), o.step()), (126, 1), "{:?}", text(&o.stderr));
    assert!(!o.stderr.is_empty());
    // On a terminal the message arrives on channel 1.
    let o = c.run(&["true"], chain(tty(80, 24), &["no-such-chained-cmd"]));
    assert_eq!((o.code(), o.stderr.as_slice()), (127, &b""[..]));
    assert_eq!(text(&o.stdout), "supermachine: no-such-chained-cmd: command not found\n");
    // A chain argv with a NUL byte is a malformed request.
    let id = c.exec(&["true"], Fields::new().bytes(11, b"a\0b"));
    assert_eq!(c.wait(id).error.unwrap().0, 1);
}

#[test]
fn chain_shares_stdio_in_order() {
    let agent = Agent::start("chain-io");
    let mut c = agent.hello();
    let o = c.run(
        &["sh", "-c", "echo one; echo e1 >&2"],
        chain(Fields::new(), &["sh", "-c", "echo two; echo e2 >&2"]),
    );
    assert_eq!((text(&o.stdout).as_str(), text(&o.stderr).as_str(), o.step()), ("one\ntwo\n", "e1\ne2\n", 1));
    // Large output from both, in order, complete.
    let o = c.run(
        &["head", "-c", "700000", "/dev/zero"],
        chain(Fields::new(), &["sh", "-c", "head -c 700000 /dev/zero | tr '\\0' b"]),
    );
    assert_eq!((o.stdout.len(), o.code()), (1_400_000, 0));
    assert!(o.stdout[..700_000].iter().all(|&b| b == 0) && o.stdout[700_000..].iter().all(|&b| b == b'b'));
    // stdin is shared: the first reads one line, the chain the rest.
    let id = c.exec(&["sh", "-c", "read x; echo \"1:$x\""], chain(Fields::new().u8(7, 1), &["cat"]));
    c.send(DATA, 0, id, b"a\nb\nc\n");
    c.send(DATA, EOF, id, b"");
    let o = c.wait(id);
    assert_eq!((text(&o.stdout).as_str(), o.step()), ("1:a\nb\nc\n", 1));
    // On a terminal: the same terminal, which the chain gets as its controlling one too.
    let o = c.run(
        &["sh", "-c", "tty; echo x > /dev/tty"],
        chain(tty(90, 20), &["sh", "-c", "tty; stty size; echo y > /dev/tty"]),
    );
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.split("\r\n").collect();
    assert_eq!((lines.len(), o.code(), o.step()), (6, 0, 1), "{out:?}");
    assert!(lines[0].starts_with("/dev/pts/") && lines[2] == lines[0], "{out:?}");
    assert_eq!((lines[1], lines[3], lines[4]), ("x", "20 90", "y"));
}

#[test]
fn chain_timeout_signal_and_cancel() {
    let agent = Agent::start("chain-kill");
    let mut c = agent.hello();
    // The timeout counts from the first start and covers both.
    let t = Instant::now();
    let o = c.run(&["sleep", "0.3"], chain(Fields::new().u64(4, 800), &["sleep", "10"]));
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(700) && took < Duration::from_millis(2500), "took {took:?}");
    assert_eq!((o.code(), o.exit_u32(2), o.timed_out(), o.step()), (-1, 9, 1, 1));
    // The first timing out stops the chain.
    let o = c.run(&["sleep", "10"], chain(Fields::new().u64(4, 200), &["echo", "no"]));
    assert_eq!((o.stdout.as_slice(), o.timed_out(), o.step()), (&b""[..], 1, 0));
    // SIGNAL goes to the command that runs.
    let id = c.exec(&["true"], chain(Fields::new(), &["sleep", "10"]));
    std::thread::sleep(Duration::from_millis(300));
    c.send(SIGNAL, 0, id, &Fields::new().u32(1, 15).finish());
    let o = c.wait(id);
    assert_eq!((o.code(), o.exit_u32(2), o.step()), (-1, 15, 1));
    // CANCEL kills the one that runs and stops the chain.
    let id = c.exec(&["sleep", "10"], chain(Fields::new(), &["echo", "no"]));
    std::thread::sleep(Duration::from_millis(100));
    c.send(CANCEL, 0, id, &[]);
    let o = c.wait(id);
    assert_eq!((o.stdout.as_slice(), o.code(), o.step()), (&b""[..], -1, 0));
    // Duration covers both commands; peak RSS is reported.
    let o = c.run(&["sleep", "0.2"], chain(Fields::new(), &["sleep", "0.2"]));
    assert!(fu64(o.exit.as_ref().unwrap(), 5) >= 400_000, "duration {}", fu64(o.exit.as_ref().unwrap(), 5));
    assert!(fu64(o.exit.as_ref().unwrap(), 4) > 0);
}

fn tcp_open(c: &mut Client, port: u16, addr: Option<&str>) -> u32 {
    let id = c.id();
    let mut f = Fields::new().u16(1, port);
    if let Some(a) = addr {
        f = f.bytes(2, a.as_bytes());
    }
    c.send(TCP_CONNECT, 0, id, &f.finish());
    id
}

/// Sends each stream's data on channel 0 (within its window, then EOF) while collecting
/// everything the agent sends, until every stream has ended.
fn transfer(c: &mut Client, streams: &[(u32, Vec<u8>)]) -> HashMap<u32, Outcome> {
    transfer_into(c, streams, HashMap::new())
}

/// `transfer`, going on from what has already been collected.
fn transfer_into(c: &mut Client, streams: &[(u32, Vec<u8>)], mut outcomes: HashMap<u32, Outcome>) -> HashMap<u32, Outcome> {
    let mut state: HashMap<u32, (i64, usize, bool)> = streams.iter().map(|(id, _)| (*id, (INITIAL_WINDOW, 0, false))).collect();
    while !streams.iter().all(|(id, _)| outcomes.get(id).is_some_and(Outcome::done)) {
        for (id, data) in streams {
            let (window, sent, eof) = state.get_mut(id).unwrap();
            while !*eof && *window > 0 && !outcomes.get(id).is_some_and(Outcome::done) {
                let n = (data.len() - *sent).min(65536).min(*window as usize);
                let last = *sent + n == data.len();
                c.send(DATA, if last { EOF } else { 0 }, *id, &data[*sent..*sent + n]);
                *sent += n;
                *window -= n as i64;
                *eof = last;
            }
        }
        if let Some((id, inc)) = c.pump(&mut outcomes) {
            state.get_mut(&id).unwrap().0 += inc as i64;
        }
    }
    outcomes
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8).collect()
}

/// Echoes every connection it accepts until EOF, then sends `suffix` and closes.
fn echo_server(listener: std::net::TcpListener, conns: usize, suffix: &'static [u8]) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..conns {
            let (mut s, _) = listener.accept().unwrap();
            workers.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match s.read(&mut buf).unwrap() {
                        0 => break,
                        n => s.write_all(&buf[..n]).unwrap(),
                    }
                }
                // Our side still sends after the peer's EOF (half-close).
                s.write_all(suffix).unwrap();
            }));
        }
        for w in workers {
            w.join().unwrap();
        }
    })
}

fn listen() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
fn tcp_echo_with_flow_control_and_half_close() {
    let agent = Agent::start("tcp-echo");
    let mut c = agent.hello();
    let (l, port) = listen();
    let server = echo_server(l, 1, b"bye");
    let data = pattern(3_000_000, 1);
    let id = tcp_open(&mut c, port, None);
    let mut outcomes = transfer(&mut c, &[(id, data.clone())]);
    server.join().unwrap();
    let o = outcomes.remove(&id).unwrap();
    assert!(o.started && o.eof[0], "{:?}", o.error);
    assert!(o.ok.is_some(), "{:?}", o.error);
    assert_eq!(o.stdout.len(), data.len() + 3);
    assert!(o.stdout[..data.len()] == data[..] && o.stdout.ends_with(b"bye"));
    // IPv6, when the host has a loopback for it.
    if let Ok(l6) = std::net::TcpListener::bind("[::1]:0") {
        let port = l6.local_addr().unwrap().port();
        let server = echo_server(l6, 1, b"");
        let id = tcp_open(&mut c, port, Some("::1"));
        let o = transfer(&mut c, &[(id, b"over v6".to_vec())]).remove(&id).unwrap();
        server.join().unwrap();
        assert_eq!((o.stdout.as_slice(), o.ok.is_some()), (&b"over v6"[..], true));
    }
}

#[test]
fn tcp_connect_errors() {
    let agent = Agent::start("tcp-errors");
    let mut c = agent.hello();
    let (l, port) = listen();
    drop(l);
    let id = tcp_open(&mut c, port, None);
    let o = c.wait(id);
    assert!(!o.started);
    assert_eq!((o.error.as_ref().unwrap().0, o.errno), (9, Some(111)), "{:?}", o.error);
    for bad in [
        Fields::new().u16(1, 0),
        Fields::new(),
        Fields::new().u16(1, 80).bytes(2, b"not-an-address"),
        Fields::new().bytes(1, &[80]),
    ] {
        let id = c.id();
        c.send(TCP_CONNECT, 0, id, &bad.finish());
        let o = c.wait(id);
        assert_eq!((o.error.as_ref().unwrap().0, o.errno), (1, None), "{:?}", o.error);
    }
}

#[test]
fn tcp_cancel_resets_the_connection() {
    let agent = Agent::start("tcp-cancel");
    let mut c = agent.hello();
    let (l, port) = listen();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 16];
        s.read(&mut buf)
    });
    let id = tcp_open(&mut c, port, None);
    let mut outcomes = HashMap::new();
    while outcomes.get(&id).map_or(0, |o: &Outcome| o.stdout.len()) < 5 {
        c.pump(&mut outcomes);
    }
    c.send(CANCEL, 0, id, &[]);
    while !outcomes.get(&id).is_some_and(Outcome::done) {
        c.pump(&mut outcomes);
    }
    let o = &outcomes[&id];
    assert_eq!(o.error.as_ref().map(|(code, m)| (*code, m.as_str())), Some((3, "cancelled")));
    let r = server.join().unwrap();
    assert_eq!(r.map_err(|e| e.kind()).unwrap_err(), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn tcp_many_at_once() {
    let agent = Agent::start("tcp-many");
    let mut c = agent.hello();
    let (l, port) = listen();
    let server = echo_server(l, 50, b".");
    let streams: Vec<(u32, Vec<u8>)> = (0..50).map(|i| (tcp_open(&mut c, port, None), pattern(40_000 + i * 1000, i as u32))).collect();
    let outcomes = transfer(&mut c, &streams);
    server.join().unwrap();
    for (id, data) in &streams {
        let o = &outcomes[id];
        assert!(o.ok.is_some(), "{:?}", o.error);
        assert!(o.stdout.len() == data.len() + 1 && o.stdout[..data.len()] == data[..]);
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn tcp_backpressure_reaches_the_guest_peer() {
    let agent = Agent::start("tcp-backpressure");
    let mut c = agent.hello();
    let rss_before = rss_kib(agent.child.id());
    let (l, port) = listen();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = written.clone();
    // A guest peer writing 100 MB that the host never reads.
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let chunk = vec![7u8; 65536];
        while w.load(std::sync::atomic::Ordering::Relaxed) < 100 << 20 {
            if s.write_all(&chunk).is_err() {
                return;
            }
            w.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    c.auto_credit = false;
    let id = tcp_open(&mut c, port, None);
    let mut outcomes = HashMap::new();
    let mut last = (usize::MAX, Instant::now());
    // Until the peer has been blocked for a while.
    loop {
        if let Some(f) = c.try_recv(Duration::from_millis(100)) {
            c.buf.splice(0..0, reframe(&f));
            c.pump(&mut outcomes);
        }
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(700) {
            break;
        }
    }
    let o = &outcomes[&id];
    assert_eq!(o.stdout.len(), INITIAL_WINDOW as usize, "the agent forwards exactly one window");
    let blocked_at = written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(blocked_at < 40 << 20, "the peer wrote {blocked_at} bytes: the agent kept reading");
    let grown = rss_kib(agent.child.id()).saturating_sub(rss_before);
    eprintln!("peer blocked after {blocked_at} bytes; agent RSS {rss_before} KiB + {grown} KiB");
    assert!(grown < 8 * 1024, "the agent's RSS grew by {grown} KiB");
    // Credit moves it on; CANCEL ends it and the peer's write fails.
    c.auto_credit = true;
    c.send(WINDOW, 1, id, &(INITIAL_WINDOW as u32).to_le_bytes());
    *c.credit.get_mut(&(id, 1)).unwrap() += INITIAL_WINDOW;
    while outcomes[&id].stdout.len() < 2 * INITIAL_WINDOW as usize {
        c.pump(&mut outcomes);
    }
    c.send(CANCEL, 0, id, &[]);
    while !outcomes.get(&id).is_some_and(Outcome::done) {
        c.pump(&mut outcomes);
    }
    assert_eq!(outcomes[&id].error.as_ref().unwrap().0, 3);
    server.join().unwrap();
    assert!(written.load(std::sync::atomic::Ordering::Relaxed) < 100 << 20);
}

#[test]
fn tcp_reads_stop_while_the_host_does_not_read() {
    let agent = Agent::start("tcp-pause");
    let mut c = agent.hello();
    let rss_before = rss_kib(agent.child.id());
    let (l, port) = listen();
    const STREAMS: usize = 40;
    const EACH: usize = 600_000;
    let server = std::thread::spawn(move || {
        let mut workers = Vec::new();
        for i in 0..STREAMS {
            let (mut s, _) = l.accept().unwrap();
            workers.push(std::thread::spawn(move || {
                s.write_all(&pattern(EACH, i as u32)).unwrap();
            }));
        }
        for w in workers {
            w.join().unwrap();
        }
    });
    let ids: Vec<u32> = (0..STREAMS).map(|_| tcp_open(&mut c, port, None)).collect();
    for &id in &ids {
        c.send(DATA, EOF, id, b"");
    }
    // The host reads nothing for a while: 40 windows (10 MB) could be queued, but the agent
    // stops reading sockets once its output for this connection passes the high-water mark.
    std::thread::sleep(Duration::from_millis(1500));
    let grown = rss_kib(agent.child.id()).saturating_sub(rss_before);
    eprintln!("agent RSS grew by {grown} KiB while the host did not read");
    assert!(grown < 7 * 1024, "the agent's RSS grew by {grown} KiB");
    let mut outcomes = HashMap::new();
    while !ids.iter().all(|id| outcomes.get(id).is_some_and(Outcome::done)) {
        c.pump(&mut outcomes);
    }
    server.join().unwrap();
    for (i, id) in ids.iter().enumerate() {
        let o = &outcomes[id];
        assert!(o.ok.is_some() && o.stdout == pattern(EACH, i as u32), "stream {i}: {:?}", o.error);
    }
}

/// A listener whose accept queue is full: Linux drops further SYNs, so connects hang.
fn full_listener() -> (std::net::TcpListener, u16, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // A backlog of 0 leaves room for one queued connection.
    sock::relisten(&l, 0).unwrap();
    let queued = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    (l, port, queued)
}

#[test]
fn tcp_connect_times_out() {
    let agent = Agent::start("tcp-timeout");
    let mut c = agent.hello();
    let (_listener, port, _queued) = full_listener();
    let t = Instant::now();
    let id = tcp_open(&mut c, port, None);
    // Meanwhile the connection is served as usual.
    assert_eq!(c.run(&["echo", "meanwhile"], Fields::new()).stdout, b"meanwhile\n");
    let o = c.wait(id);
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(9) && took < Duration::from_secs(14), "took {took:?}");
    assert!(!o.started);
    assert_eq!((o.error.as_ref().unwrap().0, o.errno), (3, Some(110)), "{:?}", o.error);
}

#[test]
fn tcp_peer_reset_is_an_io_error() {
    let agent = Agent::start("tcp-reset");
    let mut c = agent.hello();
    let (l, port) = listen();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s); // closing with unread bytes sends a reset
    });
    let id = tcp_open(&mut c, port, None);
    c.send(DATA, 0, id, b"never read");
    let o = c.wait(id);
    server.join().unwrap();
    assert!(o.started);
    assert_eq!((o.error.as_ref().unwrap().0, o.errno), (3, Some(104)), "{:?}", o.error);
}

// ---------------------------------------------------------------------------------------------
// PROXY_LISTEN / PROXY_STOP / PROXY_CONN (version 4)

/// A port nothing listens on (bound and released).
fn free_port() -> u16 {
    listen().1
}

fn proxy_listen(c: &mut Client, f: Fields) -> (u32, Outcome) {
    let id = c.id();
    c.send(PROXY_LISTEN, 0, id, &f.finish());
    (id, c.wait(id))
}

/// Listens on a free port; returns it.
fn proxy_on(c: &mut Client, extra: Fields) -> u16 {
    let port = free_port();
    let (_, o) = proxy_listen(c, Fields::new().u16(1, port).bytes(3, b"http_proxy=http://127.0.0.1:3128").tap(extra));
    let ok = o.ok.unwrap_or_else(|| panic!("PROXY_LISTEN failed: {:?}", o.error));
    assert_eq!(field(&ok, 1), &port.to_le_bytes());
    port
}

impl Fields {
    fn tap(mut self, more: Fields) -> Fields {
        self.0.extend_from_slice(&more.0);
        self
    }
}

/// Waits for the next PROXY_CONN (not one of `seen`): its stream id and peer port.
fn next_proxy_conn(c: &mut Client, outcomes: &mut HashMap<u32, Outcome>) -> (u32, u16) {
    loop {
        let known: Vec<u32> = outcomes.iter().filter(|(_, o)| o.proxy_peer.is_some()).map(|(id, _)| *id).collect();
        c.pump(outcomes);
        if let Some((id, o)) = outcomes.iter().find(|(id, o)| o.proxy_peer.is_some() && !known.contains(id)) {
            return (*id, o.proxy_peer.unwrap());
        }
    }
}

fn connect_guest(port: u16) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Whether the peer of `s` reset it (reads until EOF or an error, at most 15 s).
fn was_reset(s: &mut std::net::TcpStream) -> bool {
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn refused(port: u16) -> bool {
    matches!(std::net::TcpStream::connect(("127.0.0.1", port)), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn proxy_carries_guest_clients_both_ways() {
    let agent = Agent::start("proxy-data");
    let mut c = agent.hello();
    let port = proxy_on(&mut c, Fields::new());
    // The guest client sends 700 kB and reads what the host sends back, both beyond one window.
    let up = pattern(700_000, 7);
    let down = pattern(900_000, 8);
    let s = connect_guest(port);
    let client_port = s.local_addr().unwrap().port();
    let mut r = s.try_clone().unwrap();
    let writer = {
        let (mut w, up) = (s, up.clone());
        std::thread::spawn(move || {
            w.write_all(&up).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
            w
        })
    };
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        got
    });
    let mut outcomes = HashMap::new();
    let (id, peer) = next_proxy_conn(&mut c, &mut outcomes);
    assert_eq!((id, peer), (1 << 31, client_port), "the first agent id is 2^31");
    let mut outcomes = transfer_into(&mut c, &[(id, down.clone())], outcomes);
    let o = outcomes.remove(&id).unwrap();
    assert!(o.ok.is_some(), "{:?}", o.error);
    assert!(!o.started, "no STARTED on a PROXY_CONN stream");
    assert!(o.eof[0] && o.stdout == up, "{} bytes up", o.stdout.len());
    let _w = writer.join().unwrap();
    assert!(reader.join().unwrap() == down);

    // A second client gets the next id; the listener keeps serving.
    let mut s = connect_guest(port);
    s.write_all(b"ping").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (id2, _) = next_proxy_conn(&mut c, &mut outcomes);
    assert_eq!(id2, (1 << 31) + 1);
    let o = transfer_into(&mut c, &[(id2, b"pong".to_vec())], outcomes).remove(&id2).unwrap();
    assert_eq!((o.stdout.as_slice(), o.ok.is_some()), (&b"ping"[..], true));
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"pong");
}

#[test]
fn proxy_reset_cancel_and_stop() {
    let agent = Agent::start("proxy-reset");
    let mut c = agent.hello();
    let port = proxy_on(&mut c, Fields::new());
    let mut outcomes = HashMap::new();

    // The guest client resets its connection: STREAM_ERROR IO with ECONNRESET.
    let s = connect_guest(port);
    let (id, _) = next_proxy_conn(&mut c, &mut outcomes);
    sock::set_linger_reset(&s).unwrap();
    drop(s);
    while !outcomes.get(&id).is_some_and(Outcome::done) {
        c.pump(&mut outcomes);
    }
    assert_eq!((outcomes[&id].error.as_ref().unwrap().0, outcomes[&id].errno), (3, Some(104)), "{:?}", outcomes[&id].error);

    // CANCEL from the host resets the guest client.
    let mut s = connect_guest(port);
    s.write_all(b"hello").unwrap();
    let (id, _) = next_proxy_conn(&mut c, &mut outcomes);
    while outcomes[&id].stdout.len() < 5 {
        c.pump(&mut outcomes);
    }
    c.send(CANCEL, 0, id, &[]);
    while !outcomes.get(&id).is_some_and(Outcome::done) {
        c.pump(&mut outcomes);
    }
    assert_eq!(outcomes[&id].error.as_ref().map(|(code, m)| (*code, m.as_str())), Some((3, "cancelled")));
    assert!(was_reset(&mut s), "CANCEL resets the guest client");

    // PROXY_STOP ends the open streams ("proxy stopped"), resets their clients, closes the port
    // and answers OK.
    let mut clients: Vec<_> = (0..2).map(|_| connect_guest(port)).collect();
    let ids: Vec<u32> = (0..2).map(|_| next_proxy_conn(&mut c, &mut outcomes).0).collect();
    let stop = c.id();
    c.send(PROXY_STOP, 0, stop, &[]);
    while !ids.iter().chain([&stop]).all(|id| outcomes.get(id).is_some_and(Outcome::done)) {
        c.pump(&mut outcomes);
    }
    for id in &ids {
        assert_eq!(outcomes[id].error.as_ref().map(|(code, m)| (*code, m.as_str())), Some((3, "proxy stopped")));
    }
    assert!(outcomes[&stop].ok.is_some());
    for s in clients.iter_mut() {
        assert!(was_reset(s), "PROXY_STOP resets the guest clients");
    }
    assert!(refused(port), "the port is closed after PROXY_STOP");
    // PROXY_STOP with nothing listening: OK too.
    let stop = c.id();
    c.send(PROXY_STOP, 0, stop, &[]);
    assert!(c.wait(stop).ok.is_some());
    // The connection goes on.
    assert_eq!(c.run(&["echo", "still"], Fields::new()).stdout, b"still\n");
}

#[test]
fn proxy_env_reaches_every_exec_unless_set() {
    let agent = Agent::start("proxy-env");
    let mut c = agent.hello();
    let mut other = agent.hello();
    let show = ["/bin/sh", "-c", "echo \"$http_proxy|${HTTPS_PROXY-unset}|${NO_PROXY-unset}|$PATH\""];
    assert_eq!(c.run(&show, Fields::new()).stdout, b"|unset|unset|/usr/local/bin:/usr/bin:/bin\n");
    let port = proxy_on(&mut c, Fields::new().bytes(3, b"HTTPS_PROXY=http://127.0.0.1:3128").bytes(3, b"NO_PROXY=localhost").bytes(3, b"PATH=/proxy"));
    let want = b"http://127.0.0.1:3128|http://127.0.0.1:3128|localhost|/usr/local/bin:/usr/bin:/bin\n";
    assert_eq!(c.run(&show, Fields::new()).stdout, want);
    // On every connection, and for a chain; the request's own value wins, an empty one too.
    assert_eq!(other.run(&show, Fields::new()).stdout, want);
    let o = c.run(&["true"], chain(Fields::new(), &show));
    assert_eq!(o.stdout, want);
    let own = Fields::new().bytes(2, b"HTTPS_PROXY=mine").bytes(2, b"NO_PROXY=");
    assert_eq!(c.run(&show, own).stdout, b"http://127.0.0.1:3128|mine||/usr/local/bin:/usr/bin:/bin\n");
    // Gone after PROXY_STOP.
    let stop = c.id();
    c.send(PROXY_STOP, 0, stop, &[]);
    assert!(c.wait(stop).ok.is_some());
    assert!(refused(port));
    assert_eq!(other.run(&show, Fields::new()).stdout, b"|unset|unset|/usr/local/bin:/usr/bin:/bin\n");
}

#[test]
fn proxy_max_streams_holds_clients_in_the_backlog() {
    let agent = Agent::start("proxy-max");
    let mut c = agent.hello();
    let port = proxy_on(&mut c, Fields::new().u32(4, 2));
    let mut outcomes = HashMap::new();
    let mut first = connect_guest(port);
    let _second = connect_guest(port);
    let (a, pa) = next_proxy_conn(&mut c, &mut outcomes);
    let (b, _) = next_proxy_conn(&mut c, &mut outcomes);
    // The third connects (the kernel completes it in the backlog) but is not announced.
    let mut third = connect_guest(port);
    let third_port = third.local_addr().unwrap().port();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(800) {
        if let Some(f) = c.try_recv(Duration::from_millis(100)) {
            panic!("a third stream while two are open: frame {:#x} on {}", f.ty, f.stream);
        }
    }
    // The first ends (both ways): the third is announced.
    let ending = if first.local_addr().unwrap().port() == pa { a } else { b };
    first.shutdown(std::net::Shutdown::Write).unwrap();
    c.send(DATA, EOF, ending, b"");
    while !outcomes.get(&ending).is_some_and(Outcome::done) {
        c.pump(&mut outcomes);
    }
    assert!(outcomes[&ending].ok.is_some(), "{:?}", outcomes[&ending].error);
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).unwrap();
    let (id3, p3) = next_proxy_conn(&mut c, &mut outcomes);
    assert_eq!(p3, third_port);
    third.write_all(b"late").unwrap();
    third.shutdown(std::net::Shutdown::Write).unwrap();
    let o = transfer_into(&mut c, &[(id3, b"served".to_vec())], outcomes).remove(&id3).unwrap();
    assert_eq!((o.stdout.as_slice(), o.ok.is_some()), (&b"late"[..], true));
}

#[test]
fn proxy_listener_ownership_hello_and_close() {
    let agent = Agent::start("proxy-owner");
    let mut a = agent.hello();
    let mut b = agent.hello();
    let port = proxy_on(&mut a, Fields::new());
    let mut outcomes = HashMap::new();

    // Another connection: STREAM_IN_USE; its PROXY_STOP leaves a's listener alone.
    let (_, o) = proxy_listen(&mut b, Fields::new().u16(1, free_port()));
    assert_eq!(o.error.as_ref().unwrap().0, 2, "{:?}", o.error);
    let stop = b.id();
    b.send(PROXY_STOP, 0, stop, &[]);
    assert!(b.wait(stop).ok.is_some());
    let _kept = connect_guest(port);
    let (kept, _) = next_proxy_conn(&mut a, &mut outcomes);

    // The same connection's PROXY_LISTEN replaces its listener: the old streams end.
    let port2 = free_port();
    let listen2 = a.id();
    a.send(PROXY_LISTEN, 0, listen2, &Fields::new().u16(1, port2).finish());
    while ![kept, listen2].iter().all(|id| outcomes.get(id).is_some_and(Outcome::done)) {
        a.pump(&mut outcomes);
    }
    assert_eq!(field(outcomes[&listen2].ok.as_ref().unwrap(), 1), &port2.to_le_bytes());
    assert_eq!(outcomes[&kept].error.as_ref().map(|(c, m)| (*c, m.as_str())), Some((3, "proxy stopped")));
    assert!(refused(port));
    // Replacing it with the same port works too (SO_REUSEADDR, the old socket closed first).
    let (_, o) = proxy_listen(&mut a, Fields::new().u16(1, port2));
    assert!(o.ok.is_some(), "{:?}", o.error);
    let mut s = connect_guest(port2);
    let (id, _) = next_proxy_conn(&mut a, &mut outcomes);
    assert!(id > kept);

    // HELLO on the owning connection closes the listener and its streams without a message.
    a.send(HELLO, 0, 0, &Fields::new().u16(1, 5).u16(2, 5).finish());
    assert_eq!(a.recv().ty, HELLO_OK);
    assert!(was_reset(&mut s), "HELLO resets the listener's clients");
    assert!(refused(port2));
    let p = a.id();
    a.send(PING, 0, p, b"after");
    let f = a.recv();
    assert_eq!((f.ty, f.stream), (PONG, p), "no message for the dropped stream");

    // Now b may listen; when b's connection closes, its listener goes.
    let port3 = proxy_on(&mut b, Fields::new());
    let (_, o) = proxy_listen(&mut a, Fields::new().u16(1, free_port()));
    assert_eq!(o.error.as_ref().unwrap().0, 2);
    drop(b);
    let t = Instant::now();
    while !refused(port3) {
        assert!(t.elapsed() < Duration::from_secs(10), "the listener outlived its connection");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, o) = proxy_listen(&mut a, Fields::new().u16(1, port3));
    assert!(o.ok.is_some(), "{:?}", o.error);
}

#[test]
fn proxy_bad_requests() {
    let agent = Agent::start("proxy-bad");
    let mut c = agent.hello();
    let port = free_port();
    for bad in [
        Fields::new(),
        Fields::new().u16(1, 0),
        Fields::new().u32(1, port as u32),
        Fields::new().u16(1, port).bytes(2, b"localhost"),
        Fields::new().u16(1, port).bytes(3, b"NOEQUALS"),
        Fields::new().u16(1, port).bytes(3, b"=x"),
        Fields::new().u16(1, port).bytes(3, &[b'a'; 4097]),
        Fields::new().u16(1, port).u32(4, 4097),
    ] {
        let (_, o) = proxy_listen(&mut c, bad);
        assert_eq!((o.error.as_ref().map(|e| e.0), o.errno), (Some(1), None), "{:?}", o.error);
    }
    assert!(refused(port), "nothing listens after bad requests");
    // A port in use: IO with EADDRINUSE.
    let (_busy, busy_port) = listen();
    let (_, o) = proxy_listen(&mut c, Fields::new().u16(1, busy_port));
    assert_eq!((o.error.as_ref().map(|e| e.0), o.errno), (Some(3), Some(98)), "{:?}", o.error);
    // The host opens nothing at 2^31 and up.
    for id in [1u32 << 31, u32::MAX] {
        c.send(EXEC, 0, id, &Fields::new().bytes(1, b"true").finish());
        let o = c.wait(id);
        assert_eq!(o.error.as_ref().map(|e| e.0), Some(1), "{:?}", o.error);
    }
    c.send(TCP_CONNECT, 0, 1 << 31, &Fields::new().u16(1, busy_port).finish());
    assert_eq!(c.wait(1 << 31).error.map(|e| e.0), Some(1));
    assert_eq!(c.run(&["true"], Fields::new()).code(), 0);
}

// ---------------------------------------------------------------------------------------------
// FS_STAT / FS_LIST / FS_MKDIR / FS_RENAME / FS_REMOVE / FS_WATCH (version 5)

impl Client {
    /// An FS_* request on a new id, waited for.
    fn fs(&mut self, ty: u8, f: Fields) -> Outcome {
        let id = self.id();
        self.send(ty, 0, id, &f.finish());
        self.wait(id)
    }
}

/// Splits a channel-1 byte stream into its records (`len: u32`, then fields).
fn records(mut b: &[u8]) -> Vec<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
        out.push(parse_fields(&b[4..4 + len]));
        b = &b[4 + len..];
    }
    out
}

fn ok_fields(o: &Outcome) -> &[(u8, Vec<u8>)] {
    o.ok.as_deref().unwrap_or_else(|| panic!("no OK: {:?}", o.error))
}

fn err_of(o: &Outcome) -> (u32, Option<u32>) {
    (o.error.as_ref().unwrap_or_else(|| panic!("no error, OK {:?}", o.ok)).0, o.errno)
}

fn pbytes(p: &std::path::Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes()
}

#[test]
fn fs_stat_mkdir_rename_remove() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let agent = Agent::start("fs");
    let mut c = agent.hello();
    let d = agent.dir.join("t");
    std::fs::create_dir(&d).unwrap();
    let file = d.join("file");
    std::fs::write(&file, b"12345").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o4640)).unwrap();
    std::os::unix::fs::symlink("file", d.join("link")).unwrap();

    let st = |c: &mut Client, p: &[u8], follow: bool| c.fs(FS_STAT, Fields::new().bytes(1, p).u8(2, follow as u8));
    let o = st(&mut c, pbytes(&file), false);
    let fs = ok_fields(&o);
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!((field(fs, 1), field(fs, 2), field(fs, 3)), (pbytes(&file), &b"file"[..], &[1u8][..]));
    assert_eq!((fu64(fs, 4), fu32(fs, 5), fu32(fs, 6), fu32(fs, 7)), (5, 0o4640, meta.uid(), meta.gid()));
    assert_eq!(i64::from_le_bytes(field(fs, 8).try_into().unwrap()), meta.mtime());
    assert_eq!(fu32(fs, 9) as i64, meta.mtime_nsec());
    assert!(!fs.iter().any(|(t, _)| *t == 10));
    let o = st(&mut c, pbytes(&d.join("link")), false);
    assert_eq!((field(ok_fields(&o), 3), field(ok_fields(&o), 10)), (&[3u8][..], &b"file"[..]));
    let o = st(&mut c, pbytes(&d.join("link")), true);
    assert_eq!(field(ok_fields(&o), 3), &[1u8]);
    assert_eq!(field(ok_fields(&st(&mut c, pbytes(&d), false)), 3), &[2u8]);
    assert_eq!(field(ok_fields(&st(&mut c, b"/", false)), 2), b"/");
    assert_eq!(err_of(&st(&mut c, pbytes(&d.join("none")), false)), (4, Some(2)));
    for bad in [&b"rel"[..], b"/a/../b", b"/a/", b"//a", b""] {
        assert_eq!(err_of(&st(&mut c, bad, false)), (1, None), "{bad:?}");
    }

    // FS_MKDIR: mode regardless of the umask, parents, an existing directory.
    let mk = |c: &mut Client, p: &std::path::Path, parents: bool| c.fs(FS_MKDIR, Fields::new().bytes(1, pbytes(p)).u32(2, 0o705).u8(3, parents as u8));
    let o = mk(&mut c, &d.join("new"), false);
    assert_eq!(field(ok_fields(&o), 1), &[1]);
    assert_eq!(std::fs::metadata(d.join("new")).unwrap().permissions().mode() & 0o7777, 0o705);
    assert_eq!(err_of(&mk(&mut c, &d.join("new"), false)), (3, Some(17)));
    assert_eq!(field(ok_fields(&mk(&mut c, &d.join("new"), true)), 1), &[0]);
    assert_eq!(err_of(&mk(&mut c, &d.join("p/q/r"), false)), (4, Some(2)));
    assert_eq!(field(ok_fields(&mk(&mut c, &d.join("p/q/r"), true)), 1), &[1]);
    assert!(d.join("p/q/r").is_dir());
    assert_eq!(err_of(&mk(&mut c, &file, true)), (3, Some(17)));
    let o = c.fs(FS_MKDIR, Fields::new().bytes(1, pbytes(&d.join("default"))));
    assert_eq!(field(ok_fields(&o), 1), &[1]);
    assert_eq!(std::fs::metadata(d.join("default")).unwrap().permissions().mode() & 0o7777, 0o755);
    // Ownership: our own ids always work; another's only as root.
    let (uid, gid) = (meta.uid(), meta.gid());
    let o = c.fs(FS_MKDIR, Fields::new().bytes(1, pbytes(&d.join("owned"))).u32(4, uid).u32(5, gid));
    assert!(o.ok.is_some(), "{:?}", o.error);
    if running_as_root() {
        let o = c.fs(FS_MKDIR, Fields::new().bytes(1, pbytes(&d.join("o1/o2"))).u8(3, 1).u32(4, 1234).u32(5, 5678));
        assert!(o.ok.is_some(), "{:?}", o.error);
        for p in ["o1", "o1/o2"] {
            let m = std::fs::metadata(d.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (1234, 5678), "{p}");
        }
    }
    assert_eq!(err_of(&c.fs(FS_MKDIR, Fields::new().bytes(1, b"/"))), (1, None));

    // FS_RENAME.
    let o = c.fs(FS_RENAME, Fields::new().bytes(1, pbytes(&file)).bytes(2, pbytes(&d.join("renamed"))));
    assert!(o.ok.is_some(), "{:?}", o.error);
    assert!(!file.exists() && d.join("renamed").exists());
    let o = c.fs(FS_RENAME, Fields::new().bytes(1, pbytes(&file)).bytes(2, pbytes(&d.join("x"))));
    assert_eq!(err_of(&o), (4, Some(2)));
    assert!(o.error.as_ref().unwrap().1.contains("renamed") || o.error.as_ref().unwrap().1.contains("file"));
    assert_eq!(err_of(&c.fs(FS_RENAME, Fields::new().bytes(1, pbytes(&d)))), (1, None));

    // FS_REMOVE: a file, an empty directory, a non-empty one, recursively without following links.
    let outside = agent.dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"k").unwrap();
    std::os::unix::fs::symlink(&outside, d.join("p/q/out")).unwrap();
    let rm = |c: &mut Client, p: &std::path::Path, recursive: bool| c.fs(FS_REMOVE, Fields::new().bytes(1, pbytes(p)).u8(2, recursive as u8));
    assert!(rm(&mut c, &d.join("renamed"), false).ok.is_some());
    assert!(!d.join("renamed").exists());
    assert!(rm(&mut c, &d.join("new"), false).ok.is_some());
    assert_eq!(err_of(&rm(&mut c, &d.join("p"), false)), (3, Some(39)));
    assert!(rm(&mut c, &d.join("p"), true).ok.is_some());
    assert!(!d.join("p").exists());
    assert!(outside.join("keep").exists(), "recursive removal followed a symlink");
    assert_eq!(err_of(&rm(&mut c, &d.join("p"), true)), (4, Some(2)));
    assert_eq!(err_of(&rm(&mut c, std::path::Path::new("/"), true)), (1, None));
}

#[test]
fn fs_list_depth_flow_control_and_limit() {
    let agent = Agent::start("fs-list");
    let mut c = agent.hello();
    let d = agent.dir.join("l");
    std::fs::create_dir_all(d.join("b/c")).unwrap();
    std::fs::write(d.join("a"), b"1").unwrap();
    std::fs::write(d.join("b/c/deep"), b"22").unwrap();
    std::os::unix::fs::symlink(d.join("b"), d.join("z")).unwrap();
    let list = |c: &mut Client, p: &std::path::Path, depth: u32| c.fs(FS_LIST, Fields::new().bytes(1, pbytes(p)).u32(2, depth));
    let names = |o: &Outcome| -> Vec<String> {
        assert!(o.eof[0], "no EOF before OK");
        let recs = records(&o.stdout);
        assert_eq!(fu64(ok_fields(o), 1), recs.len() as u64);
        recs.iter().map(|r| String::from_utf8(field(r, 1).to_vec()).unwrap()).collect()
    };
    let at = |s: &str| format!("{}{s}", d.display());
    assert_eq!(names(&list(&mut c, &d, 1)), [at("/a"), at("/b"), at("/z")]);
    let o = list(&mut c, &d, 2);
    assert_eq!(names(&o), [at("/a"), at("/b"), at("/b/c"), at("/z")]);
    let recs = records(&o.stdout);
    assert_eq!((field(&recs[1], 2), field(&recs[1], 3)), (&b"b"[..], &[2u8][..]));
    assert_eq!((field(&recs[3], 3), field(&recs[3], 10)), (&[3u8][..], pbytes(&d.join("b"))), "a symlink, not followed");
    assert_eq!(names(&list(&mut c, &d, 10)), [at("/a"), at("/b"), at("/b/c"), at("/b/c/deep"), at("/z")]);
    // Errors: missing, not a directory, depth 0.
    assert_eq!(err_of(&list(&mut c, &d.join("none"), 1)), (4, Some(2)));
    assert_eq!(err_of(&list(&mut c, &d.join("a"), 1)), (3, Some(20)));
    assert_eq!(err_of(&list(&mut c, &d, 0)), (1, None));

    // Many entries: more than one window of records, within the credit given (Client::pump checks).
    let big = agent.dir.join("big");
    std::fs::create_dir(&big).unwrap();
    for i in 0..4000 {
        std::fs::write(big.join(format!("{i:05}-{}", "n".repeat(60))), b"").unwrap();
    }
    let o = list(&mut c, &big, 1);
    assert!(o.stdout.len() > 2 * INITIAL_WINDOW as usize, "{} bytes", o.stdout.len());
    let n = names(&o);
    assert_eq!(n.len(), 4000);
    assert!(n.windows(2).all(|w| w[0] < w[1]), "sorted");
    // A limit: TOO_LARGE, without errno.
    let o = c.fs(FS_LIST, Fields::new().bytes(1, pbytes(&big)).u32(3, 3999));
    assert_eq!(err_of(&o), (5, None));
    let o = c.fs(FS_LIST, Fields::new().bytes(1, pbytes(&d)).u32(2, 5).u32(3, 4));
    assert_eq!(err_of(&o), (5, None));
    assert_eq!(fu64(ok_fields(&c.fs(FS_LIST, Fields::new().bytes(1, pbytes(&d)).u32(2, 5).u32(3, 5))), 1), 5);
}

/// Reads frames of watch `id` until `n` event records have arrived (or the stream ended).
fn watch_events(c: &mut Client, id: u32, outcomes: &mut HashMap<u32, Outcome>, n: usize) -> Vec<(u8, String)> {
    loop {
        let o = outcomes.entry(id).or_default();
        let recs = records(&o.stdout);
        if recs.len() >= n || o.done() {
            return recs.iter().map(|r| (field(r, 1)[0], String::from_utf8(field(r, 2).to_vec()).unwrap())).collect();
        }
        c.pump(outcomes);
    }
}

#[test]
fn fs_watch_recursive_events() {
    use std::os::unix::fs::PermissionsExt;
    let agent = Agent::start("fs-watch");
    let mut c = agent.hello();
    let d = agent.dir.join("w");
    std::fs::create_dir_all(d.join("old/inner")).unwrap();
    let fds0 = std::fs::read_dir(format!("/proc/{}/fd", agent.child.id())).unwrap().count();
    let id = c.id();
    c.send(FS_WATCH, 0, id, &Fields::new().bytes(1, pbytes(&d)).u8(2, 1).finish());
    let flat = c.id();
    c.send(FS_WATCH, 0, flat, &Fields::new().bytes(1, pbytes(&d)).finish());
    // STARTED: each is in place.
    for w in [id, flat] {
        let f = c.recv();
        assert_eq!((f.ty, f.stream, f.payload.len()), (STARTED, w, 0));
    }
    let mut outcomes = HashMap::new();
    let (create, write, remove, rename, chmod) = (1u8, 2u8, 3u8, 4u8, 5u8);
    let s = |x: &str| x.to_string();

    std::fs::write(d.join("f"), b"").unwrap();
    std::fs::OpenOptions::new().append(true).open(d.join("f")).unwrap().write_all(b"more").unwrap();
    std::fs::set_permissions(d.join("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(d.join("old/inner/g"), b"x").unwrap();
    let ev = watch_events(&mut c, id, &mut outcomes, 5);
    assert_eq!(ev[..3], [(create, s("f")), (write, s("f")), (chmod, s("f"))], "{ev:?}");
    assert!(ev[3..].contains(&(create, s("old/inner/g"))), "{ev:?}");

    // A directory made after the watch started: once its create is seen, it is watched.
    std::fs::create_dir(d.join("sub")).unwrap();
    let ev = watch_events(&mut c, id, &mut outcomes, 6);
    assert_eq!(ev[5], (create, s("sub")));
    std::fs::write(d.join("sub/h"), b"").unwrap();
    std::fs::rename(d.join("sub/h"), d.join("sub/h2")).unwrap();
    std::fs::remove_file(d.join("sub/h2")).unwrap();
    let ev = watch_events(&mut c, id, &mut outcomes, 10);
    assert_eq!(ev[6..10], [(create, s("sub/h")), (rename, s("sub/h")), (create, s("sub/h2")), (remove, s("sub/h2"))], "{ev:?}");
    // A watched directory moved within the tree is watched under its new name.
    std::fs::rename(d.join("old"), d.join("moved")).unwrap();
    std::fs::write(d.join("moved/inner/k"), b"").unwrap();
    let ev = watch_events(&mut c, id, &mut outcomes, 13);
    assert_eq!(ev[10..13], [(rename, s("old")), (create, s("moved")), (create, s("moved/inner/k"))], "{ev:?}");

    // Not recursive: only the directory's own entries.
    let flat_ev = watch_events(&mut c, flat, &mut outcomes, 6);
    assert_eq!(flat_ev[..4], [(create, s("f")), (write, s("f")), (chmod, s("f")), (create, s("sub"))], "{flat_ev:?}");
    assert!(flat_ev.iter().all(|(_, n)| !n.contains('/')), "{flat_ev:?}");

    // CANCEL ends it with STREAM_ERROR; the other still reports.
    c.send(CANCEL, 0, flat, &[]);
    while !outcomes.get(&flat).is_some_and(Outcome::done) {
        c.pump(&mut outcomes);
    }
    assert_eq!(outcomes[&flat].error.as_ref().unwrap().0, 3);
    std::fs::write(d.join("after"), b"").unwrap();
    let ev = watch_events(&mut c, id, &mut outcomes, 14);
    assert_eq!(ev[13], (create, s("after")));

    // Removing the watched directory ends the watch with OK (after the removals inside it).
    std::fs::remove_dir_all(&d).unwrap();
    while !outcomes.get(&id).is_some_and(Outcome::done) {
        c.pump(&mut outcomes);
    }
    let o = &outcomes[&id];
    assert!(o.ok.is_some() && o.eof[0], "{:?}", o.error);
    assert!(records(&o.stdout).iter().any(|r| field(r, 1) == [remove] && field(r, 2) == b"after"));
    // Their inotify descriptors are closed.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", agent.child.id())).unwrap().count();
    assert_eq!(fds, fds0, "descriptors left after the watches ended");

    // Errors: missing, a file, not normalised.
    assert_eq!(err_of(&c.fs(FS_WATCH, Fields::new().bytes(1, pbytes(&d)))), (4, Some(2)));
    let f = agent.dir.join("plain");
    std::fs::write(&f, b"").unwrap();
    assert_eq!(err_of(&c.fs(FS_WATCH, Fields::new().bytes(1, pbytes(&f)))), (3, Some(20)));
    assert_eq!(err_of(&c.fs(FS_WATCH, Fields::new().bytes(1, b"/tmp/"))), (1, None));
}

#[test]
fn fs_watch_ends_on_hello_and_overflow() {
    let agent = Agent::start("fs-watch-end");
    let mut c = agent.hello();
    let d = agent.dir.join("w");
    std::fs::create_dir(&d).unwrap();
    let fd_count = || std::fs::read_dir(format!("/proc/{}/fd", agent.child.id())).unwrap().count();
    let fds0 = fd_count();
    // A HELLO drops the watch without a message.
    let id = c.id();
    c.send(FS_WATCH, 0, id, &Fields::new().bytes(1, pbytes(&d)).finish());
    assert!(c.fs(FS_STAT, Fields::new().bytes(1, pbytes(&d))).ok.is_some());
    assert_eq!(fd_count(), fds0 + 1);
    c.send(HELLO, 0, 0, &Fields::new().u16(1, 5).u16(2, 5).finish());
    assert_eq!(c.recv().ty, HELLO_OK);
    std::fs::write(d.join("f"), b"").unwrap();
    let p = c.id();
    c.send(PING, 0, p, b"x");
    let f = c.recv();
    assert_eq!((f.ty, f.stream), (PONG, p), "the watch outlived HELLO: {f:?}");
    assert_eq!(fd_count(), fds0);

    // A host that gives no credit: once over a window and the queue cap, TOO_LARGE.
    c.auto_credit = false;
    let id = c.id();
    c.send(FS_WATCH, 0, id, &Fields::new().bytes(1, pbytes(&d)).finish());
    assert!(c.fs(FS_STAT, Fields::new().bytes(1, pbytes(&d))).ok.is_some());
    let long = "x".repeat(200);
    let mut outcomes = HashMap::new();
    let mut i = 0;
    while !outcomes.get(&id).is_some_and(Outcome::done) {
        for _ in 0..500 {
            std::fs::write(d.join(format!("{i}{long}")), b"").unwrap();
            i += 1;
        }
        assert!(i < 100_000, "no overflow after {i} files");
        while let Some(f) = c.try_recv(Duration::from_millis(10)) {
            let buf = reframe(&f);
            c.buf.splice(0..0, buf);
            c.pump(&mut outcomes);
        }
    }
    let o = &outcomes[&id];
    assert_eq!(err_of(o), (5, None));
    assert!(o.stdout.len() as i64 <= INITIAL_WINDOW);
    assert_eq!(fd_count(), fds0);
}
