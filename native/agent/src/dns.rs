//! The DNS responder of transparent egress. The sk_lookup program steers every UDP datagram to
//! port 53, on any address, to this socket; each question is answered here, and the decision on
//! a name is always the host's: the agent sends it a `RESOLVE` (one per name at a time, however
//! many clients ask), caches the verdict for its TTL, and answers:
//! - allowed: A with the name's fake address (`fake_ip`), any other type NOERROR with no data
//!   (IPv6 is not steered, so clients must use IPv4; no HTTPS/SVCB hint leaks a real address);
//! - otherwise NXDOMAIN, REFUSED or SERVFAIL as the host says (SERVFAIL also when it does not
//!   answer within 5 s); a name the host says does not exist for the guest is NXDOMAIN to
//!   address questions (A, AAAA) and REFUSED to every other type (MX, TXT, SRV...), which no
//!   policy answers. PTR for a fake address names its name without asking anyone.
//! Malformed datagrams are dropped. The responder's state (`DnsState`) does no I/O, so it is
//! tested without sockets; `DnsServer` adds the socket.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::dns_wire::{self, Answer, Query};
use crate::fake_ip::FakeIps;
use crate::proto::{self, ResolveAnswer};
use crate::sys;

/// Where the UDP socket is bound. sk_lookup ignores the bound address when it delivers, but the
/// socket must be on port 53: a reply from another port is dropped by a connected client socket.
pub const UDP_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 53), 53);
/// The TTL of fake answers. The mapping outlives it (the table keeps it while in use).
const ANSWER_TTL: u32 = 60;
/// How long the host has to answer a RESOLVE.
const RESOLVE_TIMEOUT_NS: u64 = 5_000_000_000;
/// Questions outstanding at the host at once; more are dropped (UDP clients retry).
const MAX_PENDING: usize = 64;
/// Clients waiting on one name (glibc asks A and AAAA together; retries add a few).
const MAX_WAITERS: usize = 32;
/// Cached verdicts; the cache is emptied when it is full (verdicts are cheap to ask again).
const MAX_CACHE: usize = 4096;
/// Datagrams read per readiness event.
const READ_BATCH: usize = 64;

#[derive(Debug)]
pub enum DnsError {
    /// Binding the responder's socket failed.
    Bind(io::Error),
}

impl DnsError {
    pub fn io(&self) -> &io::Error {
        match self {
            DnsError::Bind(e) => e,
        }
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::Bind(e) => write!(f, "DNS responder: bind {UDP_ADDR}: {}", sys::io_text(e)),
        }
    }
}

/// The host's verdict on a name (RESOLVE's OK field 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    NxDomain,
    Refused,
    ServFail,
}

impl Verdict {
    fn from_wire(v: u8) -> Verdict {
        match v {
            0 => Verdict::Allow,
            1 => Verdict::NxDomain,
            2 => Verdict::Refused,
            _ => Verdict::ServFail,
        }
    }
}

/// A client to answer: who asked, the address it asked, and its question.
#[derive(Debug, Clone)]
pub struct Client {
    pub peer: SocketAddrV4,
    pub dst: Ipv4Addr,
    pub query: Query,
}

/// A reply to send: to `peer`, from `src`.
#[derive(Debug)]
pub struct Reply {
    pub peer: SocketAddrV4,
    pub src: Ipv4Addr,
    pub bytes: Vec<u8>,
}

struct Pending {
    name: String,
    deadline: u64,
    clients: Vec<Client>,
}

/// What to do with one question.
#[derive(Debug)]
pub enum Step {
    Reply(Reply),
    /// Send RESOLVE on this id with this payload; the client waits for the answer.
    Ask(u32, Vec<u8>),
    /// The client waits for a RESOLVE already sent.
    Wait,
    /// Too much outstanding: no answer (the client retries).
    Drop,
}

/// The responder without its socket: the verdict cache and the questions the host has.
#[derive(Default)]
pub struct DnsState {
    cache: HashMap<String, (Verdict, u64)>,
    pending: HashMap<u32, Pending>,
    by_name: HashMap<String, u32>,
}

