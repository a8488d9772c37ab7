//! Per-VM identity (PROTOCOL.md, HELLO `vm_id`). Every VM restored from one snapshot starts
//! with the same guest RAM, so whatever the guest generated before the capture is the same in
//! every clone. The kernel's `boot_id` is one of those values: it is generated once, on its
//! first read, and cannot be written. So when the host names a new VM id on the primary port,
//! the agent (after mixing in the HELLO's entropy and reseeding the RNG):
//!
//! - writes the id to `/run/supermachine/vm-id`;
//! - draws a new boot id from the reseeded RNG and writes it to `/run/supermachine/boot_id`,
//!   which is bind-mounted (read-only) over `/proc/sys/kernel/random/boot_id` the first time;
//!   later changes rewrite that file in place (same length, same inode), so the mount stays.
//!
//! The same HELLO with the same id changes nothing, so a reconnecting host does not make a VM
//! look rebooted.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use crate::sys::{self, MS_BIND, MS_RDONLY, MS_REMOUNT};

pub const RUN_DIR: &str = "/run/supermachine";
pub const VM_ID_FILE: &str = "/run/supermachine/vm-id";
pub const BOOT_ID_FILE: &str = "/run/supermachine/boot_id";
pub const PROC_BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

#[derive(Debug)]
pub enum IdentityError {
    Step(&'static str, io::Error),
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::Step(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

fn step<T>(what: &'static str, r: io::Result<T>) -> Result<T, IdentityError> {
    r.map_err(|e| IdentityError::Step(what, e))
}

/// The VM id this guest has taken, if any. Plain state in the agent's memory, so a snapshot
/// keeps it, and a clone knows that the id its host names is a new one.
#[derive(Default)]
pub struct Identity {
    vm_id: Option<Vec<u8>>,
}

impl Identity {
    /// Takes `vm_id` as this VM's id; returns whether anything changed.
    pub fn assume(&mut self, vm_id: &[u8]) -> Result<bool, IdentityError> {
        if self.vm_id.as_deref() == Some(vm_id) {
            return Ok(false);
        }
        apply(vm_id, &new_boot_id()?)?;
        self.vm_id = Some(vm_id.to_vec());
        Ok(true)
    }
}

/// A random UUID (version 4) in the kernel's `boot_id` format: 36 characters and a newline.
fn new_boot_id() -> Result<String, IdentityError> {
    let mut b = [0u8; 16];
    let mut f = step("open /dev/urandom", std::fs::File::open("/dev/urandom"))?;
    step("read /dev/urandom", f.read_exact(&mut b))?;
    Ok(format_uuid(b))
}

pub fn format_uuid(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}\n", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

fn apply(vm_id: &[u8], boot_id: &str) -> Result<(), IdentityError> {
    match std::fs::create_dir(RUN_DIR) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return step("mkdir /run/supermachine", Err(e)),
        _ => {}
    }
    // Rewritten in place: the bind mount over /proc holds this inode. Every boot id has the
    // same length, so nothing is ever truncated and a reader sees one id or the other.
    let f = step(
        "open /run/supermachine/boot_id",
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o444).open(BOOT_ID_FILE),
    )?;
    step("write /run/supermachine/boot_id", f.write_all_at(boot_id.as_bytes(), 0))?;
    step("truncate /run/supermachine/boot_id", f.set_len(boot_id.len() as u64))?;
    drop(f);
    if std::fs::read_to_string(PROC_BOOT_ID).ok().as_deref() != Some(boot_id) {
        // First time (or someone in the guest unmounted it): bind it over the kernel's.
        step("bind boot_id", sys::mount(BOOT_ID_FILE, PROC_BOOT_ID, None, MS_BIND, None))?;
        // Read-only like the kernel's own; best effort (the file is 0444 anyway).
        let _ = sys::mount("", PROC_BOOT_ID, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None);
        let seen = step("read boot_id", std::fs::read_to_string(PROC_BOOT_ID))?;
        if seen != boot_id {
            return step("bind boot_id", Err(io::Error::other("the bind mount did not take")));
        }
    }
    // The id file is replaced atomically (nothing mounts it).
    let tmp = format!("{RUN_DIR}/.vm-id.tmp");
    let mut text = vm_id.to_vec();
    text.push(b'\n');
    let _ = std::fs::remove_file(&tmp);
    let f = step("create vm-id", std::fs::OpenOptions::new().write(true).create_new(true).mode(0o444).open(&tmp))?;
    step("write vm-id", f.write_all_at(&text, 0))?;
    drop(f);
    step("rename vm-id", std::fs::rename(&tmp, VM_ID_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_format_matches_the_kernel() {
        let u = format_uuid([0xff; 16]);
        assert_eq!(u, "ffffffff-ffff-4fff-bfff-ffffffffffff\n");
        let u = format_uuid([0; 16]);
        assert_eq!(u, "00000000-0000-4000-8000-000000000000\n");
        assert_eq!(new_boot_id().unwrap().len(), 37);
        assert_ne!(new_boot_id().unwrap(), new_boot_id().unwrap());
    }
}
