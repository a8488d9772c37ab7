//! Frame and field codec of PROTOCOL.md (version 5), plus typed requests and replies. The FS_*
//! requests and their replies have a module of their own (proto_fs.rs).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub const VERSION: u16 = 5;
/// HELLO_OK `features` of this version; `limits` is added when execs run in cgroups.
pub const FEATURES: &str = "exec,files,bench,tty,chain,tcp,workload,background,proxy,fs";
pub const HEADER_LEN: usize = 12;
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest DATA payload the agent sends.
pub const MAX_DATA: usize = 64 * 1024;
pub const INITIAL_WINDOW: u32 = 262_144;

pub const HELLO: u8 = 0x01;
pub const HELLO_OK: u8 = 0x02;
pub const PING: u8 = 0x03;
pub const PONG: u8 = 0x04;
pub const SHUTDOWN: u8 = 0x05;
pub const GOAWAY: u8 = 0x06;
pub const EXEC: u8 = 0x10;
pub const STARTED: u8 = 0x11;
pub const DATA: u8 = 0x12;
pub const WINDOW: u8 = 0x13;
pub const EXIT: u8 = 0x14;
pub const SIGNAL: u8 = 0x15;
pub const STREAM_ERROR: u8 = 0x16;
pub const RESIZE: u8 = 0x17;
pub const CANCEL: u8 = 0x18;
pub const WRITE_FILE: u8 = 0x20;
pub const READ_FILE: u8 = 0x21;
pub const OK: u8 = 0x22;
pub const SPAWN_BENCH: u8 = 0x30;
pub const WORKLOAD_START: u8 = 0x40;
pub const WORKLOAD_SIGNAL: u8 = 0x41;
pub const TCP_CONNECT: u8 = 0x50;
pub const LIST_BACKGROUND: u8 = 0x60;
pub const KILL_BACKGROUND: u8 = 0x61;
pub const PROXY_LISTEN: u8 = 0x70;
pub const PROXY_STOP: u8 = 0x71;
pub const PROXY_CONN: u8 = 0x72;
/// Agent → host, transparent egress only: may the guest resolve this name? (opens an id ≥ 2^31)
pub const RESOLVE: u8 = 0x73;
pub const FS_STAT: u8 = 0x80;
pub const FS_LIST: u8 = 0x81;
pub const FS_MKDIR: u8 = 0x82;
pub const FS_RENAME: u8 = 0x83;
pub const FS_REMOVE: u8 = 0x84;
pub const FS_WATCH: u8 = 0x85;

/// Stream ids from here up are opened by the agent (PROXY_CONN); the host's stay below.
pub const AGENT_STREAM_MIN: u32 = 1 << 31;

/// DATA flag: end of this channel.
pub const FLAG_EOF: u8 = 0x80;
pub const CHANNEL_MASK: u8 = 0x03;
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;

/// STREAM_ERROR / GOAWAY codes.
pub const BAD_REQUEST: u32 = 1;
pub const STREAM_IN_USE: u32 = 2;
pub const IO: u32 = 3;
pub const NOT_FOUND: u32 = 4;
pub const TOO_LARGE: u32 = 5;
pub const UNSUPPORTED: u32 = 6;
pub const VERSION_ERR: u32 = 7;
pub const PROTOCOL: u32 = 8;
pub const REFUSED: u32 = 9;

/// EXEC terminal size when the request gives none.
pub const DEFAULT_COLS: u16 = 80;
pub const DEFAULT_ROWS: u16 = 24;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// A frame header announces more than MAX_PAYLOAD.
    Oversized(u32),
    /// A field runs past the end of the payload.
    TruncatedField,
    /// A known tag with the wrong value length.
    BadLength { tag: u8, len: usize },
    /// A required field is missing or a value is out of range.
    Invalid(&'static str),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Oversized(n) => write!(f, "frame payload of {n} bytes exceeds {MAX_PAYLOAD}"),
            ProtoError::TruncatedField => write!(f, "field runs past the end of the payload"),
            ProtoError::BadLength { tag, len } => write!(f, "field {tag} has invalid length {len}"),
            ProtoError::Invalid(what) => write!(f, "{what}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub ty: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&self.len.to_le_bytes());
        h[4] = self.ty;
        h[5] = self.flags;
        h[8..12].copy_from_slice(&self.stream.to_le_bytes());
        h
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            len: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            ty: b[4],
            flags: b[5],
            stream: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        }
    }
}

/// Looks for one complete frame at the start of `buf`.
/// Ok(None): more bytes needed. Ok(Some((header, total))): the payload is `buf[12..total]`.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Header, usize)>, ProtoError> {
    let Some(head) = buf.get(..HEADER_LEN) else { return Ok(None) };
    let header = Header::decode(head.try_into().expect("12 bytes"));
    if header.len as usize > MAX_PAYLOAD {
        return Err(ProtoError::Oversized(header.len));
    }
    let total = HEADER_LEN + header.len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((header, total)))
}

/// Appends a complete frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    out.extend_from_slice(&Header { len: payload.len() as u32, ty, flags, stream }.encode());
    out.extend_from_slice(payload);
}

// ---------------------------------------------------------------------------------------------
// Fields

#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    pub tag: u8,
    pub value: &'a [u8],
}