fn reply(c: &Client, answer: &Answer) -> Reply {
    Reply { peer: c.peer, src: c.dst, bytes: dns_wire::build_response(&c.query, answer) }
}

fn answer_for(q: &Query, verdict: Verdict, fakes: &mut FakeIps) -> Answer {
    match verdict {
        Verdict::Allow if q.qtype == dns_wire::TYPE_A => Answer::A(fakes.assign(&q.name), ANSWER_TTL),
        Verdict::Allow => Answer::NoData,
        Verdict::NxDomain if q.qtype == dns_wire::TYPE_A || q.qtype == dns_wire::TYPE_AAAA => Answer::NxDomain,
        Verdict::NxDomain | Verdict::Refused => Answer::Refused,
        Verdict::ServFail => Answer::ServFail,
    }
}

impl DnsState {
    /// Whether RESOLVE id `id` is outstanding (its OK or STREAM_ERROR is for `answer`).
    pub fn owns(&self, id: u32) -> bool {
        self.pending.contains_key(&id)
    }

    /// Decides one question. `new_id` gives a free agent stream id (≥ 2^31) for a RESOLVE; it
    /// is told which ids this state already uses.
    pub fn query(&mut self, c: Client, now: u64, fakes: &mut FakeIps, new_id: &mut dyn FnMut(&dyn Fn(u32) -> bool) -> u32) -> Step {
        let q = &c.query;
        if !dns_wire::is_internet(q) || q.name.is_empty() {
            return Step::Reply(reply(&c, &Answer::Refused));
        }
        if q.qtype == dns_wire::TYPE_PTR {
            if let Some(ip) = dns_wire::ptr_address(&q.name) {
                let answer = match fakes.name_of(ip) {
                    Some(name) => Answer::Ptr(name, ANSWER_TTL),
                    None => Answer::NxDomain,
                };
                return Step::Reply(reply(&c, &answer));
            }
        }
        if let Some(&(verdict, until)) = self.cache.get(&q.name) {
            if until > now {
                let answer = answer_for(q, verdict, fakes);
                return Step::Reply(reply(&c, &answer));
            }
            self.cache.remove(&q.name);
        }
        if let Some(id) = self.by_name.get(&q.name) {
            let p = self.pending.get_mut(id).expect("by_name follows pending");
            if p.clients.len() >= MAX_WAITERS {
                return Step::Drop;
            }
            p.clients.push(c);
            return Step::Wait;
        }
        if self.pending.len() >= MAX_PENDING {
            return Step::Drop;
        }
        let pending = &self.pending;
        let id = new_id(&|id| pending.contains_key(&id));
        let payload = proto::resolve(&q.name, q.qtype);
        self.by_name.insert(q.name.clone(), id);
        self.pending.insert(id, Pending { name: q.name.clone(), deadline: now + RESOLVE_TIMEOUT_NS, clients: vec![c] });
        Step::Ask(id, payload)
    }

    /// The host answered RESOLVE `id` (None: with STREAM_ERROR, or an OK that does not parse:
    /// SERVFAIL, not cached). The replies to send to everyone who waited.
    pub fn answer(&mut self, id: u32, answer: Option<ResolveAnswer>, now: u64, fakes: &mut FakeIps) -> Vec<Reply> {
        let Some(p) = self.pending.remove(&id) else { return Vec::new() };
        self.by_name.remove(&p.name);
        let verdict = answer.map_or(Verdict::ServFail, |a| Verdict::from_wire(a.verdict));
        if let Some(a) = answer.filter(|a| a.ttl > 0) {
            if self.cache.len() >= MAX_CACHE {
                self.cache.clear();
            }
            self.cache.insert(p.name.clone(), (verdict, now + a.ttl as u64 * 1_000_000_000));
        }
        p.clients.iter().map(|c| reply(c, &answer_for(&c.query, verdict, fakes))).collect()
    }

