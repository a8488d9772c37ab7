//! PID-1 boot (PROTOCOL.md section 5): mounts, overlay root, switch root, lo, hostname, ports.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::server::Port;
use crate::sys::{self, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY};

const DEFAULT_PORT: &str = "supermachine.0";
const DEFAULT_EXEC_PORT: &str = "supermachine.1";
const NEW_ROOT: &str = "/sm/root";
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// How long ports that exist may take to get their names once the primary has its own.
const NAME_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub enum InitError {
    Step(String, io::Error),
    Timeout(String),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Step(what, e) => write!(f, "{what}: {e}"),
            InitError::Timeout(what) => write!(f, "timed out waiting for {what}"),
        }
    }
}

fn step<T>(what: impl FnOnce() -> String, r: io::Result<T>) -> Result<T, InitError> {
    r.map_err(|e| InitError::Step(what(), e))
}

fn mkdir(path: &str, mode: u32) -> Result<(), InitError> {
    step(|| format!("mkdir {path}"), sys::mkdir(path, mode))
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) -> Result<(), InitError> {
    match sys::mount(source, target, Some(fstype), flags, data) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()), // already mounted
        r => step(|| format!("mount {fstype} on {target}"), r),
    }
}

fn log(msg: &str) {
    eprintln!("supermachine-agent: {msg}");
}

/// First thing PID 1 does: /dev and a console on descriptors 0-2 (the initramfs holds only
/// /init, so nothing is open yet). Failures are tolerated: there may be no console at all.
pub fn early_console() {
    let _ = sys::mkdir("/dev", 0o755);
    let _ = sys::mount("devtmpfs", "/dev", Some("devtmpfs"), MS_NOSUID, Some("mode=0755"));
    if sys::redirect_stdio(c"/dev/console").is_err() {
        sys::ensure_std_fds();
    }
}

/// Settings from the kernel command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Cmdline {
    pub root: Option<String>,
    pub port: String,
    pub exec_port: String,
}

pub fn parse_cmdline(text: &str) -> Cmdline {
    let mut c = Cmdline { root: None, port: DEFAULT_PORT.to_string(), exec_port: DEFAULT_EXEC_PORT.to_string() };
    for word in text.split_ascii_whitespace() {
        if let Some(v) = word.strip_prefix("sm.root=") {
            c.root = Some(v.to_string()).filter(|v| !v.is_empty());
        } else if let Some(v) = word.strip_prefix("sm.port=") {
            c.port = v.to_string();
        } else if let Some(v) = word.strip_prefix("sm.exec_port=") {
            c.exec_port = v.to_string();
        }
    }
    c
}