impl<'a> Field<'a> {
    fn fixed<const N: usize>(&self) -> Result<[u8; N], ProtoError> {
        self.value.try_into().map_err(|_| ProtoError::BadLength { tag: self.tag, len: self.value.len() })
    }
    pub fn u8(&self) -> Result<u8, ProtoError> {
        Ok(self.fixed::<1>()?[0])
    }
    pub fn u16(&self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.fixed()?))
    }
    pub fn u32(&self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.fixed()?))
    }
    #[allow(dead_code)] // the agent only sends i32 fields; kept for a complete codec
    pub fn i32(&self) -> Result<i32, ProtoError> {
        Ok(i32::from_le_bytes(self.fixed()?))
    }
    pub fn u64(&self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.fixed()?))
    }
    #[allow(dead_code)] // the agent only sends u64[] fields; kept for a complete codec
    pub fn u64s(&self) -> Result<Vec<u64>, ProtoError> {
        if !self.value.len().is_multiple_of(8) {
            return Err(ProtoError::BadLength { tag: self.tag, len: self.value.len() });
        }
        Ok(self.value.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
    }
}

/// Iterates over the fields of a control payload.
pub struct Fields<'a> {
    rest: &'a [u8],
}

pub fn fields(payload: &[u8]) -> Fields<'_> {
    Fields { rest: payload }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, ProtoError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        if self.rest.len() < 5 {
            self.rest = &[];
            return Some(Err(ProtoError::TruncatedField));
        }
        let tag = self.rest[0];
        let len = u32::from_le_bytes([self.rest[1], self.rest[2], self.rest[3], self.rest[4]]) as usize;
        let body = &self.rest[5..];
        if body.len() < len {
            self.rest = &[];
            return Some(Err(ProtoError::TruncatedField));
        }
        self.rest = &body[len..];
        Some(Ok(Field { tag, value: &body[..len] }))
    }
}

/// Builds a control payload.
#[derive(Default)]
pub struct FieldWriter {
    buf: Vec<u8>,
}