    /// Answers SERVFAIL to the questions the host has not answered in time; returns those
    /// replies and when the next one falls due.
    pub fn expire(&mut self, now: u64, fakes: &mut FakeIps) -> (Vec<Reply>, Option<u64>) {
        let late: Vec<u32> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(&id, _)| id).collect();
        let mut out = Vec::new();
        for id in late {
            out.extend(self.answer(id, None, now, fakes));
        }
        (out, self.pending.values().map(|p| p.deadline).min())
    }
}

/// The responder: its UDP socket and state.
pub struct DnsServer {
    udp: OwnedFd,
    pub state: DnsState,
    /// Registered for EPOLLIN.
    pub watching: bool,
}

impl DnsServer {
    pub fn open() -> Result<DnsServer, DnsError> {
        let udp = sys::udp_bind(UDP_ADDR).map_err(DnsError::Bind)?;
        Ok(DnsServer { udp, state: DnsState::default(), watching: false })
    }

    pub fn udp_fd(&self) -> RawFd {
        self.udp.as_raw_fd()
    }

    /// Reads the waiting datagrams; replies at once where it can, and returns the RESOLVEs to
    /// send (id, payload).
    pub fn on_readable(&mut self, now: u64, fakes: &mut FakeIps, new_id: &mut dyn FnMut(&dyn Fn(u32) -> bool) -> u32) -> Vec<(u32, Vec<u8>)> {
        let mut asks = Vec::new();
        let mut buf = [0u8; 1500];
        for _ in 0..READ_BATCH {
            let (n, peer, dst) = match sys::udp_recv(self.udp.as_raw_fd(), &mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("supermachine-agent: DNS responder: recvmsg: {e}");
                    break;
                }
            };
            let Ok(query) = dns_wire::parse_query(&buf[..n]) else { continue };
            match self.state.query(Client { peer, dst, query }, now, fakes, new_id) {
                Step::Reply(r) => self.send(&r),
                Step::Ask(id, payload) => asks.push((id, payload)),
                Step::Wait | Step::Drop => {}
            }
        }
        asks
    }

    pub fn send(&self, r: &Reply) {
        if let Err(e) = sys::udp_send_from(self.udp.as_raw_fd(), &r.bytes, r.peer, r.src) {
            // A client that went away, or a full buffer: it retries.
            if e.raw_os_error() != Some(libc::EAGAIN) {
                eprintln!("supermachine-agent: DNS responder: reply to {}: {e}", r.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, qtype: u16, port: u16) -> Client {
        let mut m = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.extend_from_slice(&[0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
        Client { peer: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), dst: Ipv4Addr::new(8, 8, 8, 8), query: dns_wire::parse_query(&m).unwrap() }
    }

    fn ids() -> impl FnMut(&dyn Fn(u32) -> bool) -> u32 {
        let mut next = proto::AGENT_STREAM_MIN;
        move |taken| loop {
            next += 1;
            if !taken(next) {
                return next;
            }
        }
    }

    fn rcode(r: &Reply) -> u8 {
        r.bytes[3] & 0x0f
    }

    #[test]
    fn one_resolve_per_name_then_the_cache() {
        let (mut s, mut f, mut ids) = (DnsState::default(), FakeIps::new(16), ids());
        let Step::Ask(id, payload) = s.query(client("Web.Test", dns_wire::TYPE_A, 1000), 0, &mut f, &mut ids) else { panic!("asks") };
        assert_eq!(payload, proto::resolve("web.test", dns_wire::TYPE_A));
        assert!(matches!(s.query(client("web.test", dns_wire::TYPE_AAAA, 1001), 0, &mut f, &mut ids), Step::Wait));
        assert!(s.owns(id));
        let replies = s.answer(id, Some(ResolveAnswer { verdict: 0, ttl: 30 }), 10, &mut f);
        assert!(!s.owns(id));
        assert_eq!(replies.len(), 2);
        // The A reply carries the fake address and comes from the address asked; AAAA has no data.
        let a = &replies[0];
        assert_eq!((a.peer.port(), a.src, rcode(a)), (1000, Ipv4Addr::new(8, 8, 8, 8), 0));
        assert_eq!(&a.bytes[a.bytes.len() - 4..], &[198, 18, 0, 1]);
        assert_eq!((&replies[1].bytes[6..8], rcode(&replies[1])), (&[0u8, 0][..], 0));
        // The verdict is cached for its TTL (30 s), and the fake address is stable.
        let Step::Reply(again) = s.query(client("web.test", dns_wire::TYPE_A, 1002), 29_000_000_000, &mut f, &mut ids) else { panic!("cached") };
        assert_eq!(&again.bytes[again.bytes.len() - 4..], &[198, 18, 0, 1]);
        assert!(matches!(s.query(client("web.test", dns_wire::TYPE_A, 1003), 31_000_000_000, &mut f, &mut ids), Step::Ask(..)));
        // PTR for the fake address names the name, without asking.
        let Step::Reply(ptr) = s.query(client("1.0.18.198.in-addr.arpa", dns_wire::TYPE_PTR, 1004), 0, &mut f, &mut ids) else { panic!("ptr") };
        assert!(ptr.bytes.ends_with(b"\x03web\x04test\x00"));
    }

    #[test]
    fn refusals_as_the_host_says_and_servfail_when_it_is_silent() {
        let (mut s, mut f, mut ids) = (DnsState::default(), FakeIps::new(16), ids());
        for (verdict, code) in [(1u8, 3u8), (2, 5), (3, 2)] {
            let name = format!("n{verdict}.test");
            let Step::Ask(id, _) = s.query(client(&name, dns_wire::TYPE_A, 1), 0, &mut f, &mut ids) else { panic!() };
            let r = s.answer(id, Some(ResolveAnswer { verdict, ttl: 0 }), 0, &mut f);
            assert_eq!(rcode(&r[0]), code);
            // TTL 0: not cached, the next question asks again.
            assert!(matches!(s.query(client(&name, dns_wire::TYPE_A, 1), 1, &mut f, &mut ids), Step::Ask(..)));
        }
        assert_eq!(f.len(), 0, "no fake address for a refused name");
        // A name that does not exist for the guest: NXDOMAIN to A and AAAA, REFUSED to other types.
        let Step::Ask(id, _) = s.query(client("off.test", dns_wire::TYPE_AAAA, 1), 0, &mut f, &mut ids) else { panic!() };
        assert_eq!(rcode(&s.answer(id, Some(ResolveAnswer { verdict: 1, ttl: 5 }), 0, &mut f)[0]), 3);
        let Step::Reply(mx) = s.query(client("off.test", 15, 1), 1, &mut f, &mut ids) else { panic!("cached") };
        assert_eq!(rcode(&mx), 5);
        let mut s = DnsState::default();
        let Step::Ask(id, _) = s.query(client("slow.test", dns_wire::TYPE_A, 1), 0, &mut f, &mut ids) else { panic!() };
        let (none, due) = s.expire(RESOLVE_TIMEOUT_NS - 1, &mut f);
        assert_eq!((none.len(), due), (0, Some(RESOLVE_TIMEOUT_NS)));
        let (late, due) = s.expire(RESOLVE_TIMEOUT_NS, &mut f);
        assert_eq!((late.len(), rcode(&late[0]), due), (1, 2, None));
        assert!(s.answer(id, Some(ResolveAnswer { verdict: 0, ttl: 30 }), 0, &mut f).is_empty(), "a late answer is ignored");
        // Other classes and the root are refused at once.
        let mut chaos = client("version.bind", dns_wire::TYPE_A, 1);
        chaos.query.qclass = 3;
        assert!(matches!(s.query(chaos, 0, &mut f, &mut ids), Step::Reply(r) if rcode(&r) == 5));
    }

    #[test]
    fn outstanding_questions_are_bounded() {
        let (mut s, mut f, mut ids) = (DnsState::default(), FakeIps::new(16), ids());
        for i in 0..MAX_PENDING {
            assert!(matches!(s.query(client(&format!("n{i}.test"), 1, 1), 0, &mut f, &mut ids), Step::Ask(..)));
        }
        assert!(matches!(s.query(client("one.more", 1, 1), 0, &mut f, &mut ids), Step::Drop));
    }
}
