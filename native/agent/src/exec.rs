//! Preparing and starting processes: argv/env conversion, PATH lookup, credentials, spawn.

use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::sys::{self, pid_t, CgroupTarget, SpawnSpec, SpawnStage};

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
    /// Where to look for the program, in order (`candidates`).
    pub paths: Vec<CString>,
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
/// Where the child looks for `argv0`, in order: `argv0` itself when it holds a slash (relative
/// to the exec's cwd), else each PATH entry joined with it (an empty entry is the cwd). The
/// child tries them with execve as execvp does: a missing file or one it may not run (a
/// directory, no x bit) moves on to the next.
pub fn candidates(argv0: &[u8], path_var: Option<&[u8]>) -> Vec<PathBuf> {
    if argv0.contains(&b'/') {
        return vec![PathBuf::from(OsStr::from_bytes(argv0))];
    }
    path_var
        .unwrap_or(DEFAULT_PATH)
        .split(|&c| c == b':')
        .map(|dir| {
            let dir = if dir.is_empty() { Path::new(".") } else { Path::new(OsStr::from_bytes(dir)) };
            dir.join(OsStr::from_bytes(argv0))
        })
        .collect()
}

/// Converts a request into what `start` needs. The file system is not checked beyond where a
/// PATH search starts: a missing command, a cwd that is not a directory and the like are
/// reported by the child's failed step (`start`), with the same messages.
pub fn prepare(argv: &[Vec<u8>], env: &[Vec<u8>], cwd: Option<&[u8]>, uid: u32, gid: u32) -> Result<Prepared, ExecError> {
    let cargv = cstrings(argv, "argv")?;
    let cenv = cstrings(env, "env")?;
    let ccwd = cwd.map(|c| CString::new(c).map_err(|_| ExecError::BadRequest("cwd contains a NUL byte".into()))).transpose()?;
    let argv0 = argv.first().ok_or_else(|| ExecError::BadRequest("argv is empty".into()))?;
    let path_var = env.iter().find_map(|kv| kv.strip_prefix(b"PATH="));
    let mut paths = candidates(argv0, path_var)
        .into_iter()
        .map(|p| CString::new(p.into_os_string().into_vec()).map_err(|_| ExecError::BadRequest("argv[0] contains a NUL byte".into())))
        .collect::<Result<Vec<_>, _>>()?;
    // A failed execve costs far more than a failed lookup (a few hundred microseconds under
    // emulation against tens), so the child starts at the first candidate that exists; it
    // still moves on if that one cannot run. Relative entries are left to the child (its cwd).
    if paths.len() > 1 {
        // None there: the last alone, whose ENOENT the child reports as "command not found".
        let first = paths.iter().position(|p| !p.as_bytes().starts_with(b"/") || sys::exists(p)).unwrap_or(paths.len() - 1);
        paths.drain(..first);
    }
    // The agent's ids never change: asked once, not for every exec.
    static OWN_IDS: OnceLock<(u32, u32)> = OnceLock::new();
    let own = *OWN_IDS.get_or_init(|| (sys::geteuid(), sys::getegid()));
    let creds = if (uid, gid) == own { None } else { Some((uid, gid)) };
    Ok(Prepared { paths, argv: cargv, env: cenv, cwd: ccwd, creds })
}

pub fn check_argv(argv: &[Vec<u8>]) -> Result<(), ExecError> {
    cstrings(argv, "chain").map(|_| ())
}

