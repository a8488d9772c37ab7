//! Processes an exec left running: its main process (and chain) ended, but its cgroup still
//! holds processes it started in the background. They keep running, within the exec's limits,
//! and are listed (LIST_BACKGROUND) and killed (KILL_BACKGROUND) on request; an exec started
//! with `detach` asks to be spared by a kill that does not name it.
//!
//! Each leftover watches its cgroup's `cgroup.events` (EPOLLPRI on a change of `populated`):
//! once the last process is gone the group is removed and the entry forgotten.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;

use crate::cgroup::{self, ExecGroup};
use crate::proto::FieldWriter;
use crate::stream::{token, T_CGROUP};
use crate::sys::{Epoll, EPOLLPRI};

struct Leftover {
    group: ExecGroup,
    argv: Vec<Vec<u8>>,
    detached: bool,
    /// cgroup.kill was written: listed no more, forgotten once empty.
    killed: bool,
    events: File,
}

/// The VM's leftovers, by exec id.
#[derive(Default)]
pub struct Background {
    map: BTreeMap<u32, Leftover>,
}

/// Which leftovers a KILL_BACKGROUND is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillTarget {
    /// One exec's, detached or not.
    Exec(u32),
    /// Every exec's that was not started with `detach`.
    Attached,
    /// Every exec's.
    All,
}

impl Background {
    /// An exec ended: removes its group if it is empty, or keeps it as a leftover.
    pub fn settle(&mut self, epoll: &Epoll, group: ExecGroup, argv: Vec<Vec<u8>>, detached: bool, killed: bool) {
        let group = match group.remove() {
            Ok(()) => return,
            Err(g) => g,
        };
        let events = match group.open_events() {
            Ok(f) => f,
            Err(e) => {
                eprintln!("supermachine-agent: cannot watch {}: {e}", group.dir().display());
                return;
            }
        };
        let id = group.id;
        if let Err(e) = epoll.add(events.as_raw_fd(), EPOLLPRI, token(T_CGROUP, 0, 0, id)) {
            eprintln!("supermachine-agent: cannot watch {}: {e}", group.dir().display());
        }
        self.map.insert(id, Leftover { group, argv, detached, killed, events });
        // It may have emptied between the rmdir and the registration.
        self.on_event(id);
    }

    /// `cgroup.events` of exec `id` changed.
    pub fn on_event(&mut self, id: u32) {
        let Some(l) = self.map.get(&id) else { return };
        if cgroup::populated(&l.events) {
            return;
        }
        // Dropping the events file takes it out of the epoll set.
        if let Some(l) = self.map.remove(&id) {
            if let Err(g) = l.group.remove() {
                // A process slipped in between (cannot happen: nothing joins a finished exec's
                // group); keep watching it.
                let events = l.events;
                self.map.insert(id, Leftover { group: g, argv: l.argv, detached: l.detached, killed: l.killed, events });
            }
        }
    }

    /// Kills the leftovers `target` names; returns how many execs' groups were killed.
    pub fn kill(&mut self, target: KillTarget) -> u32 {
        let mut n = 0;
        for (id, l) in self.map.iter_mut() {
            let hit = match target {
                KillTarget::Exec(x) => *id == x,
                KillTarget::Attached => !l.detached,
                KillTarget::All => true,
            };
            if hit && !l.killed {
                l.group.kill();
                l.killed = true;
                n += 1;
            }
        }
        n
    }

    /// LIST_BACKGROUND's answer (OK fields): one `entry` field (tag 5) per exec, holding its fields
    /// (`1 id: u32`, `2 argv: bytes` repeated, `3 pid: u32` repeated, `4 detached: u8`).
    pub fn list(&self) -> Vec<u8> {
        let mut w = FieldWriter::new();
        for (id, l) in self.map.iter().filter(|(_, l)| !l.killed) {
            let pids = l.group.pids();
            if pids.is_empty() {
                continue; // emptied; its event is on the way
            }
            let mut e = FieldWriter::new().u32(1, *id);
            for a in &l.argv {
                e = e.bytes(2, a);
            }
            for p in pids {
                e = e.u32(3, p as u32);
            }
            w = w.bytes(5, &e.u8(4, l.detached as u8).finish());
        }
        w.finish()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}