impl FieldWriter {
    pub fn new() -> FieldWriter {
        FieldWriter::default()
    }
    pub fn bytes(mut self, tag: u8, value: &[u8]) -> Self {
        self.buf.push(tag);
        self.buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(value);
        self
    }
    pub fn u8(self, tag: u8, v: u8) -> Self {
        self.bytes(tag, &[v])
    }
    pub fn u16(self, tag: u8, v: u16) -> Self {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn u32(self, tag: u8, v: u32) -> Self {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn i32(self, tag: u8, v: i32) -> Self {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn i64(self, tag: u8, v: i64) -> Self {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn u64(self, tag: u8, v: u64) -> Self {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn u64s(self, tag: u8, v: &[u64]) -> Self {
        let packed: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.bytes(tag, &packed)
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

// ---------------------------------------------------------------------------------------------
// Typed requests (host → agent)

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    pub host_time_ns: Option<u64>,
    pub entropy: Vec<u8>,
    /// The VM id the host gives this VM (primary port, PID-1 mode): a new one makes a new
    /// identity (identity.rs).
    pub vm_id: Option<Vec<u8>>,
}

/// Longest `vm_id` a HELLO may carry.
pub const MAX_VM_ID: usize = 64;

/// A VM id is 1 to 64 characters of `[A-Za-z0-9._-]`: it becomes a file's content.
pub fn valid_vm_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_VM_ID && id.iter().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

impl Hello {
    pub fn parse(payload: &[u8]) -> Result<Hello, ProtoError> {
        let mut h = Hello { version_min: VERSION, version_max: VERSION, host_time_ns: None, entropy: Vec::new(), vm_id: None };
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => h.version_min = f.u16()?,
                2 => h.version_max = f.u16()?,
                3 => h.host_time_ns = Some(f.u64()?),
                4 => h.entropy = f.value.iter().copied().take(256).collect(),
                5 if valid_vm_id(f.value) => h.vm_id = Some(f.value.to_vec()),
                5 => return Err(ProtoError::Invalid("vm_id must be 1 to 64 characters of [A-Za-z0-9._-]")),
                _ => {}
            }
        }
        Ok(h)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
    pub cwd: Option<Vec<u8>>,
    pub timeout_ms: u64,
    pub uid: u32,
    pub gid: u32,
    pub stdin_pipe: bool,
    pub tty: bool,
    pub cols: u16,
    pub rows: u16,
    /// argv of the chained command; empty: no chain.
    pub chain: Vec<Vec<u8>>,
    /// pids.max of the exec's cgroup (None: the agent's default).
    pub pids_max: Option<u64>,
    /// memory.max of the exec's cgroup, bytes (None: the agent's default).
    pub memory_max: Option<u64>,
    /// Processes it leaves running survive a KILL_BACKGROUND that does not name it.
    pub detach: bool,
    /// The host does not wait for STARTED: it leaves with the exec's next frame.
    pub started_with_next: bool,
}

impl Default for Exec {
    fn default() -> Exec {
        Exec {
            argv: Vec::new(),
            env: Vec::new(),
            cwd: None,
            timeout_ms: 0,
            uid: 0,
            gid: 0,
            stdin_pipe: false,
            tty: false,
            cols: DEFAULT_COLS,
            rows: DEFAULT_ROWS,
            chain: Vec::new(),
            pids_max: None,
            memory_max: None,
            detach: false,
            started_with_next: false,
        }
    }
}

pub fn flag(f: &Field, what: &'static str) -> Result<bool, ProtoError> {
    match f.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ProtoError::Invalid(what)),
    }
}

impl Exec {
    pub fn parse(payload: &[u8]) -> Result<Exec, ProtoError> {
        let mut e = Exec::default();
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => e.argv.push(f.value.to_vec()),
                2 => e.env.push(f.value.to_vec()),
                3 => e.cwd = Some(f.value.to_vec()),
                4 => e.timeout_ms = f.u64()?,
                5 => e.uid = f.u32()?,
                6 => e.gid = f.u32()?,
                7 => e.stdin_pipe = flag(&f, "stdin must be 0 or 1")?,
                8 => e.tty = flag(&f, "tty must be 0 or 1")?,
                // 0 is no size at all: the default stands.
                9 => e.cols = Some(f.u16()?).filter(|&c| c > 0).unwrap_or(DEFAULT_COLS),
                10 => e.rows = Some(f.u16()?).filter(|&r| r > 0).unwrap_or(DEFAULT_ROWS),
                11 => e.chain.push(f.value.to_vec()),
                12 => e.pids_max = Some(f.u32()? as u64).filter(|&n| n > 0),
                13 => e.memory_max = Some(f.u64()?).filter(|&n| n > 0),
                14 => e.detach = flag(&f, "detach must be 0 or 1")?,
                15 => e.started_with_next = flag(&f, "started_with_next must be 0 or 1")?,
                _ => {}
            }
        }
        if e.argv.is_empty() || e.argv[0].is_empty() {
            return Err(ProtoError::Invalid("argv is empty"));
        }
        if e.chain.first().is_some_and(|a| a.is_empty()) {
            return Err(ProtoError::Invalid("chain argv[0] is empty"));
        }
        Ok(e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub signum: u32,
    pub group: bool,
}

impl Signal {
    pub fn parse(payload: &[u8]) -> Result<Signal, ProtoError> {
        let mut signum = None;
        let mut group = false;
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => signum = Some(f.u32()?),
                2 => group = f.u8()? != 0,
                _ => {}
            }
        }
        let signum = signum.ok_or(ProtoError::Invalid("signum missing"))?;
        Ok(Signal { signum, group })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFile {
    pub path: Vec<u8>,
    pub mode: u32,
    pub size: Option<u64>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mkdirs: bool,
}

impl WriteFile {
    pub fn parse(payload: &[u8]) -> Result<WriteFile, ProtoError> {
        let mut w = WriteFile { path: Vec::new(), mode: 0o644, size: None, uid: None, gid: None, mkdirs: true };
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => w.path = f.value.to_vec(),
                2 => w.mode = f.u32()? & 0o7777,
                3 => w.size = Some(f.u64()?),
                4 => w.uid = Some(f.u32()?),
                5 => w.gid = Some(f.u32()?),
                6 => w.mkdirs = f.u8()? != 0,
                _ => {}
            }
        }
        if w.path.first() != Some(&b'/') {
            return Err(ProtoError::Invalid("path must be absolute"));
        }
        Ok(w)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFile {
    pub path: Vec<u8>,
    pub max_size: u64,
}

impl ReadFile {
    pub fn parse(payload: &[u8]) -> Result<ReadFile, ProtoError> {
        let mut r = ReadFile { path: Vec::new(), max_size: 0 };
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => r.path = f.value.to_vec(),
                2 => r.max_size = f.u64()?,
                _ => {}
            }
        }
        if r.path.is_empty() {
            return Err(ProtoError::Invalid("path missing"));
        }
        Ok(r)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnBench {
    pub argv: Vec<Vec<u8>>,
    pub count: u32,
    pub env: Vec<Vec<u8>>,
}

impl SpawnBench {
    pub fn parse(payload: &[u8]) -> Result<SpawnBench, ProtoError> {
        let mut b = SpawnBench { argv: Vec::new(), count: 1, env: Vec::new() };
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => b.argv.push(f.value.to_vec()),
                2 => b.count = f.u32()?,
                3 => b.env.push(f.value.to_vec()),
                _ => {}
            }
        }
        if b.argv.is_empty() || b.argv[0].is_empty() {
            return Err(ProtoError::Invalid("argv is empty"));
        }
        Ok(b)
    }
}

/// RESIZE: a zero (or missing) dimension makes the request one to ignore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resize {
    pub cols: u16,
    pub rows: u16,
}

impl Resize {
    pub fn parse(payload: &[u8]) -> Result<Resize, ProtoError> {
        let mut r = Resize { cols: 0, rows: 0 };
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => r.cols = f.u16()?,
                2 => r.rows = f.u16()?,
                _ => {}
            }
        }
        Ok(r)
    }

    pub fn is_valid(&self) -> bool {
        self.cols > 0 && self.rows > 0
    }
}

fn parse_ip(v: &[u8]) -> Result<IpAddr, ProtoError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProtoError::Invalid("addr is not an IPv4 or IPv6 literal"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConnect {
    pub addr: SocketAddr,
}

impl TcpConnect {
    pub fn parse(payload: &[u8]) -> Result<TcpConnect, ProtoError> {
        let mut port = 0;
        let mut ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => port = f.u16()?,
                2 => ip = parse_ip(f.value)?,
                _ => {}
            }
        }
        if port == 0 {
            return Err(ProtoError::Invalid("port must be 1 to 65535"));
        }
        Ok(TcpConnect { addr: SocketAddr::new(ip, port) })
    }
}

/// PROXY_LISTEN limits (PROTOCOL.md).
pub const MAX_PROXY_ENV: usize = 64;
pub const MAX_PROXY_ENV_LEN: usize = 4096;
pub const DEFAULT_PROXY_STREAMS: u32 = 256;
pub const MAX_PROXY_STREAMS: u32 = 4096;

