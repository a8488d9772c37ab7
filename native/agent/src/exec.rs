//! Preparing and starting processes: argv/env conversion, PATH lookup, credentials, spawn.

use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, pid_t, SpawnSpec, SpawnStage};

const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecError {
    /// The request itself is malformed (STREAM_ERROR BAD_REQUEST).
    BadRequest(String),
    /// argv[0] was not found (exit 127); carries the stderr message.
    NotFound(String),
    /// Anything else that prevents the start (exit 126); carries the stderr message and the
    /// errno when a system call failed.
    CannotStart(String, Option<i32>),
}

impl ExecError {
    /// The exit code a stream reports for a process that could not start (None: not a start
    /// failure but a malformed request).
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            ExecError::BadRequest(_) => None,
            ExecError::NotFound(_) => Some(127),
            ExecError::CannotStart(..) => Some(126),
        }
    }

    /// The message (for stderr, ending with a newline, or for a STREAM_ERROR).
    pub fn message(&self) -> &str {
        match self {
            ExecError::BadRequest(m) | ExecError::NotFound(m) | ExecError::CannotStart(m, _) => m,
        }
    }
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message().trim_end())
    }
}

/// A validated command, ready to be spawned (possibly many times).
pub struct Prepared {
    pub path: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: Option<CString>,
    pub creds: Option<(u32, u32)>,
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn cstrings(items: &[Vec<u8>], what: &str) -> Result<Vec<CString>, ExecError> {
    items
        .iter()
        .map(|s| CString::new(s.clone()).map_err(|_| ExecError::BadRequest(format!("{what} contains a NUL byte"))))
        .collect()
}

/// Some(true): executable regular file; Some(false): regular file without x bits; None: other.
fn is_executable_file(p: &Path) -> Option<bool> {
    let m = std::fs::metadata(p).ok().filter(|m| m.is_file())?;
    Some(m.permissions().mode() & 0o111 != 0)
}

/// Looks `argv0` up like a shell: names with '/' are taken as paths (relative ones against
/// `cwd`), others are searched in `PATH` (executable regular files only).
pub fn resolve(argv0: &[u8], path_var: Option<&[u8]>, cwd: &Path) -> Result<PathBuf, ExecError> {
    let name = show(argv0);
    let not_found = || ExecError::NotFound(format!("supermachine: {name}: command not found\n"));
    if argv0.contains(&b'/') {
        let p = Path::new(OsStr::from_bytes(argv0));
        return match std::fs::metadata(cwd.join(p)) {
            Ok(_) => Ok(p.to_path_buf()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(not_found()),
            Err(e) => Err(ExecError::CannotStart(format!("supermachine: {name}: {}\n", sys::io_text(&e)), e.raw_os_error())),
        };
    }
    let mut denied = false;
    for dir in path_var.unwrap_or(DEFAULT_PATH).split(|&c| c == b':') {
        let dir = if dir.is_empty() { Path::new(".") } else { Path::new(OsStr::from_bytes(dir)) };
        let candidate = dir.join(OsStr::from_bytes(argv0));
        match is_executable_file(&cwd.join(&candidate)) {
            Some(true) => return Ok(candidate),
            Some(false) => denied = true,
            None => {}
        }
    }
    if denied {
        Err(ExecError::CannotStart(format!("supermachine: {name}: Permission denied\n"), Some(libc::EACCES)))
    } else {
        Err(not_found())
    }
}

/// Validates a request and resolves its program.
pub fn prepare(argv: &[Vec<u8>], env: &[Vec<u8>], cwd: Option<&[u8]>, uid: u32, gid: u32) -> Result<Prepared, ExecError> {
    let cargv = cstrings(argv, "argv")?;
    let cenv = cstrings(env, "env")?;
    let ccwd = cwd.map(|c| CString::new(c).map_err(|_| ExecError::BadRequest("cwd contains a NUL byte".into()))).transpose()?;
    let cwd_path = Path::new(OsStr::from_bytes(cwd.unwrap_or(b"/")));
    // Checked up front for a clear message (the spawn reports a failed chdir as a bare errno).
    // The default "/" needs no check: one syscall less on the hot path.
    match cwd.map(|_| std::fs::metadata(cwd_path)) {
        None => {}
        Some(Ok(m)) if m.is_dir() => {}
        Some(Ok(_)) => {
            return Err(ExecError::CannotStart(
                format!("supermachine: cannot change directory to {}: Not a directory\n", cwd_path.display()),
                Some(libc::ENOTDIR),
            ))
        }
        Some(Err(e)) => {
            return Err(ExecError::CannotStart(
                format!("supermachine: cannot change directory to {}: {}\n", cwd_path.display(), sys::io_text(&e)),
                e.raw_os_error(),
            ))
        }
    }
    let path_var = env.iter().find_map(|kv| kv.strip_prefix(b"PATH="));
    let path = resolve(&argv[0], path_var, cwd_path)?;
    let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| ExecError::BadRequest("bad path".into()))?;
    let creds = if uid == sys::geteuid() && gid == sys::getegid() { None } else { Some((uid, gid)) };
    Ok(Prepared { path, argv: cargv, env: cenv, cwd: ccwd, creds })
}

/// Checks that an argv that will be prepared later (a chain) can be: no NUL bytes.
pub fn check_argv(argv: &[Vec<u8>]) -> Result<(), ExecError> {
    cstrings(argv, "chain").map(|_| ())
}

impl Prepared {
    /// Starts the program in a new session with the given descriptors as its stdio; with
    /// `ctty` (the path of the terminal in `stdio`) that terminal becomes its controlling one.
    /// With `cgroup_procs` (a cgroup's `cgroup.procs`, open for writing) it joins that cgroup
    /// before it execs.
    pub fn start(&self, stdio: [RawFd; 3], ctty: Option<&CStr>, cgroup_procs: Option<RawFd>) -> Result<pid_t, ExecError> {
        let spec = SpawnSpec {
            path: &self.path,
            argv: &self.argv,
            env: &self.env,
            cwd: self.cwd.as_deref(),
            stdio,
            creds: self.creds,
            ctty,
            cgroup_procs,
        };
        sys::spawn(&spec).map_err(|e| {
            let text = sys::errno_text(e.errno);
            let msg = match e.stage {
                SpawnStage::Chdir => format!(
                    "supermachine: cannot change directory to {}: {text}\n",
                    show(self.cwd.as_ref().map_or(b"/".as_slice(), |c| c.as_bytes()))
                ),
                SpawnStage::Credentials => {
                    let (uid, gid) = self.creds.unwrap_or((0, 0));
                    format!("supermachine: cannot switch to uid {uid} gid {gid}: {text}\n")
                }
                SpawnStage::Cgroup => {
                    format!("supermachine: {}: cannot join the exec's cgroup: {text}\n", show(self.argv[0].as_bytes()))
                }
                SpawnStage::Setup | SpawnStage::Exec => {
                    format!("supermachine: {}: {text}\n", show(self.argv[0].as_bytes()))
                }
            };
            ExecError::CannotStart(msg, Some(e.errno))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_through_path() {
        let p = resolve(b"sh", Some(b"/nonexistent:/bin:/usr/bin"), Path::new("/")).unwrap();
        assert!(p.ends_with("sh"));
        assert!(matches!(resolve(b"no-such-cmd-xyz", Some(b"/bin"), Path::new("/")), Err(ExecError::NotFound(_))));
        assert!(matches!(resolve(b"/no/such", None, Path::new("/")), Err(ExecError::NotFound(_))));
        // A directory on PATH with the name is not a match.
        assert!(matches!(resolve(b"bin", Some(b"/"), Path::new("/")), Err(ExecError::NotFound(_))));
    }

    #[test]
    fn not_found_message_matches_spec() {
        match resolve(b"nope-nope", Some(b"/bin"), Path::new("/")) {
            Err(ExecError::NotFound(m)) => assert_eq!(m, "supermachine: nope-nope: command not found\n"),
            _ => panic!(),
        }
    }
}
