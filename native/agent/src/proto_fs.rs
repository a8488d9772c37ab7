//! The FS_* messages of PROTOCOL.md (version 5): their requests, decoded, and the records the
//! agent sends back (a file's fields, a listing's entries, a watch's events). The message types
//! are in proto.rs with the others; the file system work is fs_ops.rs's and watch.rs's.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

use crate::proto::{fields, flag, FieldWriter, ProtoError};

/// Longest path a request may name (PATH_MAX, the terminating NUL included).
pub const MAX_PATH: usize = 4096;
/// The most entries one FS_LIST may return (and its default `max_entries`): beyond, it ends
/// with TOO_LARGE.
pub const MAX_LIST_ENTRIES: u64 = 100_000;

/// Whether `p` is an absolute, normalised path: `/`, or `/` followed by non-empty components
/// other than `.` and `..`, separated by single slashes, without a trailing slash or a NUL.
pub fn normalised(p: &[u8]) -> bool {
    if p.first() != Some(&b'/') || p.len() >= MAX_PATH || p.contains(&0) {
        return false;
    }
    p == b"/" || p[1..].split(|&c| c == b'/').all(|c| !c.is_empty() && c != b"." && c != b"..")
}

const BAD_PATH: &str = "path must be absolute and normalised (no '.', '..', '//' or trailing '/'), under 4096 bytes";

/// A path field: required, normalised; `root_ok` false refuses `/` itself.
fn path_of(p: Option<Vec<u8>>, root_ok: bool) -> Result<Vec<u8>, ProtoError> {
    let p = p.ok_or(ProtoError::Invalid("path missing"))?;
    if !normalised(&p) {
        return Err(ProtoError::Invalid(BAD_PATH));
    }
    if !root_ok && p == b"/" {
        return Err(ProtoError::Invalid("the root directory itself cannot be the target"));
    }
    Ok(p)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsStat {
    pub path: Vec<u8>,
    /// stat(2) rather than lstat(2): a symlink is reported as what it points to.
    pub follow: bool,
}

impl FsStat {
    pub fn parse(payload: &[u8]) -> Result<FsStat, ProtoError> {
        let (mut path, mut follow) = (None, false);
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => path = Some(f.value.to_vec()),
                2 => follow = flag(&f, "follow must be 0 or 1")?,
                _ => {}
            }
        }
        Ok(FsStat { path: path_of(path, true)?, follow })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsList {
    pub path: Vec<u8>,
    /// 1: the directory's entries; 2: theirs too; and so on.
    pub depth: u32,
    /// More entries than this end the listing with TOO_LARGE (1..=MAX_LIST_ENTRIES).
    pub max_entries: u64,
}

impl FsList {
    pub fn parse(payload: &[u8]) -> Result<FsList, ProtoError> {
        let (mut path, mut depth, mut max_entries) = (None, 1, MAX_LIST_ENTRIES);
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => path = Some(f.value.to_vec()),
                2 => depth = f.u32()?,
                3 => {
                    max_entries = match f.u32()? as u64 {
                        0 => MAX_LIST_ENTRIES,
                        n if n <= MAX_LIST_ENTRIES => n,
                        _ => return Err(ProtoError::Invalid("max_entries must be at most 100000")),
                    }
                }
                _ => {}
            }
        }
        if depth == 0 {
            return Err(ProtoError::Invalid("depth must be at least 1"));
        }
        Ok(FsList { path: path_of(path, true)?, depth, max_entries })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsMkdir {
    pub path: Vec<u8>,
    /// Permission bits of every directory it creates.
    pub mode: u32,
    /// Create missing parents, and take an existing directory as success.
    pub parents: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl FsMkdir {
    pub fn parse(payload: &[u8]) -> Result<FsMkdir, ProtoError> {
        let mut m = FsMkdir { path: Vec::new(), mode: 0o755, parents: false, uid: None, gid: None };
        let mut path = None;
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => path = Some(f.value.to_vec()),
                2 => m.mode = f.u32()? & 0o7777,
                3 => m.parents = flag(&f, "parents must be 0 or 1")?,
                4 => m.uid = Some(f.u32()?),
                5 => m.gid = Some(f.u32()?),
                _ => {}
            }
        }
        m.path = path_of(path, false)?;
        Ok(m)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsRename {
    pub from: Vec<u8>,
    pub to: Vec<u8>,
}

impl FsRename {
    pub fn parse(payload: &[u8]) -> Result<FsRename, ProtoError> {
        let (mut from, mut to) = (None, None);
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => from = Some(f.value.to_vec()),
                2 => to = Some(f.value.to_vec()),
                _ => {}
            }
        }
        let from = path_of(from, false)?;
        let to = path_of(to, false).map_err(|_| ProtoError::Invalid("to must be an absolute, normalised path other than /"))?;
        Ok(FsRename { from, to })
    }
}

