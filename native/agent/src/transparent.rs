//! Transparent egress (PROXY_LISTEN mode 1): every TCP connection a guest program opens to a
//! non-loopback IPv4 address reaches the agent's listener, whatever the program, with no proxy
//! variable. Two pieces do it, both in effect only while the host wants egress:
//!
//! - the AnyIP route `local 0.0.0.0/0 dev lo` (`sys::rtnl`): every address is local, so a
//!   connect() loops back through `lo` instead of failing with ENETUNREACH (there is no device);
//! - an sk_lookup program (`sys::bpf`), linked to the guest's network namespace, that runs before
//!   the kernel's own listener lookup: UDP to port 53 on any address, loopback included, goes to
//!   slot 1 of a SOCKMAP (the agent's DNS responder, `dns.rs`), TCP to port 53 to slot 2 (left
//!   empty, so refused); other TCP to a non-loopback address to slot 0 (the agent's listener);
//!   other UDP to a non-loopback address is dropped (the sender gets ECONNREFUSED), except what
//!   comes from port 53: the DNS responder's answers, sent from the address the client asked, so
//!   that an unconnected client socket (musl's resolver) gets them; the rest of loopback, and
//!   IPv6, are left to the kernel. An empty slot passes to the kernel's lookup.
//!
//! The program is loaded and linked once (`Steering`, at the agent's boot as init, so snapshots
//! hold it): with its slots empty and no route it changes nothing. Arming fills the slots and
//! adds the route; dropping the `Armed` deletes the route and empties the slots, so a snapshot
//! taken after PROXY_STOP steers nothing. `getsockname()` on an accepted socket is the address
//! the client asked for.
//!
//! With every address local, the guest kernel would answer ICMP echo to any address itself (a
//! `ping` that seems to reach the world). While armed, `net.ipv4.icmp_echo_ignore_all` is 1, so
//! echo requests go unanswered (loopback's included); the old value comes back on disarm.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys::bpf::{self, BpfError, Insn};
use crate::sys::rtnl;

/// The loopback interface's index (always 1: it is the first device of every namespace).
const LO_IFINDEX: u32 = 1;
/// The SOCKMAP's slots: the TCP listener, the DNS responder's UDP socket, and TCP/53's
/// listener (not served yet).
const SLOT_TCP: u32 = 0;
const SLOT_DNS_UDP: u32 = 1;
const SLOT_DNS_TCP: u32 = 2;
const SLOTS: u32 = 3;

#[derive(Debug)]
pub enum TransparentError {
    Bpf(BpfError),
    /// A route or namespace call failed.
    Os(&'static str, io::Error),
}

impl TransparentError {
    pub fn io(&self) -> &io::Error {
        match self {
            TransparentError::Bpf(e) => e.io(),
            TransparentError::Os(_, e) => e,
        }
    }
}

impl fmt::Display for TransparentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransparentError::Bpf(e) => write!(f, "transparent egress: {e}"),
            TransparentError::Os(what, e) => write!(f, "transparent egress: {what}: {}", crate::sys::io_text(e)),
        }
    }
}

impl From<BpfError> for TransparentError {
    fn from(e: BpfError) -> Self {
        TransparentError::Bpf(e)
    }
}

/// The steering program, loaded and linked to a network namespace once (the agent does it at
/// boot, so a snapshot holds it and a restored clone arms in a few system calls instead of
/// running the verifier). With its SOCKMAP empty it changes nothing: every lookup passes to the
/// kernel's own (see `program`); `arm` fills the slots.
pub struct Steering {
    _link: OwnedFd,
    _prog: OwnedFd,
    map: OwnedFd,
}

impl Steering {
    /// Loads the program and links it to the network namespace of socket `any_sock`.
    pub fn load(any_sock: RawFd) -> Result<Steering, TransparentError> {
        let map = bpf::sockmap_create(SLOTS)?;
        let prog = bpf::prog_load(bpf::BPF_PROG_TYPE_SK_LOOKUP, bpf::BPF_SK_LOOKUP, &program(map.as_raw_fd()))?;
        let netns = crate::sys::socket_netns(any_sock).map_err(|e| TransparentError::Os("namespace of the listener", e))?;
        let link = bpf::link_create(&prog, netns.as_raw_fd(), bpf::BPF_SK_LOOKUP)?;
        Ok(Steering { _link: link, _prog: prog, map })
    }