/// How the guest's programs reach the proxy listener (PROXY_LISTEN field 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// 0: they connect to it themselves, told by the `env` entries (http_proxy and the like).
    Proxy,
    /// 1: every TCP connection to a non-loopback address is steered to it (`transparent.rs`).
    Transparent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyListen {
    /// Port 0 (transparent mode only) binds an ephemeral port.
    pub addr: SocketAddr,
    pub mode: ProxyMode,
    /// `KEY=VALUE` entries to add to the environment of every EXEC and WORKLOAD_START.
    pub env: Vec<Vec<u8>>,
    /// How many PROXY_CONN streams may be open at once (1..=MAX_PROXY_STREAMS).
    pub max_streams: u32,
}

/// The `KEY` of an environment entry: up to the first `=` (the whole entry without one).
pub fn env_key(entry: &[u8]) -> &[u8] {
    entry.iter().position(|&c| c == b'=').map_or(entry, |i| &entry[..i])
}

impl ProxyListen {
    pub fn parse(payload: &[u8]) -> Result<ProxyListen, ProtoError> {
        let mut port = 0;
        let mut ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut env = Vec::new();
        let mut max_streams = DEFAULT_PROXY_STREAMS;
        let mut mode = ProxyMode::Proxy;
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => port = f.u16()?,
                2 => ip = parse_ip(f.value)?,
                3 => {
                    if env.len() == MAX_PROXY_ENV {
                        return Err(ProtoError::Invalid("more than 64 env entries"));
                    }
                    if f.value.len() > MAX_PROXY_ENV_LEN {
                        return Err(ProtoError::Invalid("an env entry is longer than 4096 bytes"));
                    }
                    let key_len = f.value.iter().position(|&c| c == b'=');
                    if !matches!(key_len, Some(n) if n > 0) {
                        return Err(ProtoError::Invalid("an env entry is not KEY=VALUE with a non-empty KEY"));
                    }
                    env.push(f.value.to_vec());
                }
                4 => {
                    max_streams = match f.u32()? {
                        0 => DEFAULT_PROXY_STREAMS,
                        n if n <= MAX_PROXY_STREAMS => n,
                        _ => return Err(ProtoError::Invalid("max_streams must be at most 4096")),
                    }
                }
                5 => {
                    mode = match f.u8()? {
                        0 => ProxyMode::Proxy,
                        1 => ProxyMode::Transparent,
                        _ => return Err(ProtoError::Invalid("mode must be 0 (proxy) or 1 (transparent)")),
                    }
                }
                _ => {}
            }
        }
        if port == 0 && mode == ProxyMode::Proxy {
            return Err(ProtoError::Invalid("port must be 1 to 65535"));
        }
        Ok(ProxyListen { addr: SocketAddr::new(ip, port), mode, env, max_streams })
    }
}

/// A KILL_BACKGROUND request, decoded: which leftovers to kill (the process table acts on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillTarget {
    /// One exec's, detached or not.
    Exec(u32),
    /// Every exec's that was not started with `detach`.
    Attached,
    /// Every exec's.
    All,
}

/// KILL_BACKGROUND: `1 id: u32` (one exec's leftovers, detached or not) or, without it,
/// `2 all: u8` (1: detached execs' too; default 0).
pub fn parse_kill_background(payload: &[u8]) -> Result<KillTarget, ProtoError> {
    let mut id = None;
    let mut all = false;
    for f in fields(payload) {
        let f = f?;
        match f.tag {
            1 => id = Some(f.u32()?),
            2 => all = flag(&f, "all must be 0 or 1")?,
            _ => {}
        }
    }
    Ok(match id {
        Some(id) => KillTarget::Exec(id),
        None if all => KillTarget::All,
        None => KillTarget::Attached,
    })
}

/// WINDOW payload: a bare u32 increment.
pub fn parse_window(payload: &[u8]) -> Result<u32, ProtoError> {
    let b: [u8; 4] = payload.try_into().map_err(|_| ProtoError::BadLength { tag: 0, len: payload.len() })?;
    Ok(u32::from_le_bytes(b))
}

// ---------------------------------------------------------------------------------------------
// Replies (agent → host)

/// HELLO_OK; `port` is the virtio port's name (None in development mode), `vm_id` the VM id
/// the guest has taken (None when it has none, or HELLO carried none); `limits` the default
/// (pids.max, memory.max) of an exec's cgroup, when execs run in cgroups.
pub fn hello_ok(agent_version: &str, uptime_ms: u64, port: Option<&str>, vm_id: Option<&[u8]>, limits: Option<(u64, u64)>) -> Vec<u8> {
    let features = if limits.is_some() { format!("{FEATURES},limits") } else { FEATURES.to_string() };
    let mut w = FieldWriter::new()
        .u16(1, VERSION)
        .bytes(2, agent_version.as_bytes())
        .u64(3, uptime_ms)
        .bytes(4, features.as_bytes());
    if let Some(p) = port {
        w = w.bytes(5, p.as_bytes());
    }
    if let Some(id) = vm_id {
        w = w.bytes(6, id);
    }
    if let Some((pids, memory)) = limits {
        w = w.u32(7, pids.min(u32::MAX as u64) as u32).u64(8, memory);
    }
    w.finish()
}

/// STREAM_ERROR / GOAWAY fields; `errno` when a system call is behind the error.
pub fn error_fields(code: u32, message: &str, errno: Option<i32>) -> Vec<u8> {
    let w = FieldWriter::new().u32(1, code).bytes(2, message.as_bytes());
    match errno {
        Some(n) if n > 0 => w.u32(3, n as u32),
        _ => w,
    }
    .finish()
}