/// FS_REMOVE and FS_WATCH: a path and a `recursive` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRecursive {
    pub path: Vec<u8>,
    pub recursive: bool,
}

impl PathRecursive {
    /// `root_ok`: FS_WATCH may watch `/`; FS_REMOVE may not remove it.
    pub fn parse(payload: &[u8], root_ok: bool) -> Result<PathRecursive, ProtoError> {
        let (mut path, mut recursive) = (None, false);
        for f in fields(payload) {
            let f = f?;
            match f.tag {
                1 => path = Some(f.value.to_vec()),
                2 => recursive = flag(&f, "recursive must be 0 or 1")?,
                _ => {}
            }
        }
        Ok(PathRecursive { path: path_of(path, root_ok)?, recursive })
    }
}

// ---------------------------------------------------------------------------------------------
// Replies

/// File types of a file record.
pub const TYPE_OTHER: u8 = 0;
pub const TYPE_FILE: u8 = 1;
pub const TYPE_DIR: u8 = 2;
pub const TYPE_SYMLINK: u8 = 3;

/// A file's fields (FS_STAT's OK, each FS_LIST entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub kind: u8,
    pub size: u64,
    /// st_mode & 0o7777.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// A symlink's target.
    pub target: Option<Vec<u8>>,
}

impl FileInfo {
    pub fn of(meta: &Metadata, target: Option<Vec<u8>>) -> FileInfo {
        let t = meta.file_type();
        let kind = if t.is_symlink() {
            TYPE_SYMLINK
        } else if t.is_dir() {
            TYPE_DIR
        } else if t.is_file() {
            TYPE_FILE
        } else {
            TYPE_OTHER
        };
        FileInfo {
            kind,
            size: meta.size(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
            target: if kind == TYPE_SYMLINK { target } else { None },
        }
    }

    /// The record's fields: `1 path`, `2 name` (its last component; `/` for the root), then the
    /// file's own.
    pub fn encode(&self, path: &[u8], name: &[u8]) -> Vec<u8> {
        let mut w = FieldWriter::new()
            .bytes(1, path)
            .bytes(2, name)
            .u8(3, self.kind)
            .u64(4, self.size)
            .u32(5, self.mode)
            .u32(6, self.uid)
            .u32(7, self.gid)
            .i64(8, self.mtime_sec)
            .u32(9, self.mtime_nsec);
        if let Some(t) = &self.target {
            w = w.bytes(10, t);
        }
        w.finish()
    }
}

/// The last component of a normalised path (`/` for the root).
pub fn name_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) if i + 1 < path.len() => &path[i + 1..],
        _ => path,
    }
}

/// Appends one record of a DATA byte stream (FS_LIST entries, FS_WATCH events): `len: u32`
/// then `len` bytes of fields.
pub fn push_record(out: &mut Vec<u8>, fields: &[u8]) {
    out.extend_from_slice(&(fields.len() as u32).to_le_bytes());
    out.extend_from_slice(fields);
}

/// FS_WATCH event kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Create = 1,
    Write = 2,
    Remove = 3,
    Rename = 4,
    Chmod = 5,
}

/// One FS_WATCH event record's fields: `1 kind: u8`, `2 name: bytes` (relative to the watched
/// directory).
pub fn event(kind: EventKind, name: &[u8]) -> Vec<u8> {
    FieldWriter::new().u8(1, kind as u8).bytes(2, name).finish()
}

/// OK of FS_MKDIR.
pub fn ok_created(created: bool) -> Vec<u8> {
    FieldWriter::new().u8(1, created as u8).finish()
}

