//! The guest side of egress (PROXY_LISTEN / PROXY_STOP / PROXY_CONN): a TCP listener on the
//! guest's loopback whose connections the agent carries to the host, which decides where they
//! may go. This module holds the VM-wide state: at most one listener, owned by one connection,
//! who may take it, when it is read (while its connection has fewer than `max_streams`
//! PROXY_CONN streams open; further clients wait in the listen backlog), and the environment
//! entries every EXEC and WORKLOAD_START gets while it listens. The connection (`conn.rs`)
//! owns the streams: it accepts through `Proxy::accept`, announces each with PROXY_CONN and
//! runs it as a TCP stream (`tcp::accepted`). In transparent mode (`transparent.rs`) the
//! listener is also armed as the destination of every outbound TCP connection, and each accepted
//! client comes with the address it connected to; a DNS responder (`dns.rs`) answers every UDP
//! query to port 53, asking the host about each name, and the fake-IP table (`fake_ip.rs`),
//! which outlives listeners, says which name a fake destination stands for.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};

use crate::dns::{DnsError, DnsServer};
use crate::fake_ip::{self, FakeIps};
use crate::proto::{self, ProxyListen, ProxyMode, ResolveAnswer};
use crate::transparent::{Armed, Steering, TransparentError};
use crate::token::{token, ConnId, T_DNS, T_PROXY};
use crate::sys::{self, Epoll, EPOLLIN};

/// The listen backlog: clients beyond `max_streams` wait here.
const BACKLOG: i32 = 128;
/// Connections accepted per readiness event (the rest on the next turn of the loop).
pub const ACCEPT_BATCH: usize = 64;

#[derive(Debug)]
pub enum ProxyError {
    BadRequest(String),
    /// PROXY_LISTEN on a connection that does not honour SHUTDOWN (the exec port).
    Unsupported,
    /// Another connection listens.
    InUse,
    /// A system call failed (bind: EADDRINUSE, say).
    Os(&'static str, io::Error),
    /// Transparent mode could not be armed (ENOSYS: a kernel without bpf(2)).
    Transparent(TransparentError),
    /// Transparent mode's DNS responder could not bind port 53.
    Dns(DnsError),
}

impl ProxyError {
    pub fn code(&self) -> u32 {
        match self {
            ProxyError::BadRequest(_) => proto::BAD_REQUEST,
            ProxyError::Unsupported => proto::UNSUPPORTED,
            ProxyError::InUse => proto::STREAM_IN_USE,
            ProxyError::Os(..) | ProxyError::Transparent(_) | ProxyError::Dns(_) => proto::IO,
        }
    }

    pub fn errno(&self) -> Option<i32> {
        match self {
            ProxyError::Os(_, e) => e.raw_os_error(),
            ProxyError::Transparent(e) => e.io().raw_os_error(),
            ProxyError::Dns(e) => e.io().raw_os_error(),
            _ => None,
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::BadRequest(m) => f.write_str(m),
            ProxyError::Unsupported => f.write_str("PROXY_LISTEN is honoured on the primary port only"),
            ProxyError::InUse => f.write_str("another connection's proxy listener is open"),
            ProxyError::Os(what, e) => write!(f, "{what}: {}", sys::io_text(e)),
            ProxyError::Transparent(e) => write!(f, "{e}"),
            ProxyError::Dns(e) => write!(f, "{e}"),
        }
    }
}

struct Listener {
    owner: ConnId,
    /// Transparent mode's redirect. Declared before `sock`, so it is disarmed before the socket
    /// closes (fields drop in order).
    transparent: Option<Armed>,
    /// Transparent mode's DNS responder (its verdict cache goes with it: a new listener, which
    /// may come with another policy, asks the host again).
    dns: Option<DnsServer>,
    /// Dropping it closes the socket, which also takes it out of the epoll set.
    sock: OwnedFd,
    max_streams: usize,
    env: Vec<Vec<u8>>,
    /// Registered for EPOLLIN.
    watching: bool,
    /// accept() failed for want of resources (descriptors, memory): not read again until one
    /// of the owner's streams has ended (a level-triggered listener would otherwise spin).
    starved: bool,
}

/// The VM's proxy listener, if one is open, and the fake-IP table (kept for the VM's life, so a
/// snapshot's programs still reach the names they resolved).
pub struct Proxy {
    listener: Option<Listener>,
    fakes: FakeIps,
    /// Transparent mode's steering program, loaded once (`preload`, or the first listen).
    steering: Option<Steering>,
}

impl Default for Proxy {
    fn default() -> Proxy {
        Proxy { listener: None, fakes: FakeIps::new(fake_ip::DEFAULT_CAPACITY), steering: None }
    }
}

impl Proxy {
    /// Loads the steering program into the agent's network namespace now (the agent as the
    /// guest's init, at boot), so that arming transparent egress later, in this VM or in a
    /// clone restored from its snapshot, does not load it. A failure is only reported: the
    /// first transparent listen tries again and returns the error.
    pub fn preload(&mut self) {
        match sys::udp_bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).map_err(|e| TransparentError::Os("socket", e)).and_then(|s| Steering::load(s.as_raw_fd())) {
            Ok(s) => self.steering = Some(s),
            Err(e) => eprintln!("supermachine-agent: transparent egress not preloaded: {e}"),
        }
    }

