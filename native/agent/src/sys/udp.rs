//! UDP sockets for the transparent-egress DNS responder: bound to port 53, told each datagram's
//! destination address (IP_PKTINFO), and answering from that address, so a client that sent to
//! 8.8.8.8:53 gets its reply from 8.8.8.8:53 (a connected client socket drops anything else).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::{cvt, owned};

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    }
}

/// A non-blocking, close-on-exec IPv4 UDP socket bound to `addr` (SO_REUSEADDR), with IP_PKTINFO
/// on.
pub fn udp_bind(addr: SocketAddrV4) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let sock = owned(cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?);
    let one: libc::c_int = 1;
    for (level, name) in [(libc::SOL_SOCKET, libc::SO_REUSEADDR), (libc::IPPROTO_IP, libc::IP_PKTINFO)] {
        // SAFETY: `one` is a valid c_int for the duration of the call.
        cvt(unsafe { libc::setsockopt(sock.as_raw_fd(), level, name, (&one as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) })?;
    }
    let sin = sockaddr_in(addr);
    // SAFETY: sin is a valid sockaddr_in of the size given.
    cvt(unsafe { libc::bind(sock.as_raw_fd(), (&sin as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t) })?;
    Ok(sock)
}

/// Control-message space for one in_pktinfo (CMSG_SPACE, rounded up generously and aligned).
#[repr(C, align(8))]
struct Cmsg([u8; 64]);

/// Receives one datagram into `buf`: its length, the sender, and the address it was sent to.
/// WouldBlock when none waits.
pub fn udp_recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4, Ipv4Addr)> {
    // SAFETY: sockaddr_in is plain data.
    let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = Cmsg([0; 64]);
    // SAFETY: msghdr is plain data; every pointer is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: msg points at from, iov (over buf) and control, all live for the call.
    let n = cvt(unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_TRUNC) as libc::c_int })? as usize;
    let mut dst = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_PKTINFO {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>());
                dst = Some(Ipv4Addr::from(info.ipi_addr.s_addr.to_ne_bytes()));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let peer = SocketAddrV4::new(Ipv4Addr::from(from.sin_addr.s_addr.to_ne_bytes()), u16::from_be(from.sin_port));
    let dst = dst.ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO))?;
    Ok((n.min(buf.len()), peer, dst))
}

/// Sends `buf` to `to` from address `src` (the socket's own port).
pub fn udp_send_from(fd: RawFd, buf: &[u8], to: SocketAddrV4, src: Ipv4Addr) -> io::Result<()> {
    let mut sin = sockaddr_in(to);
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut control = Cmsg([0; 64]);
    // SAFETY: msghdr is plain data; every pointer is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut sin as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) } as _;
    // SAFETY: the control buffer is 64 bytes, more than CMSG_SPACE(in_pktinfo), and aligned.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_PKTINFO;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr { s_addr: u32::from_ne_bytes(src.octets()) },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>(), info);
    }
    // SAFETY: msg points at sin, iov (over buf) and control, all live for the call.
    cvt(unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) as libc::c_int }).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receives_with_the_destination_and_answers_from_it() {
        let server = udp_bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = crate::sys::tcp_local_addr(server.as_raw_fd()).unwrap().port();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(("127.0.0.1", port)).unwrap();
        client.send(b"q").unwrap();
        let mut buf = [0u8; 16];
        let mut got = None;
        for _ in 0..200 {
            match udp_recv(server.as_raw_fd(), &mut buf) {
                Ok(r) => {
                    got = Some(r);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(std::time::Duration::from_millis(5)),
                Err(e) => panic!("{e}"),
            }
        }
        let (n, peer, dst) = got.expect("a datagram");
        assert_eq!((&buf[..n], dst), (&b"q"[..], Ipv4Addr::LOCALHOST));
        assert_eq!(std::net::SocketAddr::V4(peer), client.local_addr().unwrap());
        udp_send_from(server.as_raw_fd(), b"a", peer, dst).unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        assert_eq!(client.recv(&mut buf).unwrap(), 1);
    }
}