    /// Arms transparent egress, steering TCP to `listener` (a listening TCP socket, IPv4 or
    /// dual-stack) and UDP/53 to `dns_udp` (a UDP socket bound to port 53), both in the
    /// namespace the program is linked to. TCP/53's slot stays empty: such connections find no
    /// listener and are refused. Needs CAP_NET_ADMIN (root).
    pub fn arm(&self, listener: RawFd, dns_udp: RawFd) -> Result<Armed, TransparentError> {
        let map = self.map.try_clone().map_err(|e| TransparentError::Os("dup the map", e))?;
        // From here, dropping `armed` undoes whatever was done.
        let mut armed = Armed { map, route: false, icmp_was: None };
        bpf::sockmap_set(&armed.map, SLOT_TCP, listener)?;
        bpf::sockmap_set(&armed.map, SLOT_DNS_UDP, dns_udp)?;
        rtnl::local_default_route(true, LO_IFINDEX).map_err(|e| TransparentError::Os("add the local default route", e))?;
        armed.route = true;
        armed.icmp_was = ignore_icmp_echo();
        Ok(armed)
    }
}

/// The armed redirect. Dropping it deletes the route first (a new connect() fails with
/// ENETUNREACH again), then empties the SOCKMAP's slots (the program passes everything again)
/// and restores icmp_echo_ignore_all.
pub struct Armed {
    map: OwnedFd,
    route: bool,
    /// icmp_echo_ignore_all before arming, to restore (None: it could not be read or set).
    icmp_was: Option<String>,
}

impl Drop for Armed {
    fn drop(&mut self) {
        if self.route {
            if let Err(e) = rtnl::local_default_route(false, LO_IFINDEX) {
                eprintln!("supermachine-agent: transparent egress: cannot delete the local default route: {e}");
            }
        }
        for slot in [SLOT_TCP, SLOT_DNS_UDP] {
            if let Err(e) = bpf::sockmap_clear(&self.map, slot) {
                eprintln!("supermachine-agent: transparent egress: cannot empty slot {slot}: {e}");
            }
        }
        if let Some(old) = &self.icmp_was {
            if let Err(e) = std::fs::write(ICMP_ECHO_IGNORE, old) {
                eprintln!("supermachine-agent: transparent egress: cannot restore {ICMP_ECHO_IGNORE}: {e}");
            }
        }
    }
}

/// The sysctl that makes the kernel ignore ICMP echo requests (per network namespace).
const ICMP_ECHO_IGNORE: &str = "/proc/sys/net/ipv4/icmp_echo_ignore_all";

/// Sets icmp_echo_ignore_all to 1; returns its old value (None, with a warning, when it fails:
/// a guest kernel without it still gets transparent egress, only ping answers locally).
fn ignore_icmp_echo() -> Option<String> {
    let old = std::fs::read_to_string(ICMP_ECHO_IGNORE).ok()?;
    match std::fs::write(ICMP_ECHO_IGNORE, "1") {
        Ok(()) => Some(old.trim().to_owned()),
        Err(e) => {
            eprintln!("supermachine-agent: transparent egress: cannot set {ICMP_ECHO_IGNORE}: {e}");
            None
        }
    }
}

const fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: (src << 4) | dst, off, imm }
}

// Opcodes (include/uapi/linux/bpf.h, bpf_common.h).
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const AND64_IMM: u8 = 0x57;
const LDX_W: u8 = 0x61;
const STX_W: u8 = 0x63;
const JA: u8 = 0x05;
const LD_IMM64: u8 = 0x18;
const JEQ_IMM: u8 = 0x15;
const JNE_IMM: u8 = 0x55;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
/// src register value of an LD_IMM64 whose immediate is a map descriptor.
const PSEUDO_MAP_FD: u8 = 1;

// struct bpf_sk_lookup offsets.
const CTX_FAMILY: i16 = 8;
const CTX_PROTOCOL: i16 = 12;
const CTX_REMOTE_PORT: i16 = 36;
const CTX_LOCAL_IP4: i16 = 40;
const CTX_LOCAL_PORT: i16 = 60;

// Helper ids.
const MAP_LOOKUP_ELEM: i32 = 1;
const SK_RELEASE: i32 = 86;
const SK_ASSIGN: i32 = 124;

const SK_DROP: i32 = 0;
const SK_PASS: i32 = 1;

