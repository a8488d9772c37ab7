//! FS_STAT, FS_MKDIR, FS_RENAME, FS_REMOVE (answered at once, with OK or STREAM_ERROR) and
//! FS_LIST (a stream: the entries go out as records on channel 1, under flow control, while
//! the walk goes on). The requests are decoded in proto_fs.rs; FS_WATCH is watch.rs's.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, Permissions};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{chown, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::proto::{self, ProtoError};
use crate::proto_fs::{self as pfs, FileInfo, FsList, FsMkdir, FsRename, FsStat, PathRecursive};
use crate::stream::{Ctx, Stream};
use crate::sys;

#[derive(Debug)]
pub enum FsError {
    /// A system call failed: `what` the agent was doing, on which path.
    Os { what: &'static str, path: PathBuf, error: io::Error },
    Rename { from: PathBuf, to: PathBuf, error: io::Error },
    /// FS_LIST: more entries than `max_entries`.
    TooLarge { path: PathBuf, max: u64 },
}

impl FsError {
    fn error(&self) -> Option<&io::Error> {
        match self {
            FsError::Os { error, .. } | FsError::Rename { error, .. } => Some(error),
            FsError::TooLarge { .. } => None,
        }
    }

    /// The STREAM_ERROR code.
    pub fn code(&self) -> u32 {
        match self.error() {
            Some(e) if e.kind() == io::ErrorKind::NotFound => proto::NOT_FOUND,
            Some(_) => proto::IO,
            None => proto::TOO_LARGE,
        }
    }

    /// The errno behind the error, if a system call gave one.
    pub fn errno(&self) -> Option<i32> {
        self.error().and_then(io::Error::raw_os_error)
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsError::Os { what, path, error } => write!(f, "{what} {}: {}", path.display(), sys::io_text(error)),
            FsError::Rename { from, to, error } => write!(f, "cannot rename {} to {}: {}", from.display(), to.display(), sys::io_text(error)),
            FsError::TooLarge { path, max } => write!(f, "{}: more than {max} entries", path.display()),
        }
    }
}

fn os<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |error| FsError::Os { what, path: path.to_path_buf(), error }
}

fn path_buf(p: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(p))
}

/// Answers a request that ends at once: OK with `ok`'s fields, or the error.
fn answer(cx: &mut Ctx, r: Result<Vec<u8>, FsError>) -> Option<Box<dyn Stream>> {
    match r {
        Ok(fields) => cx.send(proto::OK, 0, &fields),
        Err(e) => cx.error(e.code(), &e.to_string(), e.errno()),
    }
    None
}

fn bad_request(cx: &mut Ctx, e: ProtoError) -> Option<Box<dyn Stream>> {
    cx.error(proto::BAD_REQUEST, &e.to_string(), None);
    None
}

// ---------------------------------------------------------------------------------------------
// FS_STAT

/// A file's fields; with `follow` a symlink is reported as what it points to.
pub fn stat_path(path: &Path, follow: bool) -> Result<FileInfo, FsError> {
    let meta = if follow { fs::metadata(path) } else { fs::symlink_metadata(path) }.map_err(os("cannot stat", path))?;
    let target = if meta.file_type().is_symlink() { fs::read_link(path).ok().map(|t| t.into_os_string().into_vec()) } else { None };
    Ok(FileInfo::of(&meta, target))
}

pub fn stat(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    let req = match FsStat::parse(payload) {
        Ok(r) => r,
        Err(e) => return bad_request(cx, e),
    };
    let r = stat_path(&path_buf(&req.path), req.follow).map(|info| info.encode(&req.path, pfs::name_of(&req.path)));
    answer(cx, r)
}

// ---------------------------------------------------------------------------------------------
// FS_MKDIR

/// Creates one directory with the request's mode and owner (regardless of the umask).
fn create_dir(path: &Path, req: &FsMkdir) -> io::Result<()> {
    fs::DirBuilder::new().mode(req.mode).create(path)?;
    if req.uid.is_some() || req.gid.is_some() {
        chown(path, req.uid, req.gid)?;
    }
    // After chown, which clears set-id bits.
    fs::set_permissions(path, Permissions::from_mode(req.mode))
}

