//! FS_WATCH: a long-lived stream that reports what happens in a directory (and, recursive, in
//! every directory below it, those created later included) as event records on channel 1,
//! until the host sends CANCEL, the connection goes, a HELLO arrives, or the directory itself
//! is removed. One inotify instance per stream, registered in the epoll set; it closes with
//! the stream.
//!
//! Memory is bounded: at most MAX_WATCHES directories per stream, and at most MAX_QUEUE bytes
//! of events waiting for window credit; past either (or when the kernel's own queue overflows)
//! the stream ends with TOO_LARGE, so a host never silently misses events.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use crate::proto;
use crate::proto_fs::{self as pfs, EventKind, PathRecursive};
use crate::stream::{Ctx, Stream, Watched};
use crate::sys::{self, EPOLLIN};

/// Directories one recursive watch may cover.
pub const MAX_WATCHES: usize = 8192;
/// Bytes of events that may wait for the host's credit.
pub const MAX_QUEUE: usize = 1 << 20;

const EVENTS: u32 = sys::IN_CREATE | sys::IN_MODIFY | sys::IN_DELETE | sys::IN_MOVED_FROM | sys::IN_MOVED_TO | sys::IN_ATTRIB | sys::IN_EXCL_UNLINK;

#[derive(Debug)]
pub enum WatchError {
    Os { what: &'static str, path: PathBuf, error: io::Error },
    TooManyDirs(PathBuf),
    /// Events came faster than the host took them (ours), or the kernel's queue overflowed.
    Overflow(&'static str),
}

impl WatchError {
    pub fn code(&self) -> u32 {
        match self {
            WatchError::Os { error, .. } if error.kind() == io::ErrorKind::NotFound => proto::NOT_FOUND,
            WatchError::Os { .. } => proto::IO,
            WatchError::TooManyDirs(_) | WatchError::Overflow(_) => proto::TOO_LARGE,
        }
    }

    pub fn errno(&self) -> Option<i32> {
        match self {
            WatchError::Os { error, .. } => error.raw_os_error(),
            _ => None,
        }
    }
}

impl fmt::Display for WatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchError::Os { what, path, error } => write!(f, "{what} {}: {}", path.display(), sys::io_text(error)),
            WatchError::TooManyDirs(p) => write!(f, "{}: more than {MAX_WATCHES} directories to watch", p.display()),
            WatchError::Overflow(why) => write!(f, "event queue overflow: {why}"),
        }
    }
}

/// One inotify event, decoded from the bytes read (struct inotify_event: wd, mask, cookie,
/// len, then `len` bytes of NUL-padded name).
#[derive(Debug, PartialEq, Eq)]
pub struct RawEvent<'a> {
    pub wd: i32,
    pub mask: u32,
    /// Pairs the two halves of a rename (IN_MOVED_FROM, IN_MOVED_TO).
    pub cookie: u32,
    pub name: &'a [u8],
}

pub fn parse_events(buf: &[u8]) -> Vec<RawEvent<'_>> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 16 {
        let word = |i: usize| u32::from_ne_bytes(rest[i..i + 4].try_into().expect("4 bytes"));
        let (wd, mask, cookie, len) = (word(0) as i32, word(4), word(8), word(12) as usize);
        let Some(name) = rest.get(16..16 + len) else { break };
        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        out.push(RawEvent { wd, mask, cookie, name: &name[..end] });
        rest = &rest[16 + len..];
    }
    out
}

/// Whether relative path `d` is `dir` or below it.
fn is_within(d: &[u8], dir: &[u8]) -> bool {
    d.starts_with(dir) && (d.len() == dir.len() || d[dir.len()] == b'/')
}

fn rel_join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

pub struct WatchStream {
    ino: Option<Watched>,
    /// The watched directory, as the request named it.
    root: Vec<u8>,
    recursive: bool,
    /// Watch descriptor → the directory relative to the root ("" for the root).
    dirs: HashMap<i32, Vec<u8>>,
    root_wd: i32,
    /// Encoded event records not sent yet.
    queue: Vec<u8>,
    window: u64,
    /// Watched directories moved away (IN_MOVED_FROM) whose IN_MOVED_TO has not been seen:
    /// (cookie, relative path). The kernel queues the two halves together, so what is still
    /// here after a read has left the tree.
    moved: Vec<(u32, Vec<u8>)>,
    /// The root is gone: end (OK) once the queue is sent.
    root_gone: bool,
    finished: bool,
}

impl WatchStream {
    fn fd(&self) -> i32 {
        self.ino.as_ref().map_or(-1, Watched::raw)
    }

    fn abs(&self, rel: &[u8]) -> Vec<u8> {
        match (self.root.as_slice(), rel.is_empty()) {
            (root, true) => root.to_vec(),
            (b"/", false) => [b"/", rel].concat(),
            (root, false) => [root, b"/", rel].concat(),
        }
    }