    /// The connection that listens.
    pub fn owner(&self) -> Option<ConnId> {
        self.listener.as_ref().map(|l| l.owner)
    }

    /// The entries to add to every EXEC's and WORKLOAD_START's environment (none while nothing
    /// listens).
    pub fn env(&self) -> &[Vec<u8>] {
        self.listener.as_ref().map_or(&[], |l| &l.env)
    }

    /// Decides a PROXY_LISTEN of connection `conn`: the request, and whether it replaces that
    /// connection's own listener (the caller then stops it, as PROXY_STOP, before `listen`).
    pub fn check_listen(&self, conn: ConnId, shutdown_allowed: bool, payload: &[u8]) -> Result<(ProxyListen, bool), ProxyError> {
        if !shutdown_allowed {
            return Err(ProxyError::Unsupported);
        }
        let req = ProxyListen::parse(payload).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        match self.owner() {
            Some(o) if o != conn => Err(ProxyError::InUse),
            owner => Ok((req, owner.is_some())),
        }
    }

    /// Opens the listener for `conn` (nothing may listen: see `check_listen`); returns the port
    /// bound. It is registered by the next `update_interest`.
    pub fn listen(&mut self, conn: ConnId, req: ProxyListen) -> Result<u16, ProxyError> {
        debug_assert!(self.listener.is_none());
        let (sock, port) = sys::tcp_listen(&req.addr, BACKLOG).map_err(|e| ProxyError::Os("listen", e))?;
        let (transparent, dns) = match req.mode {
            ProxyMode::Proxy => (None, None),
            ProxyMode::Transparent => {
                let dns = DnsServer::open().map_err(ProxyError::Dns)?;
                if self.steering.is_none() {
                    self.steering = Some(Steering::load(sock.as_raw_fd()).map_err(ProxyError::Transparent)?);
                }
                let armed = self.steering.as_ref().expect("loaded above").arm(sock.as_raw_fd(), dns.udp_fd()).map_err(ProxyError::Transparent)?;
                (Some(armed), Some(dns))
            }
        };
        self.listener = Some(Listener {
            owner: conn,
            transparent,
            dns,
            sock,
            max_streams: req.max_streams as usize,
            env: req.env,
            watching: false,
            starved: false,
        });
        Ok(port)
    }

    /// Closes `conn`'s listener, if it has one (its streams are the connection's business).
    pub fn stop(&mut self, conn: ConnId) -> bool {
        if self.owner() != Some(conn) {
            return false;
        }
        self.listener = None; // closing the socket takes it out of the epoll set
        true
    }

    /// One of `conn`'s streams has ended: a starved listener may try again.
    pub fn resume(&mut self, conn: ConnId) {
        if let Some(l) = self.listener.as_mut().filter(|l| l.owner == conn) {
            l.starved = false;
        }
    }

    /// Watches `conn`'s listener while it has fewer than `max_streams` proxy streams `open`, and
    /// its DNS responder always.
    pub fn update_interest(&mut self, epoll: &Epoll, conn: ConnId, open: usize) {
        let Some(l) = self.listener.as_mut().filter(|l| l.owner == conn) else { return };
        if let Some(dns) = l.dns.as_mut().filter(|d| !d.watching) {
            match epoll.add(dns.udp_fd(), EPOLLIN, token(T_DNS, conn, 0, 0)) {
                Ok(()) => dns.watching = true,
                Err(e) => eprintln!("supermachine-agent: cannot watch the DNS responder: {e}"),
            }
        }
        let want = open < l.max_streams && !l.starved;
        if want == l.watching {
            return;
        }
        let fd = l.sock.as_raw_fd();
        if want {
            match epoll.add(fd, EPOLLIN, token(T_PROXY, conn, 0, 0)) {
                Ok(()) => l.watching = true,
                Err(e) => {
                    eprintln!("supermachine-agent: cannot watch the proxy listener: {e}");
                    l.starved = true;
                }
            }
        } else {
            epoll.delete(fd);
            l.watching = false;
        }
    }

