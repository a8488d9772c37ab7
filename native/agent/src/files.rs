//! WRITE_FILE and READ_FILE streams: the file side (create, write, read, limits) and the
//! stream side (flow control on channel 0 in, channel 1 out).

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{fchown, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::proto;
use crate::stream::{Ctx, Stream, Violation};
use crate::sys;

#[derive(Debug)]
pub enum FileError {
    /// A system call failed: `what` the agent was doing, on which path.
    Os { what: &'static str, path: PathBuf, error: io::Error },
    IsDirectory(PathBuf),
    TooLarge { path: PathBuf, max: u64 },
    /// The content does not match the announced size.
    SizeMismatch(String),
}

impl FileError {
    /// The STREAM_ERROR code.
    pub fn code(&self) -> u32 {
        match self {
            FileError::Os { error, .. } if error.kind() == io::ErrorKind::NotFound => proto::NOT_FOUND,
            FileError::Os { .. } | FileError::IsDirectory(_) => proto::IO,
            FileError::TooLarge { .. } => proto::TOO_LARGE,
            FileError::SizeMismatch(_) => proto::BAD_REQUEST,
        }
    }

    /// The errno behind the error, if a system call gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            FileError::Os { error, .. } => error.raw_os_error(),
            FileError::IsDirectory(_) => Some(libc::EISDIR),
            _ => None,
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileError::Os { what, path, error } => write!(f, "{what} {}: {}", path.display(), sys::io_text(error)),
            FileError::IsDirectory(path) => write!(f, "{}: Is a directory", path.display()),
            FileError::TooLarge { path, max } => write!(f, "{}: larger than max_size {max}", path.display()),
            FileError::SizeMismatch(m) => f.write_str(m),
        }
    }
}

fn os<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |error| FileError::Os { what, path: path.to_path_buf(), error }
}

fn report(cx: &mut Ctx, e: &FileError) {
    cx.error(e.code(), &e.to_string(), e.errno());
}

// ---------------------------------------------------------------------------------------------
// WRITE_FILE

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
                    // EEXIST here means the parent exists but is not a directory (a file where a
                    // directory should be): for the caller that is ENOTDIR, as open(2) says.
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::EEXIST) => io::Error::from_raw_os_error(libc::ENOTDIR),
                        _ => e,
                    })
                    .map_err(os("cannot create directory", parent))?;
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(req.mode)
            .open(&path)
            .map_err(os("cannot open", &path))?;
        if req.uid.is_some() || req.gid.is_some() {
            fchown(&file, req.uid, req.gid).map_err(os("cannot chown", &path))?;
        }
        // After chown (which clears setuid bits) and regardless of the umask or an existing file.
        file.set_permissions(Permissions::from_mode(req.mode)).map_err(os("cannot chmod", &path))?;
        Ok(Writer { file, path, expected: req.size, written: 0 })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        let total = self.written + data.len() as u64;
        if let Some(expected) = self.expected {
            if total > expected {
                let msg = format!("{}: more data than the announced size {expected}", self.path.display());
                return Err(FileError::SizeMismatch(msg));
            }
        }
        self.file.write_all(data).map_err(os("cannot write", &self.path))?;
        self.written = total;
        Ok(())
    }

    /// Called at EOF: checks the size and returns the number of bytes written.
    pub fn finish(self) -> Result<u64, FileError> {
        if let Some(expected) = self.expected {
            if self.written != expected {
                let msg = format!("{}: got {} bytes, announced {expected}", self.path.display(), self.written);
                return Err(FileError::SizeMismatch(msg));
            }
        }
        Ok(self.written)
    }
}

/// The content arrives as channel-0 DATA and goes to the file as it arrives (credit is
/// returned once written), so at most one window of it is in memory.
pub struct WriteStream {
    writer: Option<Writer>,
    window: u64,
}

pub fn open_write(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    let req = match proto::WriteFile::parse(payload) {
        Ok(r) => r,
        Err(e) => {
            cx.error(proto::BAD_REQUEST, &e.to_string(), None);
            return None;
        }
    };
    match Writer::open(&req) {
        Ok(writer) => Some(Box::new(WriteStream { writer: Some(writer), window: proto::INITIAL_WINDOW as u64 })),
        Err(e) => {
            report(cx, &e);
            None
        }
    }
}

