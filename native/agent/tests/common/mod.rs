//! What the agent's integration tests share: the message types of PROTOCOL.md section 4 and a
//! builder for control payloads (section 2), written from the document, not from the agent's
//! own `proto.rs`, so that the tests check the agent against the specification. `sock` has the
//! socket options they need that std cannot set safely.
#![allow(dead_code)]

#[allow(unsafe_code)]
pub mod sock;

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
pub const FS_STAT: u8 = 0x80;
pub const FS_LIST: u8 = 0x81;
pub const FS_MKDIR: u8 = 0x82;
pub const FS_RENAME: u8 = 0x83;
pub const FS_REMOVE: u8 = 0x84;
pub const FS_WATCH: u8 = 0x85;
/// DATA flag: end of the channel.
pub const EOF: u8 = 0x80;

/// A control payload: fields of `tag: u8`, `len: u32` (little-endian), `value`.
#[derive(Default, Clone)]
pub struct Fields(pub Vec<u8>);

impl Fields {
    pub fn new() -> Fields {
        Fields::default()
    }
    pub fn bytes(mut self, tag: u8, v: &[u8]) -> Fields {
        self.0.push(tag);
        self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.0.extend_from_slice(v);
        self
    }
    pub fn u8(self, tag: u8, v: u8) -> Fields {
        self.bytes(tag, &[v])
    }
    pub fn u16(self, tag: u8, v: u16) -> Fields {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn u32(self, tag: u8, v: u32) -> Fields {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn u64(self, tag: u8, v: u64) -> Fields {
        self.bytes(tag, &v.to_le_bytes())
    }
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}
