//! The fake-IP table of transparent egress: the agent's DNS answers an allowed name with an
//! address from 198.18.0.0/15 (RFC 2544 benchmarking space, which no policy range uses), and a
//! later connect to that address tells the agent which name the program meant. One address per
//! name, stable while the name is in use; when the table is full the least recently used name
//! gives up its address. The table lives in agent memory on purpose, so a snapshot keeps it and
//! a restored program's cached answers still connect.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

/// 198.18.0.0: the range's first address, never handed out (index 0 is 198.18.0.1).
const BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// Addresses in the /15 after the base, minus the last (198.19.255.255).
const RANGE: u32 = (1 << 17) - 2;
/// The default bound: about 100 bytes per entry, so some 6.5 MB at worst.
pub const DEFAULT_CAPACITY: u32 = 65_536;

struct Entry {
    name: String,
    tick: u64,
}

pub struct FakeIps {
    capacity: u32,
    by_name: HashMap<String, u32>,
    entries: Vec<Entry>,
    /// Last use → index, oldest first.
    order: BTreeMap<u64, u32>,
    tick: u64,
}

impl FakeIps {
    pub fn new(capacity: u32) -> FakeIps {
        FakeIps { capacity: capacity.clamp(1, RANGE), by_name: HashMap::new(), entries: Vec::new(), order: BTreeMap::new(), tick: 0 }
    }

    /// Whether `ip` is in the fake range (whether or not it is assigned now).
    pub fn in_range(ip: Ipv4Addr) -> bool {
        u32::from(ip) >> 17 == BASE >> 17
    }

    fn touch(&mut self, index: u32) {
        self.tick += 1;
        let e = &mut self.entries[index as usize];
        self.order.remove(&e.tick);
        e.tick = self.tick;
        self.order.insert(self.tick, index);
    }

    fn address(index: u32) -> Ipv4Addr {
        Ipv4Addr::from(BASE + 1 + index)
    }

    /// The address of `name` (lowercase, dotted), allocating one, or taking the least recently
    /// used name's when the table is full.
    pub fn assign(&mut self, name: &str) -> Ipv4Addr {
        if let Some(&index) = self.by_name.get(name) {
            self.touch(index);
            return Self::address(index);
        }
        let index = if (self.entries.len() as u32) < self.capacity {
            self.entries.push(Entry { name: name.to_owned(), tick: 0 });
            self.entries.len() as u32 - 1
        } else {
            let (&tick, &oldest) = self.order.iter().next().expect("a full table has entries");
            self.order.remove(&tick);
            let old = std::mem::replace(&mut self.entries[oldest as usize].name, name.to_owned());
            self.by_name.remove(&old);
            oldest
        };
        self.by_name.insert(name.to_owned(), index);
        self.touch(index);
        Self::address(index)
    }

    /// The name `ip` stands for now, if any. Counts as a use.
    pub fn name_of(&mut self, ip: Ipv4Addr) -> Option<String> {
        if !Self::in_range(ip) {
            return None;
        }
        let index = u32::from(ip).checked_sub(BASE + 1)?;
        if index as usize >= self.entries.len() {
            return None;
        }
        self.touch(index);
        Some(self.entries[index as usize].name.clone())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_stable_address_per_name() {
        let mut t = FakeIps::new(DEFAULT_CAPACITY);
        let a = t.assign("web.test");
        let b = t.assign("api.test");
        assert_eq!(a, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(b, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(t.assign("web.test"), a);
        assert_eq!(t.name_of(a).as_deref(), Some("web.test"));
        assert_eq!(t.name_of(b).as_deref(), Some("api.test"));
        assert_eq!(t.name_of(Ipv4Addr::new(198, 18, 0, 3)), None, "not assigned yet");
        assert_eq!(t.name_of(Ipv4Addr::new(198, 18, 0, 0)), None, "the base is never used");
        assert_eq!(t.name_of(Ipv4Addr::new(203, 0, 113, 5)), None);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_full_table_recycles_the_least_recently_used() {
        let mut t = FakeIps::new(3);
        let a = t.assign("a.test");
        let b = t.assign("b.test");
        let c = t.assign("c.test");
        // Using a (by name) and b (by a connect to its address) leaves c the oldest.
        t.assign("a.test");
        t.name_of(b);
        let d = t.assign("d.test");
        assert_eq!(d, c, "d takes c's address");
        assert_eq!(t.name_of(c).as_deref(), Some("d.test"));
        assert_eq!(t.assign("a.test"), a);
        assert_eq!(t.assign("b.test"), b);
        // The order of last use is now d (looked up above), a, b: c comes back in d's place.
        assert_eq!(t.assign("c.test"), d);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn the_range_is_198_18_slash_15() {
        assert!(FakeIps::in_range(Ipv4Addr::new(198, 18, 0, 1)));
        assert!(FakeIps::in_range(Ipv4Addr::new(198, 19, 255, 254)));
        assert!(!FakeIps::in_range(Ipv4Addr::new(198, 20, 0, 1)));
        assert!(!FakeIps::in_range(Ipv4Addr::new(198, 17, 255, 255)));
        let mut t = FakeIps::new(u32::MAX);
        assert_eq!(t.capacity, RANGE);
        for i in 0..300 {
            assert!(FakeIps::in_range(t.assign(&format!("n{i}.test"))));
        }
    }
}
