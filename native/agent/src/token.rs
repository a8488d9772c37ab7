//! Epoll tokens: what a readiness event is about, packed into the event's 64 bits (bits 0-7 the
//! kind, 8-15 the connection, 16-23 the descriptor's slot within its stream, 32-63 the stream or
//! exec id). Its own module, so that what registers descriptors (streams, the background
//! process table, the proxy listener) and what routes events (the server) share it without
//! depending on each other.

/// Index of a connection in the server's table.
pub type ConnId = u8;


pub const T_SIGNAL: u8 = 1;
pub const T_TIMER: u8 = 2;
pub const T_LISTENER: u8 = 3;
pub const T_CONN: u8 = 4;
pub const T_STREAM: u8 = 5;
/// A leftover exec's `cgroup.events` (the id is the exec id).
pub const T_CGROUP: u8 = 6;
/// The proxy listener (the connection is its owner).
pub const T_PROXY: u8 = 7;
/// The transparent-egress DNS responder's socket (the connection is the listener's owner).
pub const T_DNS: u8 = 8;

pub fn token(kind: u8, conn: ConnId, slot: u8, id: u32) -> u64 {
    (id as u64) << 32 | (slot as u64) << 16 | (conn as u64) << 8 | kind as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub kind: u8,
    pub conn: ConnId,
    pub slot: u8,
    pub id: u32,
}

impl Token {
    pub fn decode(t: u64) -> Token {
        Token { kind: t as u8, conn: (t >> 8) as u8, slot: (t >> 16) as u8, id: (t >> 32) as u32 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        let t = Token::decode(token(T_STREAM, 7, 3, u32::MAX));
        assert_eq!(t, Token { kind: T_STREAM, conn: 7, slot: 3, id: u32::MAX });
        let t = Token::decode(token(T_CONN, 1, 0, 0));
        assert_eq!((t.kind, t.conn, t.id), (T_CONN, 1, 0));
    }
}