    /// Watches directory `rel` and, recursively, the directories below it. Directories that
    /// vanish meanwhile are skipped; symlinks are never followed.
    fn add_tree(&mut self, rel: Vec<u8>) -> Result<(), WatchError> {
        let mut todo = vec![rel];
        while let Some(rel) = todo.pop() {
            let abs = self.abs(&rel);
            let wd = match sys::inotify_add_watch(self.fd(), &abs, EVENTS | sys::IN_ONLYDIR | sys::IN_DONT_FOLLOW) {
                Ok(wd) => wd,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::EACCES)) => continue,
                Err(error) => return Err(WatchError::Os { what: "cannot watch", path: PathBuf::from(OsString::from_vec(abs)), error }),
            };
            self.dirs.insert(wd, rel.clone());
            if self.dirs.len() > MAX_WATCHES {
                return Err(WatchError::TooManyDirs(PathBuf::from(OsString::from_vec(self.root.clone()))));
            }
            let Ok(entries) = fs::read_dir(OsStr::from_bytes(&abs)) else { continue };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(rel_join(&rel, &e.file_name().into_vec()));
                }
            }
        }
        Ok(())
    }

    /// Stops watching directory `rel` and everything below it (it moved out of the tree).
    fn drop_tree(&mut self, rel: &[u8]) {
        let fd = self.fd();
        self.dirs.retain(|&wd, d| {
            let inside = is_within(d, rel);
            if inside {
                sys::inotify_rm_watch(fd, wd);
            }
            !inside
        });
    }

    /// Directory `from` and everything below it moved to `to` within the tree: the watches
    /// stay (they follow the inodes), their names change.
    fn rename_tree(&mut self, from: &[u8], to: &[u8]) {
        for d in self.dirs.values_mut() {
            if is_within(d, from) {
                *d = [to, &d[from.len()..]].concat();
            }
        }
    }

    fn push(&mut self, kind: EventKind, name: &[u8]) {
        pfs::push_record(&mut self.queue, &pfs::event(kind, name));
    }

    /// Reads and translates everything inotify has queued.
    fn read_events(&mut self) -> Result<(), WatchError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sys::read(self.fd(), &mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) => return Err(WatchError::Os { what: "cannot read events of", path: PathBuf::from(OsString::from_vec(self.root.clone())), error }),
            };
            for ev in parse_events(&buf[..n]) {
                self.on_raw(&ev)?;
            }
            if self.queue.len() > MAX_QUEUE {
                return Err(WatchError::Overflow("the host does not take events as fast as they come"));
            }
        }
    }

    /// After a read: directories moved out of the tree are no longer watched.
    fn settle_moves(&mut self) {
        for (_, rel) in std::mem::take(&mut self.moved) {
            self.drop_tree(&rel);
        }
    }

    fn on_raw(&mut self, ev: &RawEvent) -> Result<(), WatchError> {
        let (wd, mask, name) = (ev.wd, ev.mask, ev.name);
        if mask & sys::IN_Q_OVERFLOW != 0 {
            return Err(WatchError::Overflow("the guest kernel's inotify queue overflowed"));
        }
        let Some(dir) = self.dirs.get(&wd) else { return Ok(()) };
        if mask & sys::IN_IGNORED != 0 {
            self.dirs.remove(&wd);
            if wd == self.root_wd {
                self.root_gone = true;
            }
            return Ok(());
        }
        // Events about a watched directory itself (no name) are reported by its parent too.
        if name.is_empty() {
            return Ok(());
        }
        let rel = rel_join(dir, name);
        let is_dir = mask & sys::IN_ISDIR != 0;
        let kind = if mask & (sys::IN_CREATE | sys::IN_MOVED_TO) != 0 {
            if self.recursive && is_dir {
                let from = self.moved.iter().position(|(c, _)| mask & sys::IN_MOVED_TO != 0 && *c == ev.cookie);
                match from {
                    Some(i) => {
                        let (_, from) = self.moved.swap_remove(i);
                        self.rename_tree(&from, &rel);
                    }
                    None => self.add_tree(rel.clone())?,
                }
            }
            EventKind::Create
        } else if mask & sys::IN_MODIFY != 0 {
            EventKind::Write
        } else if mask & sys::IN_DELETE != 0 {
            EventKind::Remove
        } else if mask & sys::IN_MOVED_FROM != 0 {
            if self.recursive && is_dir {
                self.moved.push((ev.cookie, rel.clone()));
            }
            EventKind::Rename
        } else if mask & sys::IN_ATTRIB != 0 {
            EventKind::Chmod
        } else {
            return Ok(());
        };
        self.push(kind, &rel);
        Ok(())
    }

    /// Sends what the window allows; ends the stream once the root is gone and all is sent.
    fn flush(&mut self, cx: &mut Ctx) {
        if !cx.can_produce() {
            return;
        }
        while !self.queue.is_empty() && self.window > 0 {
            let n = self.queue.len().min(self.window as usize).min(proto::MAX_DATA);
            cx.send(proto::DATA, proto::STDOUT, &self.queue[..n]);
            self.queue.drain(..n);
            self.window -= n as u64;
        }
        if self.root_gone && self.queue.is_empty() {
            self.close();
            cx.eof(proto::STDOUT);
            cx.send(proto::OK, 0, &[]);
        }
    }

    fn fail(&mut self, cx: &mut Ctx, e: &WatchError) {
        self.close();
        cx.error(e.code(), &e.to_string(), e.errno());
    }

    /// Closes the inotify instance (its watches go with it) and forgets everything.
    fn close(&mut self) {
        self.finished = true;
        self.ino = None;
        self.dirs.clear();
        self.queue = Vec::new();
    }
}

