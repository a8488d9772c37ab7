//! Boot-time system calls, PID 1 only: mounts, chroot, the hostname, loopback up, entropy, power off.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr;

use super::{cstr, cvt, owned};

pub fn mkdir(path: &str, mode: u32) -> io::Result<()> {
    let p = cstr(path.as_bytes())?;
    // SAFETY: valid C string.
    match cvt(unsafe { libc::mkdir(p.as_ptr(), mode as libc::mode_t) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map(|_| ()),
    }
}

pub fn mount(source: &str, target: &str, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>) -> io::Result<()> {
    let source = cstr(source.as_bytes())?;
    let target = cstr(target.as_bytes())?;
    let fstype = fstype.map(|s| cstr(s.as_bytes())).transpose()?;
    let data = data.map(|s| cstr(s.as_bytes())).transpose()?;
    // SAFETY: all pointers are valid C strings or NULL.
    cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref().map_or(ptr::null(), |s| s.as_ptr().cast()),
        )
    })
    .map(|_| ())
}

pub use libc::{MS_BIND, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT};

pub fn chroot(path: &str) -> io::Result<()> {
    let p = cstr(path.as_bytes())?;
    // SAFETY: valid C string.
    cvt(unsafe { libc::chroot(p.as_ptr()) }).map(|_| ())
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
}

/// Sets IFF_UP on an interface (e.g. "lo").
pub fn interface_up(name: &str) -> io::Result<()> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() >= 16 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: plain syscall.
    let sock = owned(cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?);
    let mut req = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: req has the layout of struct ifreq (16-byte name + 24-byte union).
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut IfReq) })?;
    req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req as *mut IfReq) }).map(|_| ())
}

/// Mixes `data` into the kernel RNG, crediting it (RNDADDENTROPY), or just mixes it in.
pub fn add_entropy(data: &[u8]) -> io::Result<()> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 0x03, int[2])
    if data.is_empty() {
        return Ok(());
    }
    let mut info = Vec::with_capacity(8 + data.len());
    info.extend_from_slice(&((data.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(data.len() as i32).to_ne_bytes());
    info.extend_from_slice(data);
    info.resize(8 + data.len().div_ceil(4) * 4, 0);
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/random") {
        // SAFETY: info is a struct rand_pool_info with buf_size bytes of buffer following.
        if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } == 0 {
            // Reseed now rather than at the next periodic reseed, so that VMs restored from
            // one snapshot diverge from their first read of /dev/urandom on.
            // SAFETY: argument-less ioctl on the random device.
            unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) };
            return Ok(());
        }
    }
    use std::io::Write;
    std::fs::OpenOptions::new().write(true).open("/dev/urandom")?.write_all(data)
}

pub fn sync() {
    // SAFETY: cannot fail.
    unsafe { libc::sync() };
}

/// Kills every process except this one (PID 1 use).
pub fn kill_all() {
    // SAFETY: kill(-1) from init signals every other process.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}

/// Restarts the machine; QEMU runs with -no-reboot, so this ends the VM. Never returns.
pub fn reboot() -> ! {
    // SAFETY: reboot only returns on error (e.g. not PID 1 / no CAP_SYS_BOOT).
    unsafe {
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        // SAFETY: pause just sleeps; PID 1 must never exit.
        unsafe { libc::pause() };
    }
}