/// OK of FS_LIST: how many entries were sent.
pub fn ok_count(count: u64) -> Vec<u8> {
    FieldWriter::new().u64(1, count).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_normalised() {
        for good in [&b"/"[..], b"/a", b"/a/b.c", b"/a/..b", b"/.x/y", b"/a b/\xff"] {
            assert!(normalised(good), "{good:?}");
        }
        let long = [b"/".to_vec(), vec![b'a'; MAX_PATH - 1]].concat();
        for bad in [&b""[..], b"a", b"a/b", b"//", b"/a/", b"/a//b", b"/./a", b"/a/.", b"/a/../b", b"/..", b"/a\0b", &long] {
            assert!(!normalised(bad), "{bad:?}");
        }
        assert!(normalised(&long[..MAX_PATH - 1]));
    }

    #[test]
    fn requests() {
        let s = FsStat::parse(&FieldWriter::new().bytes(1, b"/etc").u8(2, 1).finish()).unwrap();
        assert_eq!(s, FsStat { path: b"/etc".to_vec(), follow: true });
        assert!(!FsStat::parse(&FieldWriter::new().bytes(1, b"/").finish()).unwrap().follow);
        assert!(FsStat::parse(&[]).is_err());
        assert!(FsStat::parse(&FieldWriter::new().bytes(1, b"/etc").u8(2, 2).finish()).is_err());
        assert!(FsStat::parse(&FieldWriter::new().bytes(1, b"etc").finish()).is_err());

        assert_eq!(FsList::parse(&FieldWriter::new().bytes(1, b"/").finish()).unwrap().depth, 1);
        assert_eq!(FsList::parse(&FieldWriter::new().bytes(1, b"/a").u32(2, 3).finish()).unwrap().depth, 3);
        assert!(FsList::parse(&FieldWriter::new().bytes(1, b"/a").u32(2, 0).finish()).is_err());
        assert!(FsList::parse(&FieldWriter::new().bytes(1, b"/a").u8(2, 1).finish()).is_err());
        assert_eq!(FsList::parse(&FieldWriter::new().bytes(1, b"/a").u32(3, 0).finish()).unwrap().max_entries, MAX_LIST_ENTRIES);
        assert_eq!(FsList::parse(&FieldWriter::new().bytes(1, b"/a").u32(3, 7).finish()).unwrap().max_entries, 7);
        assert!(FsList::parse(&FieldWriter::new().bytes(1, b"/a").u32(3, 100_001).finish()).is_err());

        let m = FsMkdir::parse(&FieldWriter::new().bytes(1, b"/a/b").finish()).unwrap();
        assert_eq!(m, FsMkdir { path: b"/a/b".to_vec(), mode: 0o755, parents: false, uid: None, gid: None });
        let m = FsMkdir::parse(&FieldWriter::new().bytes(1, b"/a").u32(2, 0o107_777).u8(3, 1).u32(4, 5).u32(5, 6).finish()).unwrap();
        assert_eq!((m.mode, m.parents, m.uid, m.gid), (0o7777, true, Some(5), Some(6)));
        assert!(FsMkdir::parse(&FieldWriter::new().bytes(1, b"/").finish()).is_err());

        let r = FsRename::parse(&FieldWriter::new().bytes(1, b"/a").bytes(2, b"/b").finish()).unwrap();
        assert_eq!(r, FsRename { from: b"/a".to_vec(), to: b"/b".to_vec() });
        assert!(FsRename::parse(&FieldWriter::new().bytes(1, b"/a").finish()).is_err());
        assert!(FsRename::parse(&FieldWriter::new().bytes(1, b"/a").bytes(2, b"/").finish()).is_err());
        assert!(FsRename::parse(&FieldWriter::new().bytes(1, b"/a").bytes(2, b"/b/../c").finish()).is_err());

        let p = PathRecursive::parse(&FieldWriter::new().bytes(1, b"/tmp").u8(2, 1).finish(), false).unwrap();
        assert_eq!(p, PathRecursive { path: b"/tmp".to_vec(), recursive: true });
        assert!(PathRecursive::parse(&FieldWriter::new().bytes(1, b"/").finish(), false).is_err());
        assert!(PathRecursive::parse(&FieldWriter::new().bytes(1, b"/").finish(), true).is_ok());
    }

    #[test]
    fn records() {
        assert_eq!(name_of(b"/"), b"/");
        assert_eq!(name_of(b"/a"), b"a");
        assert_eq!(name_of(b"/a/bc"), b"bc");
        let info = FileInfo { kind: TYPE_SYMLINK, size: 3, mode: 0o777, uid: 1, gid: 2, mtime_sec: -5, mtime_nsec: 7, target: Some(b"/x".to_vec()) };
        let got: Vec<(u8, Vec<u8>)> = fields(&info.encode(b"/l", b"l")).map(|f| f.map(|f| (f.tag, f.value.to_vec()))).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 10);
        assert_eq!(got[2], (3, vec![TYPE_SYMLINK]));
        assert_eq!(got[7], (8, (-5i64).to_le_bytes().to_vec()));
        assert_eq!(got[9], (10, b"/x".to_vec()));
        let mut out = Vec::new();
        push_record(&mut out, &event(EventKind::Rename, b"d/f"));
        assert_eq!(&out[..4], &(out.len() as u32 - 4).to_le_bytes());
    }
}