/// STARTED; `exec_id` names the exec's cgroup (and its leftovers), when it has one.
pub fn started(pid: u32, exec_id: Option<u32>) -> Vec<u8> {
    let w = FieldWriter::new().u32(1, pid);
    match exec_id {
        Some(id) => w.u32(2, id),
        None => w,
    }
    .finish()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    pub exit_code: i32,
    pub signal: u32,
    pub timed_out: bool,
    pub peak_rss_kib: u64,
    pub duration_us: u64,
    /// 0: the first command, 1: the chained one.
    pub step: u8,
    /// The OOM killer took the exec (its cgroup's memory.max was reached).
    pub oom_killed: bool,
    /// A fork of the exec failed at its cgroup's pids.max.
    pub pids_limited: bool,
}

impl ExitInfo {
    pub fn encode(&self) -> Vec<u8> {
        FieldWriter::new()
            .i32(1, self.exit_code)
            .u32(2, self.signal)
            .u8(3, self.timed_out as u8)
            .u64(4, self.peak_rss_kib)
            .u64(5, self.duration_us)
            .u8(6, self.step)
            .u8(7, self.oom_killed as u8)
            .u8(8, self.pids_limited as u8)
            .finish()
    }
}

pub fn ok_size(size: u64) -> Vec<u8> {
    FieldWriter::new().u64(1, size).finish()
}

pub fn ok_pid(pid: u32) -> Vec<u8> {
    FieldWriter::new().u32(3, pid).finish()
}

/// OK to PROXY_LISTEN: the port bound.
pub fn ok_port(port: u16) -> Vec<u8> {
    FieldWriter::new().u16(1, port).finish()
}

/// PROXY_CONN: the guest client's source port, and in transparent mode the address and port
/// it connected to (the address as 4 or 16 raw bytes).
/// PROXY_CONN's fields: the client's port and, in transparent mode, its destination and the name
/// the destination stands for when it is one of the agent's fake addresses.
pub fn proxy_conn(peer_port: u16, dst: Option<SocketAddr>, name: Option<&str>) -> Vec<u8> {
    let w = FieldWriter::new().u16(1, peer_port);
    let w = match dst {
        None => w,
        Some(SocketAddr::V4(a)) => w.bytes(2, &a.ip().octets()).u16(3, a.port()),
        Some(SocketAddr::V6(a)) => w.bytes(2, &a.ip().octets()).u16(3, a.port()),
    };
    match name {
        Some(n) => w.bytes(4, n.as_bytes()).finish(),
        None => w.finish(),
    }
}

/// RESOLVE's fields: `1 name` (lowercase, dotted), `2 qtype`.
pub fn resolve(name: &str, qtype: u16) -> Vec<u8> {
    FieldWriter::new().bytes(1, name.as_bytes()).u16(2, qtype).finish()
}

/// The host's answer to a RESOLVE (its OK): `1 verdict` (0 allow, 1 nxdomain, 2 refused,
/// 3 servfail) and `2 ttl` in seconds. Ports (field 3) are for a later step and ignored here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolveAnswer {
    pub verdict: u8,
    pub ttl: u32,
}

impl ResolveAnswer {
    pub fn parse(payload: &[u8]) -> Result<ResolveAnswer, ProtoError> {
        let mut a = ResolveAnswer { verdict: 3, ttl: 0 };
        let mut seen = false;
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => {
                    a.verdict = f.u8()?;
                    seen = true;
                }
                2 => a.ttl = f.u32()?,
                _ => {}
            }
        }
        if !seen || a.verdict > 3 {
            return Err(ProtoError::Invalid("a RESOLVE answer needs verdict 0-3"));
        }
        Ok(a)
    }
}

pub fn ok_killed(count: u32) -> Vec<u8> {
    FieldWriter::new().u32(4, count).finish()
}

pub fn ok_samples(samples: &[u64]) -> Vec<u8> {
    FieldWriter::new().u64s(2, samples).finish()
}