/// The sk_lookup program, with the SOCKMAP's descriptor in its map load. Jump offsets count
/// instructions from the one after the jump. r8 holds the slot to steer to.
pub fn program(map_fd: RawFd) -> Vec<Insn> {
    vec![
        ins(MOV64_REG, 6, 1, 0, 0),                  // 0: r6 = ctx
        ins(LDX_W, 2, 6, CTX_FAMILY, 0),             // 1: r2 = family
        ins(JNE_IMM, 2, 0, 26, libc::AF_INET),       // 2: not IPv4 -> pass (29)
        ins(LDX_W, 3, 6, CTX_PROTOCOL, 0),           // 3: r3 = protocol
        ins(LDX_W, 2, 6, CTX_LOCAL_PORT, 0),         // 4: r2 = destination port (host order)
        ins(JNE_IMM, 2, 0, 4, 53),                   // 5: not port 53 -> not DNS (10)
        ins(MOV64_IMM, 8, 0, 0, SLOT_DNS_UDP as i32), // 6: DNS on any address, loopback included
        ins(JNE_IMM, 3, 0, 7, libc::IPPROTO_TCP),    // 7: UDP -> lookup (15)
        ins(MOV64_IMM, 8, 0, 0, SLOT_DNS_TCP as i32), // 8: TCP/53
        ins(JA, 0, 0, 5, 0),                         // 9: -> lookup (15)
        ins(LDX_W, 2, 6, CTX_LOCAL_IP4, 0),          // 10: r2 = destination address (network order)
        ins(AND64_IMM, 2, 0, 0, 0xff),               // 11: its first byte
        ins(JEQ_IMM, 2, 0, 16, 127),                 // 12: 127/8 -> pass (29)
        ins(MOV64_IMM, 8, 0, 0, SLOT_TCP as i32),    // 13: the listener
        ins(JNE_IMM, 3, 0, 18, libc::IPPROTO_TCP),   // 14: not TCP -> UDP (33)
        ins(STX_W, 10, 8, -4, 0),                    // 15: key = r8 on the stack
        ins(MOV64_REG, 2, 10, 0, 0),                 // 16: r2 = fp
        ins(ADD64_IMM, 2, 0, 0, -4),                 // 17: r2 = &key
        ins(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map_fd),  // 18, 19: r1 = the map
        ins(0, 0, 0, 0, 0),
        ins(CALL, 0, 0, 0, MAP_LOOKUP_ELEM),         // 20: r0 = sockmap[key] (a reference) or NULL
        ins(JEQ_IMM, 0, 0, 7, 0),                    // 21: empty slot (not armed, TCP/53) -> pass (29)
        ins(MOV64_REG, 7, 0, 0, 0),                  // 22: r7 = the socket
        ins(MOV64_REG, 1, 6, 0, 0),                  // 23: sk_assign(ctx, sk, 0)
        ins(MOV64_REG, 2, 0, 0, 0),                  // 24
        ins(MOV64_IMM, 3, 0, 0, 0),                  // 25
        ins(CALL, 0, 0, 0, SK_ASSIGN),               // 26
        ins(MOV64_REG, 1, 7, 0, 0),                  // 27: sk_release(sk)
        ins(CALL, 0, 0, 0, SK_RELEASE),              // 28
        ins(MOV64_IMM, 0, 0, 0, SK_PASS),            // 29: pass (to the assigned socket, if any)
        ins(EXIT, 0, 0, 0, 0),                       // 30
        ins(MOV64_IMM, 0, 0, 0, SK_DROP),            // 31: drop
        ins(EXIT, 0, 0, 0, 0),                       // 32
        ins(LDX_W, 2, 6, CTX_REMOTE_PORT, 0),        // 33: r2 = source port (network order, low 16 bits)
        ins(JEQ_IMM, 2, 0, -6, 53_u16.to_be() as i32), // 34: from port 53 (a DNS answer) -> pass (29)
        ins(JA, 0, 0, -5, 0),                        // 35: other UDP -> drop (31)
    ]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
    use std::time::Duration;

    use crate::sys;

    /// Runs `f` on a new thread moved into a new, empty network namespace (a namespace belongs to
    /// a thread, so the other tests are unaffected). None when this process may not make one
    /// (not root): the caller then says the test did not run.
    pub(crate) fn in_new_netns<F: FnOnce() + Send + 'static>(f: F) -> Option<()> {
        std::thread::spawn(move || {
            if sys::unshare_net().is_err() {
                return None;
            }
            sys::interface_up("lo").expect("lo up");
            f();
            Some(())
        })
        .join()
        .expect("the namespace thread panicked")
    }

    fn accept_dst(listener: RawFd) -> (OwnedFd, SocketAddr) {
        for _ in 0..500 {
            match sys::tcp_accept(listener) {
                Ok((s, _)) => {
                    let dst = sys::tcp_local_addr(s.as_raw_fd()).unwrap();
                    return (s, dst);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("accept: {e}"),
            }
        }
        panic!("nothing to accept");
    }

    /// A datagram on the (non-blocking) DNS socket, within a second: its length, sender and the
    /// address it was sent to.
    fn recv_query(dns: RawFd, buf: &mut [u8]) -> Option<(usize, SocketAddrV4, std::net::Ipv4Addr)> {
        for _ in 0..200 {
            match sys::udp_recv(dns, buf) {
                Ok(r) => return Some(r),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        None
    }

    #[test]
    fn steers_every_tcp_destination_to_the_listener_until_disarmed() {
        let ran = in_new_netns(|| {
            let target = "203.0.113.5:22".parse::<SocketAddr>().unwrap();
            let unreachable = TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap_err();
            assert_eq!(unreachable.raw_os_error(), Some(libc::ENETUNREACH), "no route before arming");

            let (listener, port) = sys::tcp_listen(&"127.0.0.1:0".parse().unwrap(), 16).unwrap();
            let steering = Steering::load(listener.as_raw_fd()).unwrap_or_else(|e| panic!("{e}"));
            // Loaded but not armed, the program changes nothing: a DNS server of the guest's
            // own on loopback gets its queries, and outside addresses stay unreachable.
            let own_dns = UdpSocket::bind("127.0.0.1:53").unwrap();
            own_dns.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let asker = UdpSocket::bind("127.0.0.1:0").unwrap();
            asker.send_to(b"q", "127.0.0.1:53").unwrap();
            assert_eq!(own_dns.recv(&mut [0u8; 4]).unwrap(), 1, "an empty slot passes to the kernel's lookup");
            drop(own_dns);
            let still = TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap_err();
            assert_eq!(still.raw_os_error(), Some(libc::ENETUNREACH), "loading alone adds no route");

            let dns = sys::udp_bind(crate::dns::UDP_ADDR).unwrap();
            let icmp = || std::fs::read_to_string(ICMP_ECHO_IGNORE).unwrap().trim().to_owned();
            std::fs::write(ICMP_ECHO_IGNORE, "0").unwrap();
            let armed = steering.arm(listener.as_raw_fd(), dns.as_raw_fd()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(icmp(), "1", "echo requests go unanswered while armed");
            for dst in ["198.18.0.7:443", "203.0.113.5:22"] {
                let dst: SocketAddr = dst.parse().unwrap();
                let mut client = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).unwrap();
                let (sock, got) = accept_dst(listener.as_raw_fd());
                assert_eq!(got, dst, "getsockname of the accepted socket is the client's destination");
                // The accepted socket is the client's peer: bytes go through.
                client.write_all(b"hi").unwrap();
                let mut server = TcpStream::from(sock);
                server.set_nonblocking(false).unwrap();
                let mut buf = [0u8; 2];
                server.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, b"hi");
            }

            // Loopback stays the guest's own: a server on 127.0.0.1 gets its connection, and a
            // closed loopback port refuses.
            let own = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let own_addr = own.local_addr().unwrap();
            let _c = TcpStream::connect(own_addr).unwrap();
            let (_s, from) = own.accept().unwrap();
            assert_eq!(from.ip(), own_addr.ip());
            let closed = TcpStream::connect(("127.0.0.1", if port == 9 { 10 } else { 9 })).unwrap_err();
            assert_eq!(closed.raw_os_error(), Some(libc::ECONNREFUSED));
            assert!(sys::tcp_accept(listener.as_raw_fd()).is_err(), "loopback connections are not steered");

            // IPv6 is not steered yet, and there is no IPv6 route: it still fails closed.
            let v6 = TcpStream::connect_timeout(&"[2001:db8::1]:443".parse().unwrap(), Duration::from_secs(2)).unwrap_err();
            assert_eq!(v6.raw_os_error(), Some(libc::ENETUNREACH));

            // UDP to the outside is dropped: the sender learns at once.
            let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
            udp.connect("203.0.113.5:123").unwrap();
            udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            udp.send(b"ntp").unwrap();
            let refused = udp.recv(&mut [0u8; 16]).unwrap_err();
            assert_eq!(refused.raw_os_error(), Some(libc::ECONNREFUSED));

            // UDP to port 53 reaches the DNS socket, on any address, loopback included, and its
            // reply from the address asked reaches the client's connected socket.
            for to in ["8.8.8.8:53", "127.0.0.1:53"] {
                let q = UdpSocket::bind("0.0.0.0:0").unwrap();
                q.connect(to).unwrap();
                q.send(b"query").unwrap();
                let mut buf = [0u8; 16];
                let (n, peer, dst) = recv_query(dns.as_raw_fd(), &mut buf).unwrap_or_else(|| panic!("the DNS socket got nothing sent to {to}"));
                assert_eq!((&buf[..n], SocketAddr::V4(SocketAddrV4::new(dst, 53))), (&b"query"[..], to.parse().unwrap()));
                sys::udp_send_from(dns.as_raw_fd(), b"answer", peer, dst).unwrap();
                q.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                assert_eq!(q.recv(&mut buf).unwrap(), 6, "the reply from {to} reaches the client");
            }
            // A client on an unconnected socket (sendto, as musl's resolver) gets the answer too.
            let q = UdpSocket::bind("0.0.0.0:0").unwrap();
            q.send_to(b"query", "9.9.9.9:53").unwrap();
            let mut buf = [0u8; 16];
            let (_, peer, dst) = recv_query(dns.as_raw_fd(), &mut buf).expect("the DNS socket got the unconnected query");
            sys::udp_send_from(dns.as_raw_fd(), b"answer", peer, dst).unwrap();
            q.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (n, from) = q.recv_from(&mut buf).expect("the answer reaches an unconnected socket");
            assert_eq!((&buf[..n], from), (&b"answer"[..], "9.9.9.9:53".parse().unwrap()));
            // TCP/53 is steered to its own slot, empty: refused.
            let tcp53 = TcpStream::connect_timeout(&"8.8.8.8:53".parse().unwrap(), Duration::from_secs(2)).unwrap_err();
            assert_eq!(tcp53.raw_os_error(), Some(libc::ECONNREFUSED));

            drop(armed);
            assert_eq!(icmp(), "0", "disarming restores icmp_echo_ignore_all");
            let after = TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap_err();
            assert_eq!(after.raw_os_error(), Some(libc::ENETUNREACH), "disarming removes the route");
            // Disarmed, loopback DNS is the guest's own again.
            let own_dns = UdpSocket::bind("127.0.0.1:53").unwrap();
            own_dns.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            asker.send_to(b"q", "127.0.0.1:53").unwrap();
            assert_eq!(own_dns.recv(&mut [0u8; 4]).unwrap(), 1, "disarming empties the slots");
            drop(own_dns);
            // Arming twice in a row works (the route was deleted, the slots emptied).
            let again = steering.arm(listener.as_raw_fd(), dns.as_raw_fd()).unwrap_or_else(|e| panic!("{e}"));
            let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap();
            c.write_all(b"x").unwrap();
            let _ = accept_dst(listener.as_raw_fd());
            drop(again);
        });
        if ran.is_none() {
            eprintln!("transparent: skipped, this process cannot create a network namespace (run as root)");
        }
    }

    #[test]
    fn program_jumps_land_inside_it() {
        let p = program(3);
        for (i, insn) in p.iter().enumerate() {
            if insn.code == JEQ_IMM || insn.code == JNE_IMM || insn.code == JA {
                let target = i as i64 + 1 + insn.off as i64;
                assert!((0..p.len() as i64).contains(&target), "jump at {i} lands at {target}");
                let t = &p[target as usize];
                // A verdict (r0), a slot choice (r8), the lookup that uses the slot, the
                // loopback check that starts the non-DNS path, or the UDP source-port check.
                let ok = (t.code == MOV64_IMM && (t.regs & 0xf == 0 || t.regs & 0xf == 8))
                    || t.code == STX_W
                    || (t.code == LDX_W && (t.off == CTX_LOCAL_IP4 || t.off == CTX_REMOTE_PORT));
                assert!(ok, "jump at {i} lands on a verdict, a slot choice, the lookup or the loopback check, not {:#x}", t.code);
            }
        }
        // The verifier refuses a program whose last instruction could fall off its end.
        assert!(matches!(p.last().unwrap().code, EXIT | JA));
    }
}
