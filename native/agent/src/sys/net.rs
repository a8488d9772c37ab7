//! TCP sockets: connecting, listening, accepting, and the socket options the agent sets.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr;

use super::{cvt, owned};

/// Starts a non-blocking TCP connect. Ok((socket, true)): connected already; Ok((socket,
/// false)): in progress (writable once done; then see `socket_error`).
pub fn tcp_connect(addr: &SocketAddr) -> io::Result<(OwnedFd, bool)> {
    let sock = tcp_socket(addr)?;
    // A forwarder writes what the host sent as soon as it arrives: Nagle's algorithm would hold a
    // small write back until the previous one is acknowledged (with a delayed ACK, up to 40 ms).
    set_nodelay(sock.as_raw_fd())?;
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid address of `len` bytes.
    let r = unsafe {
        libc::connect(sock.as_raw_fd(), (&storage as *const libc::sockaddr_storage).cast(), len)
    };
    if r == 0 {
        return Ok((sock, true));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINPROGRESS) | Some(libc::EINTR) => Ok((sock, false)),
        _ => Err(e),
    }
}

/// A non-blocking, close-on-exec TCP socket of `addr`'s family.
fn tcp_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall.
    Ok(owned(cvt(unsafe {
        libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    })?))
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: `v` is a valid c_int for the duration of the call.
    cvt(unsafe {
        libc::setsockopt(fd, level, name, (&v as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    })
    .map(|_| ())
}

fn set_nodelay(fd: RawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

/// `addr` as a C socket address.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data large enough for either address family.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is suitably aligned.
            unsafe { ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage, which is suitably aligned.
            unsafe { ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The port of a socket address the kernel filled in (0 for another family).
fn sockaddr_port(storage: &libc::sockaddr_storage) -> u16 {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in; storage is aligned for it.
            let sin = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            u16::from_be(sin.sin_port)
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6; storage is aligned for it.
            let sin6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            u16::from_be(sin6.sin6_port)
        }
        _ => 0,
    }
}

/// A non-blocking listening TCP socket on `addr` (SO_REUSEADDR), and the port it is bound to.
pub fn tcp_listen(addr: &SocketAddr, backlog: i32) -> io::Result<(OwnedFd, u16)> {
    let sock = tcp_socket(addr)?;
    setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid address of `len` bytes.
    cvt(unsafe { libc::bind(sock.as_raw_fd(), (&storage as *const libc::sockaddr_storage).cast(), len) })?;
    // SAFETY: plain syscall.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), backlog) })?;
    // SAFETY: sockaddr_storage is plain data.
    let mut bound: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut blen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: bound and blen are valid out-pointers; blen holds bound's size.
    cvt(unsafe { libc::getsockname(sock.as_raw_fd(), (&mut bound as *mut libc::sockaddr_storage).cast(), &mut blen) })?;
    Ok((sock, sockaddr_port(&bound)))
}

/// Accepts one connection from a non-blocking listener: a non-blocking, close-on-exec socket
/// with TCP_NODELAY, and the peer's port. WouldBlock when nobody waits.
pub fn tcp_accept(listener: RawFd) -> io::Result<(OwnedFd, u16)> {
    // SAFETY: sockaddr_storage is plain data.
    let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: peer and len are valid out-pointers; len holds peer's size.
    let fd = cvt(unsafe {
        libc::accept4(listener, (&mut peer as *mut libc::sockaddr_storage).cast(), &mut len, libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
    })?;
    let sock = owned(fd);
    set_nodelay(sock.as_raw_fd())?;
    Ok((sock, sockaddr_port(&peer)))
}

/// The local address of a socket (for a connection accepted through transparent egress: the
/// address and port the guest client connected to). An IPv4-mapped IPv6 address is unmapped.
pub fn tcp_local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len are valid out-pointers; len holds storage's size.
    cvt(unsafe { libc::getsockname(fd, (&mut storage as *mut libc::sockaddr_storage).cast(), &mut len) })?;
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in; storage is aligned for it.
            let sin = unsafe { &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Ok(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6; storage is aligned for it.
            let sin6 = unsafe { &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let ip = ip.to_ipv4_mapped().map_or(std::net::IpAddr::V6(ip), std::net::IpAddr::V4);
            Ok(SocketAddr::new(ip, u16::from_be(sin6.sin6_port)))
        }
        _ => Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
    }
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid out-pointers of the sizes given.
    cvt(unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut libc::c_int).cast(), &mut len) })?;
    Ok(v)
}

/// Takes the socket's pending error (SO_ERROR): 0 when there is none.
pub fn socket_error(fd: RawFd) -> io::Result<i32> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR)
}

/// shutdown(SHUT_WR): the peer reads EOF once everything written before has arrived.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::shutdown(fd, libc::SHUT_WR) }).map(|_| ())
}

/// SO_LINGER with a zero timeout: closing the socket then sends a reset.
pub fn set_linger_reset(fd: RawFd) -> io::Result<()> {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: l is a valid struct linger for the duration of the call.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// A descriptor for the network namespace of socket `sock` (SIOCGSKNS; needs CAP_NET_ADMIN).
/// It avoids /proc, and it names the namespace of the calling thread's socket, not of the
/// process's first thread.
pub fn socket_netns(sock: RawFd) -> io::Result<OwnedFd> {
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor.
    let fd = unsafe { libc::ioctl(sock, SIOCGSKNS as _) };
    cvt(fd).map(owned)
}

/// Moves the calling thread into a new, empty network namespace (tests of transparent egress).
#[cfg(test)]
pub fn unshare_net() -> io::Result<()> {
    // SAFETY: plain syscall; it changes only the calling thread's namespace.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) }).map(|_| ())
}