impl Stream for WriteStream {
    fn on_data(&mut self, cx: &mut Ctx, channel: u8, eof: bool, payload: &[u8]) -> Result<(), Violation> {
        if channel != proto::STDIN {
            return Ok(());
        }
        let Some(writer) = self.writer.as_mut() else { return Ok(()) };
        let len = payload.len() as u64;
        if len > self.window {
            return Err(Violation("file DATA beyond the window".into()));
        }
        if let Err(e) = writer.write(payload) {
            self.writer = None;
            report(cx, &e);
            return Ok(());
        }
        if eof {
            match self.writer.take().map(Writer::finish) {
                Some(Ok(size)) => cx.send(proto::OK, 0, &proto::ok_size(size)),
                Some(Err(e)) => report(cx, &e),
                None => {}
            }
        } else if len > 0 {
            // Written: the window is whole again.
            cx.window(proto::STDIN, len);
        }
        Ok(())
    }

    fn on_cancel(&mut self, cx: &mut Ctx) {
        self.writer = None;
        cx.error(proto::IO, "cancelled", None);
    }

    fn abort(&mut self, _cx: &mut Ctx) {
        self.writer = None;
    }

    fn done(&self) -> bool {
        self.writer.is_none()
    }
}

// ---------------------------------------------------------------------------------------------
// READ_FILE

pub struct Reader {
    file: File,
    path: PathBuf,
    max: u64,
    sent: u64,
}

impl Reader {
    pub fn open(req: &proto::ReadFile) -> Result<Reader, FileError> {
        let path = PathBuf::from(OsStr::from_bytes(&req.path));
        let file = File::open(&path).map_err(os("cannot open", &path))?;
        let meta = file.metadata().map_err(os("cannot stat", &path))?;
        if meta.is_dir() {
            return Err(FileError::IsDirectory(path));
        }
        if req.max_size > 0 && meta.len() > req.max_size {
            return Err(FileError::TooLarge { path, max: req.max_size });
        }
        Ok(Reader { file, path, max: req.max_size, sent: 0 })
    }

    /// Reads the next chunk of at most `max` bytes straight into a DATA frame on channel 1;
    /// 0 means end of file. Enforces `max_size` for files whose size was not known up front
    /// (e.g. in /proc).
    fn read_into(&mut self, cx: &mut Ctx, max: usize) -> Result<usize, FileError> {
        let n = cx.read_data(proto::STDOUT, self.file.as_raw_fd(), max).map_err(os("cannot read", &self.path))?;
        self.sent += n as u64;
        if self.max > 0 && self.sent > self.max {
            return Err(FileError::TooLarge { path: self.path.clone(), max: self.max });
        }
        Ok(n)
    }
}

/// A regular file is always "ready", so the stream is driven by `pump` while it has window.
pub struct ReadStream {
    reader: Option<Reader>,
    window: u64,
}

pub fn open_read(cx: &mut Ctx, payload: &[u8]) -> Option<Box<dyn Stream>> {
    let req = match proto::ReadFile::parse(payload) {
        Ok(r) => r,
        Err(e) => {
            cx.error(proto::BAD_REQUEST, &e.to_string(), None);
            return None;
        }
    };
    match Reader::open(&req) {
        Ok(reader) => Some(Box::new(ReadStream { reader: Some(reader), window: proto::INITIAL_WINDOW as u64 })),
        Err(e) => {
            report(cx, &e);
            None
        }
    }
}

impl Stream for ReadStream {
    fn on_window(&mut self, _cx: &mut Ctx, channel: u8, inc: u32) {
        if channel == proto::STDOUT {
            self.window = self.window.saturating_add(inc as u64);
        }
    }

    /// Sends one chunk.
    fn pump(&mut self, cx: &mut Ctx) {
        let Some(reader) = self.reader.as_mut() else { return };
        if self.window == 0 || !cx.can_produce() {
            return;
        }
        let max = (self.window as usize).min(proto::MAX_DATA);
        match reader.read_into(cx, max) {
            Ok(0) => {
                let size = reader.sent;
                self.reader = None;
                cx.eof(proto::STDOUT);
                cx.send(proto::OK, 0, &proto::ok_size(size));
            }
            Ok(n) => self.window -= n as u64,
            Err(e) => {
                self.reader = None;
                report(cx, &e);
            }
        }
    }

    fn wants_pump(&self) -> bool {
        self.reader.is_some() && self.window > 0
    }

    fn on_cancel(&mut self, cx: &mut Ctx) {
        self.reader = None;
        cx.error(proto::IO, "cancelled", None);
    }

    fn abort(&mut self, _cx: &mut Ctx) {
        self.reader = None;
    }

    fn done(&self) -> bool {
        self.reader.is_none()
    }
}