    /// Accepts one client for `conn`, which has `open` proxy streams, if it may take one:
    /// the socket, the client's port and, in transparent mode, the address it connected to.
    /// None when nobody waits, the limit is reached, or the call failed (then the listener rests
    /// until a stream ends, or the client is dropped).
    pub fn accept(&mut self, conn: ConnId, open: usize) -> Option<(OwnedFd, u16, Option<SocketAddr>)> {
        let l = self.listener.as_mut().filter(|l| l.owner == conn && !l.starved)?;
        if open >= l.max_streams {
            return None;
        }
        match sys::tcp_accept(l.sock.as_raw_fd()) {
            Ok((sock, peer)) if l.transparent.is_some() => match sys::tcp_local_addr(sock.as_raw_fd()) {
                Ok(dst) => Some((sock, peer, Some(dst))),
                Err(e) => {
                    // Without its destination the connection cannot be carried: reset it.
                    eprintln!("supermachine-agent: transparent accept: getsockname: {e}");
                    let _ = sys::set_linger_reset(sock.as_raw_fd());
                    None
                }
            },
            Ok((sock, peer)) => Some((sock, peer, None)),
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ECONNABORTED) => {}
                    Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
                        eprintln!("supermachine-agent: proxy accept: {e}");
                        l.starved = true;
                    }
                    _ => eprintln!("supermachine-agent: proxy accept: {e}"),
                }
                None
            }
        }
    }
}

impl Proxy {
    fn dns(&mut self, conn: ConnId) -> Option<(&mut DnsServer, &mut FakeIps)> {
        let dns = self.listener.as_mut().filter(|l| l.owner == conn)?.dns.as_mut()?;
        Some((dns, &mut self.fakes))
    }

    /// `conn`'s DNS responder has datagrams: answers what it can; returns the RESOLVEs to send.
    /// `new_id` gives a free agent stream id, told which ids pending RESOLVEs use.
    pub fn dns_readable(&mut self, conn: ConnId, now: u64, new_id: &mut dyn FnMut(&dyn Fn(u32) -> bool) -> u32) -> Vec<(u32, Vec<u8>)> {
        let Some((dns, fakes)) = self.dns(conn) else { return Vec::new() };
        dns.on_readable(now, fakes, new_id)
    }

    /// Whether agent stream id `id` is one of `conn`'s outstanding RESOLVEs.
    pub fn dns_owns(&self, conn: ConnId, id: u32) -> bool {
        self.listener.as_ref().filter(|l| l.owner == conn).and_then(|l| l.dns.as_ref()).is_some_and(|d| d.state.owns(id))
    }

    /// The host answered RESOLVE `id` (None: with an error): replies to the clients that wait.
    pub fn dns_answer(&mut self, conn: ConnId, id: u32, answer: Option<ResolveAnswer>, now: u64) {
        let Some((dns, fakes)) = self.dns(conn) else { return };
        for r in dns.state.answer(id, answer, now, fakes) {
            dns.send(&r);
        }
    }

    /// Answers SERVFAIL where the host is late; returns when the next RESOLVE falls due.
    pub fn dns_expire(&mut self, conn: ConnId, now: u64) -> Option<u64> {
        let (dns, fakes) = self.dns(conn)?;
        let (late, due) = dns.state.expire(now, fakes);
        for r in &late {
            dns.send(r);
        }
        due
    }

    /// The name a transparent connection's destination stands for, when it is a fake address.
    pub fn fake_name(&mut self, dst: &SocketAddr) -> Option<String> {
        match dst.ip() {
            IpAddr::V4(ip) if FakeIps::in_range(ip) => self.fakes.name_of(ip),
            _ => None,
        }
    }
}

