//! Processes an exec left running: its main process (and chain) ended, but its cgroup still
//! holds processes it started in the background. They keep running, within the exec's limits,
//! and are listed (LIST_BACKGROUND) and killed (KILL_BACKGROUND) on request; an exec started
//! with `detach` asks to be spared by a kill that does not name it.
//!
//! Each leftover watches its cgroup's `cgroup.events` (EPOLLPRI on a change of `populated`):
//! once the last process is gone the group is handed back (for reuse or removal) and the entry
//! forgotten.

use std::collections::BTreeMap;

use crate::cgroup::ExecGroup;
use crate::proto::{FieldWriter, KillTarget};
use crate::token::{token, T_CGROUP};
use crate::sys::{Epoll, EPOLLPRI};

struct Leftover {
    group: ExecGroup,
    argv: Vec<Vec<u8>>,
    detached: bool,
    /// cgroup.kill was written: listed no more, forgotten once empty.
    killed: bool,
}

/// The VM's leftovers, by exec id.
#[derive(Default)]
pub struct Background {
    map: BTreeMap<u32, Leftover>,
}


impl Background {
    /// Keeps the group of an exec that ended while processes still run in it. Gives the group
    /// back if it emptied meanwhile (or cannot be watched: then it is killed first).
    pub fn adopt(&mut self, epoll: &Epoll, group: ExecGroup, argv: Vec<Vec<u8>>, detached: bool, killed: bool) -> Option<ExecGroup> {
        let id = group.id;
        if let Err(e) = epoll.add(group.events_fd(), EPOLLPRI, token(T_CGROUP, 0, 0, id)) {
            // Unwatched, it would never be removed: it does not get to run on.
            eprintln!("supermachine-agent: cannot watch {}: {e}; killing what runs in it", group.dir().display());
            group.kill();
        }
        self.map.insert(id, Leftover { group, argv, detached, killed });
        self.on_event(epoll, id)
    }

    /// `cgroup.events` of exec `id` changed: its group, once nothing runs in it any more.
    pub fn on_event(&mut self, epoll: &Epoll, id: u32) -> Option<ExecGroup> {
        if self.map.get(&id)?.group.populated() {
            return None;
        }
        let l = self.map.remove(&id)?;
        epoll.delete(l.group.events_fd());
        Some(l.group)
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

    /// LIST_BACKGROUND's answer (OK fields): one `entry` field (tag 5) per exec, holding its
    /// fields (`1 id: u32`, `2 argv: bytes` repeated, `3 pid: u32` repeated, `4 detached: u8`).
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
}