/// Whether it created the directory. With `parents`, missing parents are created too (each
/// with the mode and owner) and an existing directory is no error.
pub fn make_dir(req: &FsMkdir) -> Result<bool, FsError> {
    let path = path_buf(&req.path);
    if !req.parents {
        create_dir(&path, req).map_err(os("cannot create directory", &path))?;
        return Ok(true);
    }
    // The missing part of the path, deepest first.
    let mut missing = Vec::new();
    let mut at = path.as_path();
    loop {
        match fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) if at == path => return Err(FsError::Os { what: "cannot create directory", path, error: io::Error::from_raw_os_error(libc::EEXIST) }),
            Ok(_) => return Err(FsError::Os { what: "cannot create directory", path, error: io::Error::from_raw_os_error(libc::ENOTDIR) }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(at),
            Err(e) => return Err(FsError::Os { what: "cannot stat", path: at.to_path_buf(), error: e }),
        }
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    let mut created = false;
    for dir in missing.iter().rev() {
        match create_dir(dir, req) {
            Ok(()) => created = *dir == path.as_path(),
            // Made meanwhile by someone else: fine if it is a directory.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && fs::metadata(dir).is_ok_and(|m| m.is_dir()) => {}
            Err(e) => return Err(FsError::Os { what: "cannot create directory", path: dir.to_path_buf(), error: e }),
        }
    }
    Ok(created)
}

pub fn mkdir(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    match FsMkdir::parse(payload) {
        Ok(req) => answer(cx, make_dir(&req).map(pfs::ok_created)),
        Err(e) => bad_request(cx, e),
    }
}

// ---------------------------------------------------------------------------------------------
// FS_RENAME and FS_REMOVE

pub fn rename(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    let req = match FsRename::parse(payload) {
        Ok(r) => r,
        Err(e) => return bad_request(cx, e),
    };
    let (from, to) = (path_buf(&req.from), path_buf(&req.to));
    let r = fs::rename(&from, &to).map(|()| Vec::new()).map_err(|error| FsError::Rename { from, to, error });
    answer(cx, r)
}

/// Removes a file, a symlink (not what it points to) or an empty directory; with `recursive`
/// a directory and everything in it, never following a symlink out of the tree (std's
/// `remove_dir_all` walks with openat/unlinkat and O_NOFOLLOW).
pub fn remove_path(path: &Path, recursive: bool) -> Result<(), FsError> {
    let meta = fs::symlink_metadata(path).map_err(os("cannot stat", path))?;
    let r = match (meta.is_dir(), recursive) {
        (true, true) => fs::remove_dir_all(path),
        (true, false) => fs::remove_dir(path),
        (false, _) => fs::remove_file(path),
    };
    r.map_err(os("cannot remove", path))
}

pub fn remove(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    match PathRecursive::parse(payload, false) {
        Ok(req) => answer(cx, remove_path(&path_buf(&req.path), req.recursive).map(|()| Vec::new())),
        Err(e) => bad_request(cx, e),
    }
}

// ---------------------------------------------------------------------------------------------
// FS_LIST

/// Records are gathered up to this many bytes before they go out.
const FILL: usize = 32 * 1024;

/// One directory of the walk: the names still to visit, sorted.
struct Level {
    dir: Vec<u8>,
    names: std::vec::IntoIter<Vec<u8>>,
    /// The depth of this directory's entries (1: the listed directory's own).
    depth: u32,
}

