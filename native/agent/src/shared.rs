//! What every connection of the event loop shares (the epoll set, the process table, the
//! workload, the VM's identity, the proxy listener), in a module of its own so that the
//! connections (conn.rs) and the loop that owns them (server.rs) both use it without depending
//! on each other.

use crate::identity::Identity;
use crate::proxy::Proxy;
use crate::stream::{Ctx, Output, Procs};
use crate::sys::Epoll;
use crate::token::ConnId;
use crate::workload::Workload;

/// What every connection shares: the epoll set, the process table, the workload, the proxy
/// listener.
pub struct Shared {
    pub epoll: Epoll,
    pub procs: Procs,
    pub workload: Workload,
    /// The VM id and what derives from it (PID-1 mode).
    pub identity: Identity,
    /// PID-1 mode: apply HELLO's clock and entropy, SHUTDOWN reboots.
    pub init_mode: bool,
    /// The egress listener (at most one, owned by one connection).
    pub proxy: Proxy,
}

impl Shared {
    /// The context a stream of connection `conn` is called with.
    pub fn ctx<'a>(&'a mut self, id: u32, conn: ConnId, out: &'a mut Output, paused: bool) -> Ctx<'a> {
        Ctx { id, conn, epoll: &self.epoll, out, procs: &mut self.procs, paused, proxy_env: self.proxy.env() }
    }
}
