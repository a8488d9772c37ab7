//! WRITE_FILE and READ_FILE: the file side of the transfer (the stream side is in server.rs).

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{fchown, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::proto;
use crate::sys;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// A STREAM_ERROR code (proto::IO, NOT_FOUND, TOO_LARGE, BAD_REQUEST).
    pub code: u32,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn io_error(path: &Path, what: &str, e: &io::Error) -> FileError {
    let code = if e.kind() == io::ErrorKind::NotFound { proto::NOT_FOUND } else { proto::IO };
    FileError { code, message: format!("{what} {}: {}", path.display(), sys::io_text(e)) }
}

pub struct Writer {
    file: File,
    path: PathBuf,
    expected: Option<u64>,
    written: u64,
}

impl Writer {
    /// Creates (or truncates) the file, with parents if asked, and applies mode and owner.
    pub fn open(req: &proto::WriteFile) -> Result<Writer, FileError> {
        let path = PathBuf::from(OsStr::from_bytes(&req.path));
        if req.mkdirs {
            if let Some(parent) = path.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(|e| io_error(parent, "cannot create directory", &e))?;
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(req.mode)
            .open(&path)
            .map_err(|e| io_error(&path, "cannot open", &e))?;
        if req.uid.is_some() || req.gid.is_some() {
            fchown(&file, req.uid, req.gid).map_err(|e| io_error(&path, "cannot chown", &e))?;
        }
        // After chown (which clears setuid bits) and regardless of the umask or an existing file.
        file.set_permissions(Permissions::from_mode(req.mode)).map_err(|e| io_error(&path, "cannot chmod", &e))?;
        Ok(Writer { file, path, expected: req.size, written: 0 })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        let total = self.written + data.len() as u64;
        if let Some(expected) = self.expected {
            if total > expected {
                return Err(FileError {
                    code: proto::BAD_REQUEST,
                    message: format!("{}: more data than the announced size {expected}", self.path.display()),
                });
            }
        }
        self.file.write_all(data).map_err(|e| io_error(&self.path, "cannot write", &e))?;
        self.written = total;
        Ok(())
    }

    /// Called at EOF: checks the size and returns the number of bytes written.
    pub fn finish(self) -> Result<u64, FileError> {
        if let Some(expected) = self.expected {
            if self.written != expected {
                return Err(FileError {
                    code: proto::BAD_REQUEST,
                    message: format!("{}: got {} bytes, announced {expected}", self.path.display(), self.written),
                });
            }
        }
        Ok(self.written)
    }
}

pub struct Reader {
    file: File,
    path: PathBuf,
    max: u64,
    sent: u64,
}

impl Reader {
    pub fn open(req: &proto::ReadFile) -> Result<Reader, FileError> {
        let path = PathBuf::from(OsStr::from_bytes(&req.path));
        let file = File::open(&path).map_err(|e| io_error(&path, "cannot open", &e))?;
        let meta = file.metadata().map_err(|e| io_error(&path, "cannot stat", &e))?;
        if meta.is_dir() {
            return Err(FileError { code: proto::IO, message: format!("{}: Is a directory", path.display()) });
        }
        if req.max_size > 0 && meta.len() > req.max_size {
            return Err(too_large(&path, req.max_size));
        }
        Ok(Reader { file, path, max: req.max_size, sent: 0 })
    }

    /// Reads the next chunk; 0 means end of file. Enforces `max_size` for files whose size
    /// was not known up front (e.g. in /proc).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, FileError> {
        let n = loop {
            match self.file.read(buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(&self.path, "cannot read", &e)),
            }
        };
        self.sent += n as u64;
        if self.max > 0 && self.sent > self.max {
            return Err(too_large(&self.path, self.max));
        }
        Ok(n)
    }

    pub fn size(&self) -> u64 {
        self.sent
    }
}

fn too_large(path: &Path, max: u64) -> FileError {
    FileError { code: proto::TOO_LARGE, message: format!("{}: larger than max_size {max}", path.display()) }
}