/// A depth-first walk that sends each entry as a record: a directory's entries in name order,
/// each directory's own entries right after it. Symlinks are reported, never followed; a
/// subdirectory that cannot be read (gone meanwhile, no permission) is reported but not
/// entered. Names count against `max_entries` as they are read, so a huge directory ends the
/// listing with TOO_LARGE without being held in memory.
pub struct ListStream {
    root: PathBuf,
    stack: Vec<Level>,
    max_depth: u32,
    max_entries: u64,
    seen: u64,
    sent: u64,
    /// Encoded records not sent yet.
    buf: Vec<u8>,
    window: u64,
    finished: bool,
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    if dir != b"/" {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

impl ListStream {
    /// Reads a directory's names, sorted, counting them against the entry limit.
    fn read_names(&mut self, dir: &[u8]) -> Result<Vec<Vec<u8>>, FsError> {
        let path = path_buf(dir);
        let mut names = Vec::new();
        for entry in fs::read_dir(&path).map_err(os("cannot list", &path))? {
            let entry = entry.map_err(os("cannot list", &path))?;
            self.seen += 1;
            if self.seen > self.max_entries {
                return Err(FsError::TooLarge { path: self.root.clone(), max: self.max_entries });
            }
            names.push(entry.file_name().into_vec());
        }
        names.sort_unstable();
        Ok(names)
    }

    /// The next entry's record; None when the walk is over.
    fn next_record(&mut self) -> Result<Option<Vec<u8>>, FsError> {
        loop {
            let Some(top) = self.stack.last_mut() else { return Ok(None) };
            let Some(name) = top.names.next() else {
                self.stack.pop();
                continue;
            };
            let (path, depth) = (join(&top.dir, &name), top.depth);
            let info = match stat_path(&path_buf(&path), false) {
                Ok(i) => i,
                // Removed since it was read: not there any more.
                Err(FsError::Os { error, .. }) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if info.kind == pfs::TYPE_DIR && depth < self.max_depth {
                match self.read_names(&path) {
                    Ok(names) => self.stack.push(Level { dir: path.clone(), names: names.into_iter(), depth: depth + 1 }),
                    Err(e @ FsError::TooLarge { .. }) => return Err(e),
                    Err(_) => {}
                }
            }
            self.sent += 1;
            return Ok(Some(info.encode(&path, &name)));
        }
    }
}

pub fn open_list(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    let req = match FsList::parse(payload) {
        Ok(r) => r,
        Err(e) => return bad_request(cx, e),
    };
    let mut s = ListStream {
        root: path_buf(&req.path),
        stack: Vec::new(),
        max_depth: req.depth,
        max_entries: req.max_entries,
        seen: 0,
        sent: 0,
        buf: Vec::new(),
        window: proto::INITIAL_WINDOW as u64,
        finished: false,
    };
    // The listed directory's own errors (missing, not a directory) end the request at once.
    match s.read_names(&req.path) {
        Ok(names) => s.stack.push(Level { dir: req.path, names: names.into_iter(), depth: 1 }),
        Err(e) => return answer(cx, Err(e)),
    }
    Some(Box::new(s))
}

impl Stream for ListStream {
    fn on_window(&mut self, _cx: &mut Ctx, channel: u8, inc: u32) {
        if channel == proto::STDOUT {
            self.window = self.window.saturating_add(inc as u64);
        }
    }

    /// Walks until a chunk of records is ready, and sends what the window allows.
    fn pump(&mut self, cx: &mut Ctx) {
        if self.finished || !cx.can_produce() {
            return;
        }
        while self.buf.len() < FILL && !self.stack.is_empty() {
            match self.next_record() {
                Ok(Some(rec)) => pfs::push_record(&mut self.buf, &rec),
                Ok(None) => break,
                Err(e) => {
                    self.finished = true;
                    cx.error(e.code(), &e.to_string(), e.errno());
                    return;
                }
            }
        }
        while !self.buf.is_empty() && self.window > 0 {
            let n = self.buf.len().min(self.window as usize).min(proto::MAX_DATA);
            cx.send(proto::DATA, proto::STDOUT, &self.buf[..n]);
            self.buf.drain(..n);
            self.window -= n as u64;
        }
        if self.buf.is_empty() && self.stack.is_empty() {
            self.finished = true;
            cx.eof(proto::STDOUT);
            cx.send(proto::OK, 0, &pfs::ok_count(self.sent));
        }
    }

    fn wants_pump(&self) -> bool {
        !self.finished && self.window > 0
    }

    fn on_cancel(&mut self, cx: &mut Ctx) {
        self.finished = true;
        cx.error(proto::IO, "cancelled", None);
    }

    fn abort(&mut self, _cx: &mut Ctx) {
        self.finished = true;
        self.stack.clear();
    }

    fn done(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sm-fsops-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn mk(path: &Path, mode: u32, parents: bool) -> Result<bool, FsError> {
        make_dir(&FsMkdir { path: path.as_os_str().as_bytes().to_vec(), mode, parents, uid: None, gid: None })
    }

    #[test]
    fn stat_reports_symlinks_unless_followed() {
        let d = tmp("stat");
        fs::write(d.join("f"), b"hello").unwrap();
        std::os::unix::fs::symlink(d.join("f"), d.join("l")).unwrap();
        let f = stat_path(&d.join("f"), false).unwrap();
        assert_eq!((f.kind, f.size, f.target), (pfs::TYPE_FILE, 5, None));
        let l = stat_path(&d.join("l"), false).unwrap();
        assert_eq!((l.kind, l.target.as_deref()), (pfs::TYPE_SYMLINK, Some(d.join("f").as_os_str().as_bytes())));
        assert_eq!(stat_path(&d.join("l"), true).unwrap().kind, pfs::TYPE_FILE);
        assert_eq!(stat_path(&d, false).unwrap().kind, pfs::TYPE_DIR);
        let e = stat_path(&d.join("none"), false).unwrap_err();
        assert_eq!((e.code(), e.errno()), (proto::NOT_FOUND, Some(libc::ENOENT)));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mkdir_modes_parents_and_existing() {
        let d = tmp("mkdir");
        assert!(mk(&d.join("a"), 0o700, false).unwrap());
        assert_eq!(fs::metadata(d.join("a")).unwrap().permissions().mode() & 0o7777, 0o700);
        assert_eq!(mk(&d.join("a"), 0o755, false).unwrap_err().errno(), Some(libc::EEXIST));
        assert!(!mk(&d.join("a"), 0o755, true).unwrap());
        assert_eq!(mk(&d.join("x/y"), 0o755, false).unwrap_err().errno(), Some(libc::ENOENT));
        assert!(mk(&d.join("x/y/z"), 0o750, true).unwrap());
        for p in ["x", "x/y", "x/y/z"] {
            assert_eq!(fs::metadata(d.join(p)).unwrap().permissions().mode() & 0o7777, 0o750, "{p}");
        }
        fs::write(d.join("file"), b"").unwrap();
        assert_eq!(mk(&d.join("file"), 0o755, true).unwrap_err().errno(), Some(libc::EEXIST));
        assert_eq!(mk(&d.join("file/sub"), 0o755, true).unwrap_err().errno(), Some(libc::ENOTDIR));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn remove_does_not_follow_symlinks() {
        let d = tmp("remove");
        let outside = tmp("remove-outside");
        fs::write(outside.join("keep"), b"x").unwrap();
        fs::create_dir_all(d.join("t/sub")).unwrap();
        fs::write(d.join("t/sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, d.join("t/link")).unwrap();
        assert_eq!(remove_path(&d.join("t"), false).unwrap_err().errno(), Some(libc::ENOTEMPTY));
        remove_path(&d.join("t"), true).unwrap();
        assert!(!d.join("t").exists());
        assert!(outside.join("keep").exists());
        // A symlink itself is removed, not its target.
        std::os::unix::fs::symlink(&outside, d.join("l")).unwrap();
        remove_path(&d.join("l"), true).unwrap();
        assert!(outside.join("keep").exists());
        assert_eq!(remove_path(&d.join("none"), false).unwrap_err().code(), proto::NOT_FOUND);
        fs::remove_dir_all(&d).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn list_walks_in_order_without_following_links() {
        let d = tmp("list");
        fs::create_dir_all(d.join("b/c")).unwrap();
        fs::write(d.join("a"), b"1").unwrap();
        fs::write(d.join("b/c/deep"), b"1").unwrap();
        fs::write(d.join("b/x"), b"1").unwrap();
        std::os::unix::fs::symlink(d.join("b"), d.join("z")).unwrap();
        let root = d.as_os_str().as_bytes().to_vec();
        let walk = |depth: u32| {
            let mut s = ListStream { root: d.clone(), stack: Vec::new(), max_depth: depth, max_entries: 100, seen: 0, sent: 0, buf: Vec::new(), window: 0, finished: false };
            let names = s.read_names(&root).unwrap();
            s.stack.push(Level { dir: root.clone(), names: names.into_iter(), depth: 1 });
            let mut paths = Vec::new();
            while let Some(rec) = s.next_record().unwrap() {
                let f = proto::fields(&rec).next().unwrap().unwrap();
                paths.push(String::from_utf8(f.value[root.len()..].to_vec()).unwrap());
            }
            paths
        };
        assert_eq!(walk(1), ["/a", "/b", "/z"]);
        assert_eq!(walk(2), ["/a", "/b", "/b/c", "/b/x", "/z"]);
        assert_eq!(walk(9), ["/a", "/b", "/b/c", "/b/c/deep", "/b/x", "/z"]);
        fs::remove_dir_all(&d).unwrap();
    }
}