pub fn window(increment: u32) -> [u8; 4] {
    increment.to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header { len: 77, ty: EXEC, flags: 0x81, stream: 0xdead_beef };
        let enc = h.encode();
        assert_eq!(enc[6..8], [0, 0]);
        assert_eq!(Header::decode(&enc), h);
    }

    #[test]
    fn frame_round_trip_and_partial() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, PING, 0, 7, b"hello");
        encode_frame(&mut buf, DATA, FLAG_EOF | STDOUT, 9, b"");
        let (h, total) = decode_frame(&buf).unwrap().unwrap();
        assert_eq!((h.ty, h.stream, h.len, total), (PING, 7, 5, 17));
        assert_eq!(&buf[HEADER_LEN..total], b"hello");
        let (h2, total2) = decode_frame(&buf[total..]).unwrap().unwrap();
        assert_eq!((h2.ty, h2.flags, h2.len, total2), (DATA, 0x81, 0, 12));
        // Every strict prefix of a frame is "need more".
        for cut in 0..total {
            assert_eq!(decode_frame(&buf[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn oversized_frame_is_an_error() {
        let h = Header { len: MAX_PAYLOAD as u32 + 1, ty: DATA, flags: 0, stream: 1 }.encode();
        assert_eq!(decode_frame(&h), Err(ProtoError::Oversized(MAX_PAYLOAD as u32 + 1)));
        let h = Header { len: MAX_PAYLOAD as u32, ty: DATA, flags: 0, stream: 1 }.encode();
        assert_eq!(decode_frame(&h), Ok(None));
    }

    #[test]
    fn fields_round_trip() {
        let p = FieldWriter::new()
            .bytes(1, b"echo")
            .bytes(1, b"hi")
            .bytes(2, b"PATH=/bin")
            .u64(4, 300)
            .u32(5, 1000)
            .u8(7, 1)
            .finish();
        let e = Exec::parse(&p).unwrap();
        assert_eq!(e.argv, vec![b"echo".to_vec(), b"hi".to_vec()]);
        assert_eq!(e.env, vec![b"PATH=/bin".to_vec()]);
        assert_eq!((e.timeout_ms, e.uid, e.gid, e.stdin_pipe, e.cwd), (300, 1000, 0, true, None));
        let x = ExitInfo { exit_code: -1, signal: 9, timed_out: true, peak_rss_kib: 5, duration_us: 6, step: 1, oom_killed: true, pids_limited: true };
        let mut got = ExitInfo::default();
        for f in fields(&x.encode()) {
            let f = f.unwrap();
            match f.tag {
                1 => got.exit_code = f.i32().unwrap(),
                2 => got.signal = f.u32().unwrap(),
                3 => got.timed_out = f.u8().unwrap() == 1,
                4 => got.peak_rss_kib = f.u64().unwrap(),
                5 => got.duration_us = f.u64().unwrap(),
                6 => got.step = f.u8().unwrap(),
                7 => got.oom_killed = f.u8().unwrap() == 1,
                8 => got.pids_limited = f.u8().unwrap() == 1,
                _ => panic!(),
            }
        }
        assert_eq!(got, x);
        let s = ok_samples(&[1, 2, u64::MAX]);
        let f = fields(&s).next().unwrap().unwrap();
        assert_eq!(f.u64s().unwrap(), vec![1, 2, u64::MAX]);
    }

    #[test]
    fn unknown_tags_are_ignored() {
        let p = FieldWriter::new().bytes(200, b"future").bytes(1, b"true").u64(99, 1).finish();
        assert_eq!(Exec::parse(&p).unwrap().argv, vec![b"true".to_vec()]);
        let h = Hello::parse(&FieldWriter::new().u16(1, 1).bytes(42, &[0; 3]).u16(2, 3).finish()).unwrap();
        assert_eq!((h.version_min, h.version_max), (1, 3));
    }

    #[test]
    fn hello_vm_id() {
        let h = Hello::parse(&FieldWriter::new().bytes(5, b"6f1c-Ab_9.x").finish()).unwrap();
        assert_eq!(h.vm_id.as_deref(), Some(&b"6f1c-Ab_9.x"[..]));
        assert_eq!(Hello::parse(&[]).unwrap().vm_id, None);
        for bad in [&b""[..], b"a/b", b"a b", b"../x", b"x\n", &[b'a'; MAX_VM_ID + 1]] {
            assert!(Hello::parse(&FieldWriter::new().bytes(5, bad).finish()).is_err(), "{bad:?}");
        }
        assert!(Hello::parse(&FieldWriter::new().bytes(5, &[b'a'; MAX_VM_ID]).finish()).is_ok());
    }

    #[test]
    fn truncated_and_malformed_fields() {
        let p = FieldWriter::new().bytes(1, b"echo").finish();
        for cut in 1..p.len() {
            assert_eq!(Exec::parse(&p[..cut]), Err(ProtoError::TruncatedField), "cut at {cut}");
        }
        let bad = FieldWriter::new().bytes(1, b"x").bytes(4, &[1, 2, 3]).finish();
        assert_eq!(Exec::parse(&bad), Err(ProtoError::BadLength { tag: 4, len: 3 }));
        assert!(Exec::parse(&[]).is_err());
        assert!(WriteFile::parse(&FieldWriter::new().bytes(1, b"rel").finish()).is_err());
        assert!(parse_window(&[1, 2, 3]).is_err());
        assert_eq!(parse_window(&5u32.to_le_bytes()), Ok(5));
        let bad_u64s = FieldWriter::new().bytes(2, &[0; 9]).finish();
        assert!(fields(&bad_u64s).next().unwrap().unwrap().u64s().is_err());
    }

    #[test]
    fn exec_v2_fields() {
        let p = FieldWriter::new()
            .bytes(1, b"sh")
            .u8(8, 1)
            .u16(9, 132)
            .u16(10, 43)
            .bytes(11, b"echo")
            .bytes(11, b"second")
            .finish();
        let e = Exec::parse(&p).unwrap();
        assert!(e.tty);
        assert_eq!((e.cols, e.rows), (132, 43));
        assert_eq!(e.chain, vec![b"echo".to_vec(), b"second".to_vec()]);
        // Defaults: pipes, 80x24, no chain; a zero size keeps the default.
        let e = Exec::parse(&FieldWriter::new().bytes(1, b"true").u16(9, 0).finish()).unwrap();
        assert_eq!((e.tty, e.cols, e.rows, e.chain.len()), (false, DEFAULT_COLS, DEFAULT_ROWS, 0));
        assert!(Exec::parse(&FieldWriter::new().bytes(1, b"true").u8(8, 2).finish()).is_err());
        assert!(Exec::parse(&FieldWriter::new().bytes(1, b"true").bytes(9, &[80]).finish()).is_err());
        assert!(Exec::parse(&FieldWriter::new().bytes(1, b"true").bytes(11, b"").finish()).is_err());
    }

    #[test]
    fn exec_v3_limits_and_kill_targets() {
        let p = FieldWriter::new().bytes(1, b"sh").u32(12, 100).u64(13, 64 << 20).u8(14, 1).finish();
        let e = Exec::parse(&p).unwrap();
        assert_eq!((e.pids_max, e.memory_max, e.detach), (Some(100), Some(64 << 20), true));
        // 0 (or absent) is the default.
        let e = Exec::parse(&FieldWriter::new().bytes(1, b"sh").u32(12, 0).u64(13, 0).finish()).unwrap();
        assert_eq!((e.pids_max, e.memory_max, e.detach), (None, None, false));
        assert!(!e.started_with_next);
        assert!(Exec::parse(&FieldWriter::new().bytes(1, b"sh").u8(14, 2).finish()).is_err());
        assert!(Exec::parse(&FieldWriter::new().bytes(1, b"sh").u64(12, 1).finish()).is_err());
        assert_eq!(parse_kill_background(&[]), Ok(KillTarget::Attached));
        assert_eq!(parse_kill_background(&FieldWriter::new().u8(2, 1).finish()), Ok(KillTarget::All));
        assert_eq!(parse_kill_background(&FieldWriter::new().u32(1, 9).u8(2, 1).finish()), Ok(KillTarget::Exec(9)));
        assert!(parse_kill_background(&FieldWriter::new().u8(1, 9).finish()).is_err());
    }

    #[test]
    fn resize_and_tcp_connect() {
        let r = Resize::parse(&FieldWriter::new().u16(1, 100).u16(2, 30).finish()).unwrap();
        assert_eq!(r, Resize { cols: 100, rows: 30 });
        assert!(r.is_valid());
        assert!(!Resize::parse(&FieldWriter::new().u16(1, 100).finish()).unwrap().is_valid());
        assert!(Resize::parse(&FieldWriter::new().bytes(1, &[1]).finish()).is_err());

        let t = TcpConnect::parse(&FieldWriter::new().u16(1, 8080).finish()).unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        let t = TcpConnect::parse(&FieldWriter::new().u16(1, 22).bytes(2, b"::1").finish()).unwrap();
        assert_eq!(t.addr, "[::1]:22".parse().unwrap());
        let t = TcpConnect::parse(&FieldWriter::new().bytes(2, b"10.0.0.2").u16(1, 65535).finish()).unwrap();
        assert_eq!(t.addr, "10.0.0.2:65535".parse().unwrap());
        assert!(TcpConnect::parse(&[]).is_err());
        assert!(TcpConnect::parse(&FieldWriter::new().u16(1, 0).finish()).is_err());
        assert!(TcpConnect::parse(&FieldWriter::new().u16(1, 80).bytes(2, b"localhost").finish()).is_err());
        assert!(TcpConnect::parse(&FieldWriter::new().u32(1, 80).finish()).is_err());
    }

    #[test]
    fn v2_replies() {
        let parse = |p: &[u8]| fields(p).map(|f| f.map(|f| (f.tag, f.value.to_vec()))).collect::<Result<Vec<_>, _>>().unwrap();
        let ok = parse(&hello_ok("0.1.0", 5, Some("supermachine.1"), None, None));
        assert_eq!(ok[0], (1, VERSION.to_le_bytes().to_vec()));
        assert_eq!(ok[3], (4, b"exec,files,bench,tty,chain,tcp,workload,background,proxy,fs".to_vec()));
        assert_eq!(ok[4], (5, b"supermachine.1".to_vec()));
        assert_eq!(parse(&hello_ok("0.1.0", 5, None, None, None)).len(), 4);
        assert_eq!(parse(&hello_ok("0.1.0", 5, None, Some(b"vm-1"), None))[4], (6, b"vm-1".to_vec()));
        let ok = parse(&hello_ok("0.1.0", 5, None, None, Some((474, 1 << 28))));
        assert_eq!(ok[3], (4, b"exec,files,bench,tty,chain,tcp,workload,background,proxy,fs,limits".to_vec()));
        assert_eq!(ok[4], (7, 474u32.to_le_bytes().to_vec()));
        assert_eq!(ok[5], (8, (1u64 << 28).to_le_bytes().to_vec()));
        assert_eq!(parse(&started(7, Some(3))), vec![(1, 7u32.to_le_bytes().to_vec()), (2, 3u32.to_le_bytes().to_vec())]);
        assert_eq!(parse(&started(7, None)).len(), 1);
        let e = parse(&error_fields(REFUSED, "refused", Some(111)));
        assert_eq!(e, vec![(1, 9u32.to_le_bytes().to_vec()), (2, b"refused".to_vec()), (3, 111u32.to_le_bytes().to_vec())]);
        assert_eq!(parse(&error_fields(BAD_REQUEST, "x", None)).len(), 2);
    }

    #[test]
    fn proxy_listen() {
        let p = ProxyListen::parse(&FieldWriter::new().u16(1, 3128).finish()).unwrap();
        assert_eq!(p, ProxyListen { addr: "127.0.0.1:3128".parse().unwrap(), mode: ProxyMode::Proxy, env: vec![], max_streams: DEFAULT_PROXY_STREAMS });
        // Transparent mode may leave the port to the kernel.
        let t = ProxyListen::parse(&FieldWriter::new().u8(5, 1).finish()).unwrap();
        assert_eq!((t.mode, t.addr), (ProxyMode::Transparent, "127.0.0.1:0".parse().unwrap()));
        assert_eq!(ProxyListen::parse(&FieldWriter::new().u16(1, 9).u8(5, 0).finish()).unwrap().mode, ProxyMode::Proxy);
        let p = ProxyListen::parse(
            &FieldWriter::new()
                .bytes(2, b"::1")
                .u16(1, 65535)
                .bytes(3, b"http_proxy=http://127.0.0.1:3128")
                .bytes(3, b"NO_PROXY=")
                .u32(4, 2)
                .bytes(99, b"future")
                .finish(),
        )
        .unwrap();
        assert_eq!(p.addr, "[::1]:65535".parse().unwrap());
        assert_eq!(p.env, vec![b"http_proxy=http://127.0.0.1:3128".to_vec(), b"NO_PROXY=".to_vec()]);
        assert_eq!(p.max_streams, 2);
        // 0 is the default; the limits are inclusive.
        assert_eq!(ProxyListen::parse(&FieldWriter::new().u16(1, 1).u32(4, 0).finish()).unwrap().max_streams, DEFAULT_PROXY_STREAMS);
        assert_eq!(ProxyListen::parse(&FieldWriter::new().u16(1, 1).u32(4, 4096).finish()).unwrap().max_streams, 4096);
        let mut w = FieldWriter::new().u16(1, 80);
        for i in 0..MAX_PROXY_ENV {
            w = w.bytes(3, format!("K{i}=v").as_bytes());
        }
        let long = [b"K=".to_vec(), vec![b'v'; MAX_PROXY_ENV_LEN - 2]].concat();
        assert_eq!(ProxyListen::parse(&w.finish()).unwrap().env.len(), MAX_PROXY_ENV);
        assert!(ProxyListen::parse(&FieldWriter::new().u16(1, 80).bytes(3, &long).finish()).is_ok());

        let mut too_many = FieldWriter::new().u16(1, 80);
        for _ in 0..=MAX_PROXY_ENV {
            too_many = too_many.bytes(3, b"A=b");
        }
        let too_long = [long.clone(), b"v".to_vec()].concat();
        let bad: Vec<Vec<u8>> = vec![
            vec![],                                                    // no port
            FieldWriter::new().u16(1, 0).finish(),                     // port 0
            FieldWriter::new().u32(1, 80).finish(),                    // port of the wrong width
            FieldWriter::new().u16(1, 80).bytes(2, b"localhost").finish(), // not a literal
            FieldWriter::new().u16(1, 80).bytes(2, b"").finish(),
            FieldWriter::new().u16(1, 80).bytes(3, b"NOEQUALS").finish(),
            FieldWriter::new().u16(1, 80).bytes(3, b"=value").finish(),
            FieldWriter::new().u16(1, 80).bytes(3, b"").finish(),
            FieldWriter::new().u16(1, 80).bytes(3, &too_long).finish(),
            too_many.finish(),
            FieldWriter::new().u16(1, 80).u32(4, 4097).finish(),
            FieldWriter::new().u16(1, 80).u16(4, 2).finish(),
            FieldWriter::new().u16(1, 80).bytes(3, b"A=b").finish()[..8].to_vec(), // truncated
            FieldWriter::new().u8(5, 0).finish(),                      // proxy mode needs a port
            FieldWriter::new().u16(1, 80).u8(5, 2).finish(),           // no such mode
            FieldWriter::new().u16(1, 80).u16(5, 1).finish(),          // mode of the wrong width
        ];
        for (i, p) in bad.iter().enumerate() {
            assert!(ProxyListen::parse(p).is_err(), "case {i}: {p:?}");
        }
        assert_eq!(env_key(b"A=b=c"), b"A");
        assert_eq!(env_key(b"A="), b"A");
        assert_eq!(env_key(b"A"), b"A");
    }

    #[test]
    fn v4_replies() {
        let parse = |p: &[u8]| fields(p).map(|f| f.map(|f| (f.tag, f.value.to_vec()))).collect::<Result<Vec<_>, _>>().unwrap();
        assert_eq!(VERSION, 5);
        assert_eq!(parse(&ok_port(3128)), vec![(1, 3128u16.to_le_bytes().to_vec())]);
        assert_eq!(parse(&proxy_conn(40_001, None, None)), vec![(1, 40_001u16.to_le_bytes().to_vec())]);
        assert_eq!(
            parse(&proxy_conn(40_001, Some("203.0.113.5:443".parse().unwrap()), None)),
            vec![(1, 40_001u16.to_le_bytes().to_vec()), (2, vec![203, 0, 113, 5]), (3, 443u16.to_le_bytes().to_vec())]
        );
        assert_eq!(parse(&proxy_conn(1, Some("[2001:db8::1]:22".parse().unwrap()), None))[1].1.len(), 16);
        assert_eq!(parse(&proxy_conn(1, Some("198.18.0.1:80".parse().unwrap()), Some("web.test")))[3], (4, b"web.test".to_vec()));
        assert_eq!(parse(&resolve("web.test", 28)), vec![(1, b"web.test".to_vec()), (2, 28u16.to_le_bytes().to_vec())]);
        let ok = FieldWriter::new().u8(1, 0).u32(2, 30).u16(3, 80).finish();
        assert_eq!(ResolveAnswer::parse(&ok).unwrap(), ResolveAnswer { verdict: 0, ttl: 30 });
        assert!(ResolveAnswer::parse(&[]).is_err(), "no verdict");
        assert!(ResolveAnswer::parse(&FieldWriter::new().u8(1, 4).finish()).is_err(), "unknown verdict");
    }
}