/// Adds each of `extra` to `env` unless `env` already has an entry with its KEY: the request's
/// own value wins, an empty one included (and of two extra entries with one KEY, the first).
pub fn add_env(env: &mut Vec<Vec<u8>>, extra: &[Vec<u8>]) {
    for e in extra {
        let key = proto::env_key(e);
        if !env.iter().any(|have| proto::env_key(have) == key) {
            env.push(e.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(port: u16, env: &[&[u8]], max: u32) -> Vec<u8> {
        let mut w = proto::FieldWriter::new().u16(1, port);
        for e in env {
            w = w.bytes(3, e);
        }
        w.u32(4, max).finish()
    }

    #[test]
    fn env_is_added_unless_the_request_has_the_key() {
        let mut env = vec![b"PATH=/bin".to_vec(), b"http_proxy=".to_vec(), b"ODD".to_vec()];
        let extra = [b"http_proxy=http://p:1".to_vec(), b"HTTPS_PROXY=http://p:1".to_vec(), b"ODD=x".to_vec(), b"HTTPS_PROXY=second".to_vec()];
        add_env(&mut env, &extra);
        let want: Vec<&[u8]> = vec![b"PATH=/bin", b"http_proxy=", b"ODD", b"HTTPS_PROXY=http://p:1"];
        assert_eq!(env, want.iter().map(|e| e.to_vec()).collect::<Vec<_>>());
        let mut none = Vec::new();
        add_env(&mut none, &[]);
        assert!(none.is_empty());
    }

    #[test]
    fn transparent_mode_accepts_with_the_destination_and_disarms_on_stop() {
        let ran = crate::transparent::tests::in_new_netns(|| {
            let mut p = Proxy::default();
            let payload = proto::FieldWriter::new().u8(5, 1).u32(4, 2).finish();
            let (r, _) = p.check_listen(0, true, &payload).unwrap();
            let port = p.listen(0, r).unwrap_or_else(|e| panic!("{e}"));
            assert_ne!(port, 0, "the kernel picked a port");
            let dst: std::net::SocketAddr = "203.0.113.5:443".parse().unwrap();
            let client = std::net::TcpStream::connect_timeout(&dst, std::time::Duration::from_secs(2)).unwrap();
            let (_sock, peer, to) = accept_within(&mut p).expect("accepted");
            assert_eq!((peer, to), (client.local_addr().unwrap().port(), Some(dst)));
            assert!(p.stop(0));
            let e = std::net::TcpStream::connect_timeout(&dst, std::time::Duration::from_secs(2)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENETUNREACH), "stop disarms");
        });
        if ran.is_none() {
            eprintln!("proxy: transparent test skipped, this process cannot create a network namespace (run as root)");
        }
    }

    /// Connection 0's next client, waiting up to 5 s for it to arrive.
    fn accept_within(p: &mut Proxy) -> Option<(OwnedFd, u16, Option<SocketAddr>)> {
        for _ in 0..500 {
            if let Some(got) = p.accept(0, 0) {
                return Some(got);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    }

    #[test]
    fn one_listener_owned_by_one_connection() {
        let epoll = Epoll::new().unwrap();
        let mut p = Proxy::default();
        assert!(matches!(p.check_listen(0, false, &req(1, &[], 0)), Err(ProxyError::Unsupported)));
        assert!(matches!(p.check_listen(0, true, &req(0, &[], 0)), Err(ProxyError::BadRequest(_))));
        // Bind an ephemeral port first to find one that is free (the protocol has no port 0).
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let (r, replaces) = p.check_listen(0, true, &req(port, &[b"A=1"], 1)).unwrap();
        assert!(!replaces);
        assert_eq!(p.listen(0, r).unwrap(), port);
        assert_eq!((p.owner(), p.env()), (Some(0), &[b"A=1".to_vec()][..]));
        assert!(matches!(p.check_listen(1, true, &req(port + 1, &[], 0)), Err(ProxyError::InUse)));
        assert!(matches!(p.check_listen(0, true, &req(port, &[], 0)), Ok((_, true))));
        assert!(!p.stop(1));

        // Accepts while under max_streams (1), not at it.
        p.update_interest(&epoll, 0, 0);
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_sock, peer, dst) = accept_within(&mut p).expect("accepted");
        assert_eq!(dst, None, "proxy mode has no destination");
        assert_eq!(peer, client.local_addr().unwrap().port());
        let _second = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(p.accept(1, 0).is_none(), "another connection accepts nothing");
        assert!(p.accept(0, 1).is_none(), "max_streams reached");

        assert!(p.stop(0));
        assert_eq!((p.owner(), p.env().len()), (None, 0));
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the port is closed");
    }
}