impl Prepared {
    /// Starts the program in a new session with the given descriptors as its stdio; with
    /// `ctty` (the path of the terminal in `stdio`) that terminal becomes its controlling one.
    /// With `cgroup` it starts in that cgroup.
    pub fn start(&self, stdio: [RawFd; 3], ctty: Option<&CStr>, cgroup: Option<CgroupTarget>) -> Result<pid_t, ExecError> {
        let spec = SpawnSpec {
            paths: &self.paths,
            argv: &self.argv,
            env: &self.env,
            cwd: self.cwd.as_deref(),
            stdio,
            creds: self.creds,
            ctty,
            cgroup,
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
                SpawnStage::Exec if e.errno == libc::ENOENT => {
                    return ExecError::NotFound(format!("supermachine: {}: command not found\n", show(self.argv[0].as_bytes())))
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
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn candidates_follow_path() {
        let c = candidates(b"sh", Some(b"/nonexistent::/bin"));
        assert_eq!(c, vec![PathBuf::from("/nonexistent/sh"), PathBuf::from("./sh"), PathBuf::from("/bin/sh")]);
        assert_eq!(candidates(b"./x", Some(b"/bin")), vec![PathBuf::from("./x")]);
        assert_eq!(candidates(b"ls", None).len(), 6);
    }

    /// Starts `argv` with `env` in `cwd` and returns its exit code, or the error.
    fn run(argv: &[&str], env: &[&str], cwd: Option<&str>) -> Result<i32, ExecError> {
        let argv: Vec<Vec<u8>> = argv.iter().map(|a| a.as_bytes().to_vec()).collect();
        let env: Vec<Vec<u8>> = env.iter().map(|a| a.as_bytes().to_vec()).collect();
        let p = prepare(&argv, &env, cwd.map(str::as_bytes), sys::geteuid(), sys::getegid())?;
        let null = fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
        let pid = p.start([fd, fd, fd], None, None)?;
        Ok(libc::WEXITSTATUS(sys::reap_blocking(pid)))
    }

    #[test]
    fn the_child_searches_path_as_execvp_does() {
        /// Removes the directory however the test ends.
        struct TempDir(PathBuf);
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
        let guard = TempDir(std::env::temp_dir().join(format!("sm-exec-path-{}", std::process::id())));
        let dir = &guard.0;
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::create_dir_all(a.join("adir")).unwrap();
        fs::write(a.join("cmd"), "#!/bin/sh\nexit 3\n").unwrap(); // not executable
        fs::write(b.join("cmd"), "#!/bin/sh\nexit 5\n").unwrap();
        fs::set_permissions(b.join("cmd"), fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("PATH=/nonexistent:{}:{}", a.display(), b.display());
        // The first one that runs wins; one without the x bit is passed over.
        assert_eq!(run(&["cmd"], &[&path], None), Ok(5));
        // Only a file it may not run: Permission denied (126).
        let only_a = format!("PATH={}", a.display());
        match run(&["cmd"], &[&only_a], None) {
            Err(ExecError::CannotStart(m, Some(libc::EACCES))) => assert_eq!(m, "supermachine: cmd: Permission denied\n"),
            other => panic!("{other:?}"),
        }
        // Nothing, or only a directory of that name: command not found (127).
        for argv0 in ["no-such-cmd-xyz", "adir"] {
            match run(&[argv0], &[&only_a], None) {
                Err(e @ ExecError::NotFound(_)) => {
                    assert_eq!(e.message(), format!("supermachine: {argv0}: command not found\n"));
                    assert_eq!(e.exit_code(), Some(127));
                }
                other => panic!("{argv0}: {other:?}"),
            }
        }
        assert!(matches!(run(&["/no/such"], &[], None), Err(ExecError::NotFound(_))));
        // A path with a slash is relative to the cwd.
        assert_eq!(run(&["./cmd"], &[], Some(b.to_str().unwrap())), Ok(5));
        // A cwd that is not a directory is the child's failed step, with its own message.
        let file_cwd = b.join("cmd");
        match run(&["/bin/true"], &[], Some(file_cwd.to_str().unwrap())) {
            Err(ExecError::CannotStart(m, Some(libc::ENOTDIR))) => {
                assert_eq!(m, format!("supermachine: cannot change directory to {}: Not a directory\n", file_cwd.display()))
            }
            other => panic!("{other:?}"),
        }
    }
}
