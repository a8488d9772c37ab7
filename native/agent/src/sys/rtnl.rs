//! rtnetlink by hand: adds and deletes the "AnyIP" route `local 0.0.0.0/0 dev lo` (table local),
//! which makes every IPv4 address local to the guest. A connect() to any address then loops
//! back through `lo` to the socket lookup (where transparent egress steers it) instead of
//! failing with ENETUNREACH. One request per socket, then its acknowledgement.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{cvt, cvt_size, owned};

#[repr(C)]
struct RouteRequest {
    hdr: libc::nlmsghdr,
    rtm: RtMsg,
    /// RTA_OIF: rtattr header, then the interface index.
    oif_len: u16,
    oif_type: u16,
    oif: u32,
}

/// `struct rtmsg` (linux/rtnetlink.h); libc 0.2.139 does not define it.
#[repr(C)]
struct RtMsg {
    family: u8,
    dst_len: u8,
    src_len: u8,
    tos: u8,
    table: u8,
    protocol: u8,
    scope: u8,
    kind: u8,
    flags: u32,
}

const RTPROT_STATIC: u8 = 4;

/// Adds (`add`) or deletes the IPv4 local default route on interface `ifindex` (lo is 1).
/// Adding one that exists, or deleting one that does not, is not an error.
pub fn local_default_route(add: bool, ifindex: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    let sock = owned(cvt(unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) })?);
    let flags = if add { libc::NLM_F_CREATE | libc::NLM_F_EXCL } else { 0 };
    let req = RouteRequest {
        hdr: libc::nlmsghdr {
            nlmsg_len: size_of::<RouteRequest>() as u32,
            nlmsg_type: if add { libc::RTM_NEWROUTE } else { libc::RTM_DELROUTE },
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK | flags) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        rtm: RtMsg {
            family: libc::AF_INET as u8,
            dst_len: 0,
            src_len: 0,
            tos: 0,
            table: libc::RT_TABLE_LOCAL,
            protocol: RTPROT_STATIC,
            scope: libc::RT_SCOPE_HOST,
            kind: libc::RTN_LOCAL,
            flags: 0,
        },
        oif_len: 8,
        oif_type: libc::RTA_OIF,
        oif: ifindex,
    };
    // SAFETY: sockaddr_nl is plain data; zero is a valid value for its padding.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: req and kernel are live and of the sizes passed.
    cvt_size(unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            (&req as *const RouteRequest).cast(),
            size_of::<RouteRequest>(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    })?;
    match read_ack(&sock) {
        Err(e) if add && e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) if !add && e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        r => r,
    }
}

/// Reads the kernel's NLMSG_ERROR answer: error 0 is success, else a negative errno.
fn read_ack(sock: &OwnedFd) -> io::Result<()> {
    let mut buf = [0u32; 256]; // u32 for the alignment of nlmsghdr
    // SAFETY: buf is writable for its whole size.
    let n = cvt_size(unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), size_of::<[u32; 256]>(), 0) })?;
    let hdr_len = size_of::<libc::nlmsghdr>();
    if n < hdr_len + 4 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short rtnetlink answer"));
    }
    // SAFETY: buf holds at least a header, and u32 storage is aligned for nlmsghdr.
    let hdr = unsafe { &*(buf.as_ptr().cast::<libc::nlmsghdr>()) };
    if hdr.nlmsg_type != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "rtnetlink answer is not an acknowledgement"));
    }
    let error = buf[hdr_len / 4] as i32;
    if error == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-error))
    }
}
