//! The bpf(2) system call: the four commands transparent egress needs (create a SOCKMAP, put a
//! socket in it, load a program, link the program to a network namespace). There is no libbpf or
//! aya among Debian's crates, so the attribute structs are written out here as the kernel's
//! `union bpf_attr` lays them out (include/uapi/linux/bpf.h); the kernel accepts a shorter attr
//! than its own and treats the missing tail as zero.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::owned;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

pub const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
pub const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
pub const BPF_SK_LOOKUP: u32 = 36;

/// How much of the verifier's log a failed load keeps.
const LOG_SIZE: usize = 64 * 1024;

/// One eBPF instruction (`struct bpf_insn`): opcode, dst/src registers, offset, immediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// dst in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

#[derive(Debug)]
pub enum BpfError {
    /// A command failed (ENOSYS: the kernel has no CONFIG_BPF_SYSCALL).
    Os(&'static str, io::Error),
    /// The verifier refused the program: the errno and the end of its log.
    Rejected(io::Error, String),
}

impl BpfError {
    pub fn io(&self) -> &io::Error {
        match self {
            BpfError::Os(_, e) | BpfError::Rejected(e, _) => e,
        }
    }
}

impl fmt::Display for BpfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BpfError::Os(what, e) => write!(f, "bpf {what}: {}", super::io_text(e)),
            BpfError::Rejected(e, log) => write!(f, "bpf program load: {}: {log}", super::io_text(e)),
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// bpf(cmd, attr, sizeof attr): a new descriptor (or 0) on success.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: attr points to a live, initialised #[repr(C)] struct of the size passed, laid out
    // as the kernel's bpf_attr member for `cmd`; any pointers inside it are valid for the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, (attr as *mut T).cast::<libc::c_void>(), std::mem::size_of::<T>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as libc::c_int)
    }
}

/// A SOCKMAP of `slots` entries (key u32, value: a socket descriptor as u64).
pub fn sockmap_create(slots: u32) -> Result<OwnedFd, BpfError> {
    let mut attr = MapCreateAttr { map_type: BPF_MAP_TYPE_SOCKMAP, key_size: 4, value_size: 8, max_entries: slots, map_flags: 0 };
    bpf(BPF_MAP_CREATE, &mut attr).map(owned).map_err(|e| BpfError::Os("map create", e))
}

/// Puts socket `sock` (a TCP listener or a bound UDP socket) in slot `key` of `map`.
pub fn sockmap_set(map: &OwnedFd, key: u32, sock: RawFd) -> Result<(), BpfError> {
    let value: u64 = sock as u64;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        value: &value as *const u64 as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ()).map_err(|e| BpfError::Os("map update", e))
}

/// Empties slot `key` of `map` (a slot already empty is fine).
pub fn sockmap_clear(map: &OwnedFd, key: u32) -> Result<(), BpfError> {
    let mut attr = MapElemAttr { map_fd: map.as_raw_fd() as u32, key: &key as *const u32 as u64, ..Default::default() };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(BpfError::Os("map delete", e)),
    }
}

/// Loads `insns` as a program of `prog_type` for `attach_type`. When the verifier refuses it,
/// loads it a second time with the log on, so the error says why.
pub fn prog_load(prog_type: u32, attach_type: u32, insns: &[Insn]) -> Result<OwnedFd, BpfError> {
    let license = b"MIT\0";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: attach_type,
        ..Default::default()
    };
    attr.prog_name[..9].copy_from_slice(b"sm_egress");
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => return Ok(owned(fd)),
        Err(e) if !matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EINVAL)) => return Err(BpfError::Os("program load", e)),
        Err(_) => {}
    }
    let mut log = vec![0u8; LOG_SIZE];
    attr.log_level = 1;
    attr.log_size = LOG_SIZE as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // Loading with the log on succeeded where loading without failed: keep it.
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            // The last lines say what the verifier objected to.
            let lines: Vec<&str> = text.trim_end().lines().collect();
            let tail = lines[lines.len().saturating_sub(4)..].join(" | ");
            Err(BpfError::Rejected(e, tail))
        }
    }
}

/// Attaches `prog` to `target` (for sk_lookup: a descriptor of a network namespace) as a link:
/// closing the returned descriptor detaches it.
pub fn link_create(prog: &OwnedFd, target: RawFd, attach_type: u32) -> Result<OwnedFd, BpfError> {
    let mut attr = LinkCreateAttr { prog_fd: prog.as_raw_fd() as u32, target_fd: target as u32, attach_type, flags: 0 };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned).map_err(|e| BpfError::Os("link create", e))
}