fn open_inner(cx: &mut Ctx, req: PathRecursive) -> Result<WatchStream, WatchError> {
    let path = PathBuf::from(OsStr::from_bytes(&req.path));
    let fd: OwnedFd = sys::inotify_init().map_err(|error| WatchError::Os { what: "cannot watch", path: path.clone(), error })?;
    let mut s = WatchStream {
        ino: Some(Watched::new(fd)),
        root: req.path.clone(),
        recursive: req.recursive,
        dirs: HashMap::new(),
        root_wd: -1,
        moved: Vec::new(),
        queue: Vec::new(),
        window: proto::INITIAL_WINDOW as u64,
        root_gone: false,
        finished: false,
    };
    // The root itself may be a symlink to a directory (followed); nothing below it is.
    let wd = sys::inotify_add_watch(s.fd(), &req.path, EVENTS | sys::IN_ONLYDIR).map_err(|error| WatchError::Os { what: "cannot watch", path: path.clone(), error })?;
    s.root_wd = wd;
    s.dirs.insert(wd, Vec::new());
    if req.recursive {
        let subdirs: Vec<Vec<u8>> = fs::read_dir(&path)
            .map_err(|error| WatchError::Os { what: "cannot list", path: path.clone(), error })?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().into_vec())
            .collect();
        for d in subdirs {
            s.add_tree(d)?;
        }
    }
    let token = cx.token(0);
    if let Some(w) = s.ino.as_mut() {
        w.want(cx.epoll, token, EPOLLIN).map_err(|error| WatchError::Os { what: "cannot watch", path, error })?;
    }
    Ok(s)
}

pub fn open(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    let req = match PathRecursive::parse(payload, true) {
        Ok(r) => r,
        Err(e) => {
            cx.error(proto::BAD_REQUEST, &e.to_string(), None);
            return None;
        }
    };
    match open_inner(cx, req) {
        Ok(s) => {
            // The host may now rely on the watch: everything after this is reported.
            cx.send(proto::STARTED, 0, &[]);
            Some(Box::new(s))
        }
        Err(e) => {
            cx.error(e.code(), &e.to_string(), e.errno());
            None
        }
    }
}

impl Stream for WatchStream {
    fn on_event(&mut self, cx: &mut Ctx, _slot: u8, _events: u32) {
        if self.finished {
            return;
        }
        let r = self.read_events();
        self.settle_moves();
        match r {
            Ok(()) => self.flush(cx),
            Err(e) => self.fail(cx, &e),
        }
    }

    fn on_window(&mut self, _cx: &mut Ctx, channel: u8, inc: u32) {
        if channel == proto::STDOUT {
            self.window = self.window.saturating_add(inc as u64);
        }
    }

    /// Sends events held back for want of credit (or while the connection was paused).
    fn pump(&mut self, cx: &mut Ctx) {
        if !self.finished {
            self.flush(cx);
        }
    }

    fn wants_pump(&self) -> bool {
        !self.finished && self.window > 0 && (!self.queue.is_empty() || self.root_gone)
    }

    fn on_cancel(&mut self, cx: &mut Ctx) {
        self.close();
        cx.error(proto::IO, "cancelled", None);
    }

    fn abort(&mut self, _cx: &mut Ctx) {
        self.close();
    }

    fn ends_on_hello(&self) -> bool {
        true
    }

    fn done(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode() {
        let mut b = Vec::new();
        for (wd, mask, name) in [(1i32, sys::IN_CREATE, &b"abc"[..]), (2, sys::IN_IGNORED, b"")] {
            let padded = if name.is_empty() { 0 } else { 16 };
            b.extend_from_slice(&wd.to_ne_bytes());
            b.extend_from_slice(&mask.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&(padded as u32).to_ne_bytes());
            let mut n = name.to_vec();
            n.resize(padded, 0);
            b.extend_from_slice(&n);
        }
        let evs = parse_events(&b);
        assert_eq!(evs, vec![RawEvent { wd: 1, mask: sys::IN_CREATE, cookie: 0, name: b"abc" }, RawEvent { wd: 2, mask: sys::IN_IGNORED, cookie: 0, name: b"" }]);
        // A cut event is not decoded.
        assert_eq!(parse_events(&b[..20]).len(), 0);
        assert_eq!(rel_join(b"", b"a"), b"a");
        assert_eq!(rel_join(b"a/b", b"c"), b"a/b/c");
        assert!(is_within(b"a/b", b"a") && is_within(b"a", b"a"));
        assert!(!is_within(b"ab", b"a") && !is_within(b"b/a", b"a"));
    }
}
