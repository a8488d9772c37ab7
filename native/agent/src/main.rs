//! supermachine-agent: PID 1 of every supermachine VM, or a development server on a unix socket.
//!
//! The C entry point is `sys::entry::main` (`no_main`); it calls `agent_main` here. No `unsafe`
//! outside `sys`: the compiler enforces it.

#![cfg_attr(not(test), no_main)]
// Unit-test builds have no entry point, so most of the crate looks unused there.
#![cfg_attr(test, allow(dead_code))]
#![deny(unsafe_code)]
// Every unsafe block says why it is sound (`// SAFETY:`); clippy checks it.
#![warn(clippy::undocumented_unsafe_blocks)]

mod background;
mod bench;
mod cgroup;
mod conn;
mod dns;
mod dns_wire;
mod exec;
mod exec_io;
mod fake_ip;
mod files;
mod fs_ops;
#[cfg(test)]
mod fuzz;
mod identity;
mod init;
mod pipes;
mod proto;
mod proto_fs;
mod proxy;
mod pty;
mod server;
mod shared;
mod stream;
mod stream_exec;
#[allow(unsafe_code)]
mod sys;
mod tcp;
mod token;
mod transparent;
mod watch;
mod workload;

use std::os::unix::net::UnixListener;

use server::{Listen, Server};

const USAGE: &str = "usage: supermachine-agent [--version | --serve-unix PATH]\n\
                     (run as PID 1 it boots the VM and serves its virtio ports)";

/// What the agent does once started (by `sys::entry::main`).
pub(crate) fn agent_main() -> libc::c_int {
    sys::ignore_sigpipe();
    if sys::getpid() == 1 {
        run_init()
    }
    sys::ensure_std_fds();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["--version"] => {
            println!("supermachine-agent {} (protocol {})", env!("CARGO_PKG_VERSION"), proto::VERSION);
            0
        }
        ["--serve-unix", path] => serve_unix(path),
        _ => {
            eprintln!("{USAGE}");
            2
        }
    }
}

fn run_init() -> ! {
    init::early_console();
    std::panic::set_hook(Box::new(|info| init::fatal(&format!("panic: {info}"))));
    let ports = match init::boot() {
        Ok(p) => p,
        Err(e) => init::fatal(&format!("boot: {e}")),
    };
    let names: Vec<String> = ports.iter().map(|p| p.name.clone()).collect();
    // Every exec runs in a cgroup of its own with a process and a memory limit; without cgroup
    // v2 the agent still serves, with execs unconfined.
    let cgroups = match cgroup::Hierarchy::init() {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("supermachine-agent: execs run without limits: {e}");
            None
        }
    };
    let mut server = match Server::new(Listen::Ports(ports), true, cgroups) {
        Ok(s) => s,
        Err(e) => init::fatal(&e.to_string()),
    };
    // The agent wakes for every pipe write and child exit; as a batch task it does not preempt
    // the process that woke it, so a short command runs to its exit and the agent handles its
    // output and its exit in one wake-up. Children are put back to SCHED_OTHER (sys::spawn).
    if let Err(e) = sys::set_sched_batch() {
        eprintln!("supermachine-agent: SCHED_BATCH unavailable: {e}");
    }
    eprintln!("supermachine-agent: ready (version {}, ports {})", env!("CARGO_PKG_VERSION"), names.join(", "));
    match server.run() {
        Ok(()) => init::fatal("server loop ended"),
        Err(e) => init::fatal(&e.to_string()),
    }
}

fn serve_unix(path: &str) -> libc::c_int {
    let _ = std::fs::remove_file(path);
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("supermachine-agent: cannot listen on {path}: {e}");
            return 1;
        }
    };
    // Like PID 1: children without a cwd start in "/", and orphans of our children are reaped
    // by us, so tests see the same behaviour as a VM.
    if let Err(e) = std::env::set_current_dir("/") {
        eprintln!("supermachine-agent: cannot chdir to /: {e}");
        return 1;
    }
    let _ = sys::set_child_subreaper();
    let result = Server::new(Listen::Unix(listener), false, None).and_then(|mut s| s.run());
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("supermachine-agent: {e}");
            1
        }
    }
}