/// The boot contract. Returns the opened virtio ports (O_RDWR | O_NONBLOCK | O_CLOEXEC): the
/// primary one, waited for, and the exec port if the VM has one.
pub fn boot() -> Result<Vec<Port>, InitError> {
    mkdir("/proc", 0o555)?;
    mkdir("/sys", 0o555)?;
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)?;
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)?;
    let cmdline = step(|| "read /proc/cmdline".into(), std::fs::read_to_string("/proc/cmdline"))?;
    let cmdline = parse_cmdline(&cmdline);

    match &cmdline.root {
        Some(root) => {
            overlay_root(root)?;
            switch_root(NEW_ROOT)?;
        }
        None => extra_mounts("")?, // debugging: stay on the initramfs
    }
    if let Err(e) = sys::interface_up("lo") {
        log(&format!("cannot bring up lo: {e}"));
    }
    if let Err(e) = sys::sethostname("supermachine") {
        log(&format!("cannot set hostname: {e}"));
    }
    let primary = open_port(&cmdline.port)?;
    let mut ports = vec![Port { fd: primary, name: cmdline.port.clone(), primary: true }];
    // The exec port is not waited for: a VM without one boots all the same. QEMU announces
    // every port (PORT_ADD) at once when the driver is ready, ahead of the names it sends in
    // answer to each port's PORT_READY, so once the primary has its name every other port
    // exists, at worst a moment before its name (the sysfs `name` attribute appears with it).
    // A port that never gets a name (a virtconsole without name=) would cost NAME_WAIT once.
    if !cmdline.exec_port.is_empty() && cmdline.exec_port != cmdline.port {
        let start = Instant::now();
        while !all_ports_named() && start.elapsed() < NAME_WAIT {
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(dev) = find_port(&cmdline.exec_port) {
            match open_dev(&dev) {
                Ok(fd) => ports.push(Port { fd, name: cmdline.exec_port, primary: false }),
                Err(e) => log(&format!("exec port {}: {e}", cmdline.exec_port)),
            }
        }
    }
    Ok(ports)
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<(), InitError> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > DEVICE_WAIT {
            return Err(InitError::Timeout(what.to_string()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// squashfs (read-only) + tmpfs (upper, work) → overlay at NEW_ROOT, with the API filesystems.
fn overlay_root(root: &str) -> Result<(), InitError> {
    wait_for(root, || Path::new(root).exists())?;
    for d in ["/sm", "/sm/lower", "/sm/rw", NEW_ROOT] {
        mkdir(d, 0o755)?;
    }
    mount(root, "/sm/lower", "squashfs", MS_RDONLY, None)?;
    mount("tmpfs", "/sm/rw", "tmpfs", 0, Some("mode=0755"))?;
    mkdir("/sm/rw/upper", 0o755)?;
    mkdir("/sm/rw/work", 0o755)?;
    mount(
        "overlay",
        NEW_ROOT,
        "overlay",
        0,
        Some("lowerdir=/sm/lower,upperdir=/sm/rw/upper,workdir=/sm/rw/work"),
    )?;
    for d in ["proc", "sys", "dev", "run"] {
        mkdir(&format!("{NEW_ROOT}/{d}"), 0o755)?;
    }
    mount("proc", &format!("{NEW_ROOT}/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)?;
    mount("sysfs", &format!("{NEW_ROOT}/sys"), "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)?;
    mount("devtmpfs", &format!("{NEW_ROOT}/dev"), "devtmpfs", MS_NOSUID, Some("mode=0755"))?;
    extra_mounts(NEW_ROOT)?;
    let tmp = format!("{NEW_ROOT}/tmp");
    if !Path::new(&tmp).exists() {
        mkdir(&tmp, 0o1777)?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777));
    }
    Ok(())
}

/// /dev/pts, /dev/shm, /run and the usual /dev symlinks under `base`.
fn extra_mounts(base: &str) -> Result<(), InitError> {
    for d in ["dev/pts", "dev/shm", "run"] {
        mkdir(&format!("{base}/{d}"), 0o755)?;
    }
    mount(
        "devpts",
        &format!("{base}/dev/pts"),
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount("tmpfs", &format!("{base}/dev/shm"), "tmpfs", MS_NOSUID | MS_NODEV, Some("mode=1777"))?;
    mount("tmpfs", &format!("{base}/run"), "tmpfs", MS_NOSUID | MS_NODEV, Some("mode=0755"))?;
    let links = [
        ("dev/ptmx", "pts/ptmx"),
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
    ];
    for (link, target) in links {
        let link = format!("{base}/{link}");
        let _ = std::fs::remove_file(&link);
        let _ = std::os::unix::fs::symlink(target, &link);
    }
    Ok(())
}

/// Moves `new_root` over / and chroots into it.
fn switch_root(new_root: &str) -> Result<(), InitError> {
    step(|| format!("chdir {new_root}"), std::env::set_current_dir(new_root))?;
    step(|| "move the new root onto /".into(), sys::mount(".", "/", None, MS_MOVE, None))?;
    step(|| "chroot".into(), sys::chroot("."))?;
    step(|| "chdir /".into(), std::env::set_current_dir("/"))
}

/// Finds /sys/class/virtio-ports/<vportXpY> whose name is `name` and opens /dev/<vportXpY>.
fn open_port(name: &str) -> Result<OwnedFd, InitError> {
    let mut found = None;
    wait_for(&format!("virtio port {name}"), || {
        found = find_port(name);
        found.is_some()
    })?;
    open_dev(&found.unwrap_or_default())
}

/// Opens /dev/<dev> (a vportXpY whose sysfs entry exists).
fn open_dev(dev: &str) -> Result<OwnedFd, InitError> {
    let path = CString::new(format!("/dev/{dev}")).map_err(|_| InitError::Timeout(dev.to_string()))?;
    let mut result = sys::open_rw_nonblock(&path);
    // The device node may appear a moment after the sysfs entry.
    let start = Instant::now();
    while matches!(&result, Err(e) if e.kind() == io::ErrorKind::NotFound) && start.elapsed() < DEVICE_WAIT {
        std::thread::sleep(Duration::from_millis(5));
        result = sys::open_rw_nonblock(&path);
    }
    step(|| format!("open /dev/{dev}"), result)
}

fn all_ports_named() -> bool {
    let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") else { return true };
    dir.flatten().all(|e| e.path().join("name").exists())
}

fn find_port(name: &str) -> Option<String> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let Ok(n) = std::fs::read_to_string(entry.path().join("name")) else { continue };
        if n.trim_end() == name {
            return entry.file_name().to_str().map(str::to_string);
        }
    }
    None
}

/// Reports a fatal boot error on the console and ends the VM. PID 1 never just exits.
pub fn fatal(msg: &str) -> ! {
    log(&format!("fatal: {msg}"));
    sys::sync();
    sys::reboot()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        let c = parse_cmdline("console=hvc0 quiet sm.root=/dev/vda sm.port=sm.1 panic=-1 sm.exec_port=sm.x\n");
        assert_eq!(c, Cmdline { root: Some("/dev/vda".into()), port: "sm.1".into(), exec_port: "sm.x".into() });
        let c = parse_cmdline("console=ttyS0");
        assert_eq!(c, Cmdline { root: None, port: DEFAULT_PORT.into(), exec_port: DEFAULT_EXEC_PORT.into() });
    }
}
