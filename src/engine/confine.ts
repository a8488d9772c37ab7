/**
 * What confines a QEMU process, besides the guest being a VM:
 *
 * - QEMU's seccomp sandbox, `-sandbox on` with obsolete system calls, privilege changes, process
 *   creation (fork, exec) and resource control (nice, affinity, rlimits) denied;
 * - when the host process is root, an unprivileged system user (`supermachine`, created by
 *   `npx supermachine setup`): QEMU runs with that uid and gid, no supplementary groups (the group of
 *   /dev/kvm only when it uses KVM) and no_new_privs, through `setpriv`;
 * - the files it needs, and only those, handed over as open file descriptors: it never looks a
 *   path up in the home directory (which is 0700). The kernel, the initramfs and a RAM file are
 *   reopened by QEMU through /proc/self/fd, so they must be readable (RAM: writable) by its
 *   group; the engine grants that on files this process owns (`grantQemu`).
 *
 * `SUPERMACHINE_UNSANDBOXED=1` runs QEMU without the sandbox and as this process's user; without
 * it, a VM whose sandbox cannot be set up is refused (`ENGINE_SANDBOX_UNAVAILABLE`,
 * `ENGINE_QEMU_USER_MISSING`).
 */
import { execFile } from "node:child_process";
// fchmodSync and fchownSync through the namespace: a named import of one that a runtime lacks
// (Deno 2.4 and older) fails the whole package at link time, before src/js-runtime-check.ts can explain.
import * as fs from "node:fs";
import { fstatSync, readFileSync, statSync, type Stats } from "node:fs";
import { userInfo } from "node:os";
import { dirname, resolve } from "node:path";
import { EngineError } from "../errors.js";
import { logger } from "../debug.js";
import { dropsPrivileges, lookupUser, qemuUserName, type SystemUser, unsandboxed } from "../private.js";

const log = logger("engine");

/** The `-sandbox` value every QEMU gets. */
export const SANDBOX_OPTS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

export interface Confinement {
  /** QEMU gets `-sandbox` (false only with SUPERMACHINE_UNSANDBOXED=1). */
  sandbox: boolean;
  /** The user QEMU runs as, when not this process's own (this process is root). */
  user: SystemUser | undefined;
}

const HINT_UNSANDBOXED = "or set SUPERMACHINE_UNSANDBOXED=1 to run VMs without QEMU's sandbox (as this process's user)";

/**
 * How the next QEMU process will be confined. Throws EngineError when it cannot be, unless
 * SUPERMACHINE_UNSANDBOXED=1.
 */
export async function confinement(qemu: string, env: NodeJS.ProcessEnv = process.env): Promise<Confinement> {
  if (unsandboxed(env)) return { sandbox: false, user: undefined };
  const probe = await sandboxProbe(qemu);
  if (probe.ok === false) {
    throw new EngineError("ENGINE_SANDBOX_UNAVAILABLE", `QEMU's seccomp sandbox cannot be enabled with ${qemu}: ${probe.error}`, {
      hint: `use a QEMU built with seccomp support (Debian's qemu-system-x86 is) on a kernel with seccomp filters, ${HINT_UNSANDBOXED}`,
    });
  }
  if (!dropsPrivileges(env)) return { sandbox: true, user: undefined };
  const name = qemuUserName(env);
  const user = lookupUser(name);
  if (!user) {
    throw new EngineError("ENGINE_QEMU_USER_MISSING", `this process runs as root, and the unprivileged user QEMU should run as (${JSON.stringify(name)}) does not exist`, {
      hint: `run npx supermachine setup (it creates it), or: useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ${name}; ${HINT_UNSANDBOXED}`,
    });
  }
  if (user.uid === 0) {
    throw new EngineError("ENGINE_QEMU_USER_ROOT", `the user QEMU should run as (${JSON.stringify(name)}) is root`, {
      hint: `point SUPERMACHINE_QEMU_USER at an unprivileged user, ${HINT_UNSANDBOXED}`,
    });
  }
  return { sandbox: true, user };
}

/** What `supermachine info` reports. */
export interface ConfinementReport {
  /** "on", "off" (SUPERMACHINE_UNSANDBOXED=1) or "unavailable". */
  sandbox: "on" | "off" | "unavailable";
  sandboxOptions: string | null;
  /** Why the sandbox is off or unavailable. */
  sandboxReason: string | null;
  unsandboxed: boolean;
  /** The user QEMU runs as: name and uid. */
  qemuUser: { name: string; uid: number | null; dropped: boolean };
  /** Set when VMs cannot start as configured. */
  error: string | null;
}

export async function confinementReport(qemu: string, env: NodeJS.ProcessEnv = process.env): Promise<ConfinementReport> {
  const self = { name: currentUserName(), uid: process.getuid?.() ?? null, dropped: false };
  if (unsandboxed(env)) {
    return { sandbox: "off", sandboxOptions: null, sandboxReason: "SUPERMACHINE_UNSANDBOXED=1", unsandboxed: true, qemuUser: self, error: null };
  }
  const probe = await sandboxProbe(qemu);
  let error: string | null = probe.ok === false ? `QEMU's sandbox cannot be enabled: ${probe.error}` : null;
  let qemuUser = self;
  if (dropsPrivileges(env)) {
    const name = qemuUserName(env);
    const u = lookupUser(name);
    qemuUser = { name, uid: u?.uid ?? null, dropped: true };
    if (!u) error ??= `the QEMU user ${name} does not exist (run npx supermachine setup)`;
  }
  return {
    sandbox: probe.ok === false ? "unavailable" : "on",
    sandboxOptions: SANDBOX_OPTS,
    sandboxReason: probe.ok === false ? probe.error : probe.ok === undefined ? `not probed: ${probe.error}` : null,
    unsandboxed: false,
    qemuUser,
    error,
  };
}

function currentUserName(): string {
  const uid = process.getuid?.();
  if (uid === 0) return "root";
  // The passwd entry of the uid, not $USER (unset under setpriv, sudo -u, systemd services; and
  // it may name someone else).
  try {
    return userInfo().username;
  } catch {
    return process.env.USER || process.env.LOGNAME || String(uid);
  }
}

/** ok: the sandbox works; false: QEMU refused it (error); undefined: QEMU could not be run at all. */
type Probe = { ok: true } | { ok: false; error: string } | { ok: undefined; error: string };
const probes = new Map<string, Promise<Probe>>();

/**
 * Whether `qemu` accepts the sandbox: starts it once per binary (about 0.1 s) with no machine,
 * the sandbox on and QMP on stdin, and has it quit. A binary that cannot be run at all is not
 * judged here: the launch reports that with QEMU's own error.
 */
export function sandboxProbe(qemu: string): Promise<Probe> {
  let p = probes.get(qemu);
  if (!p) {
    p = new Promise<Probe>((resolve) => {
      const child = execFile(
        qemu,
        ["-M", "none", "-nodefaults", "-no-user-config", "-display", "none", "-S", "-sandbox", SANDBOX_OPTS, "-qmp", "stdio"],
        { timeout: 20_000, encoding: "utf8" },
        (err, _stdout, stderr) => {
          if (!err) return resolve({ ok: true });
          const code = (err as NodeJS.ErrnoException).code;
          if (code === "ENOENT" || code === "EACCES") return resolve({ ok: undefined, error: err.message });
          const why = stderr.trim().split("\n").slice(-3).join("; ") || err.message;
          resolve({ ok: false, error: why });
        },
      );
      child.stdin?.on("error", () => {});
      child.stdin?.end('{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n');
    });
    probes.set(qemu, p);
    void p.then((r) => log("sandbox probe of %s: %o", qemu, r));
  }
  return p;
}

/**
 * `setpriv` arguments that start QEMU: dies with its owner (pdeathsig, kept across the uid change
 * by setpriv's ordering), no_new_privs, and with `user`: its uid and gid, and no supplementary
 * group but the one that opens /dev/kvm when the VM uses KVM.
 */
export function setprivArgs(c: Confinement, kvm: boolean): string[] {
  const args = ["--pdeathsig", "SIGKILL", "--no-new-privs"];
  if (c.user) {
    const groups = kvm ? kvmGroups(c.user) : [];
    args.push(`--reuid=${c.user.uid}`, `--regid=${c.user.gid}`, groups.length ? `--groups=${groups.join(",")}` : "--clear-groups");
  }
  return args;
}

/** The group QEMU needs to open /dev/kvm, when the device is group-accessible only. */
function kvmGroups(user: SystemUser): number[] {
  let st: Stats;
  try {
    st = statSync("/dev/kvm");
  } catch {
    return [];
  }
  if ((st.mode & 0o006) === 0o006 || st.uid === user.uid || st.gid === user.gid) return [];
  return (st.mode & 0o060) === 0o060 ? [st.gid] : [];
}

/**
 * Whether QEMU, run as `user`, can open /dev/kvm read-write: for the accelerator choice (a root
 * process can always open it; its QEMU maybe not).
 */
export function kvmUsableBy(user: SystemUser): boolean {
  try {
    const st = statSync("/dev/kvm");
    if (st.uid === user.uid) return (st.mode & 0o600) === 0o600;
    if (st.gid === user.gid || kvmGroups(user).length) return (st.mode & 0o060) === 0o060;
    return (st.mode & 0o006) === 0o006;
  } catch {
    return false;
  }
}

/**
 * Makes the file open on `fd` readable (`rw`: and writable) by QEMU's user when it is not yet:
 * a file this process owns gets QEMU's group and the group bits it needs (other users get
 * nothing); a file of someone else's is left alone and refused with an error naming it.
 */
export function grantQemu(fd: number, path: string, user: SystemUser | undefined, access: "r" | "rw"): void {
  if (!user) return;
  const need = access === "rw" ? 6 : 4;
  const st = fstatSync(fd);
  if (qemuMay(st, user, need)) return;
  if (st.uid !== process.getuid?.()) {
    throw new EngineError(
      "ENGINE_FILE_ACCESS",
      `${path} is not ${access === "rw" ? "readable and writable" : "readable"} by the user QEMU runs as (${user.name}), and belongs to uid ${st.uid}`,
      { hint: `give the file to QEMU's group: chgrp ${user.name} ${path} && chmod g+${access} ${path}` },
    );
  }
  fs.fchownSync(fd, -1, user.gid);
  fs.fchmodSync(fd, ((st.mode & 0o7777) & ~0o007) | (need << 3));
  log("granted group %s %s access to %s", user.name, access, path);
}

const traversable = new Map<string, string | undefined>();
/**
 * QEMU's user must reach the run directory (its sockets) by path: every directory above it
 * must let that user through. Throws naming the first one that does not (memoised per path).
 */
export function checkRuntimeRoot(dir: string, user: SystemUser | undefined): void {
  if (!user) return;
  const key = `${resolve(dir)}\0${user.uid}`;
  if (!traversable.has(key)) {
    let blocked: string | undefined;
    for (let d = resolve(dir); ; d = dirname(d)) {
      try {
        if (!qemuMay(statSync(d), user, 1)) blocked = d;
      } catch {
        blocked = d;
      }
      if (d === dirname(d)) break;
    }
    traversable.set(key, blocked);
  }
  const blocked = traversable.get(key);
  if (blocked) {
    throw new EngineError("ENGINE_RUNTIME_DIR_ACCESS", `QEMU runs as ${user.name}, which cannot reach the runtime directory ${dir}: ${blocked} does not let it through`, {
      hint: "point SUPERMACHINE_RUNTIME_DIR at a directory every user can traverse (the default is the system temp directory), or chmod o+x the directory named",
    });
  }
}

function qemuMay(st: Stats, user: SystemUser, need: number): boolean {
  if (st.uid === user.uid) return ((st.mode >> 6) & need) === need;
  if (st.gid === user.gid) return ((st.mode >> 3) & need) === need;
  return (st.mode & need) === need;
}

/**
 * Verifies that the QEMU process `pid` runs as confined: seccomp filter mode and, when it runs as
 * another user, that uid. Returns what is wrong, or undefined.
 */
export function checkConfined(pid: number, c: Confinement): string | undefined {
  let status: string;
  try {
    status = readFileSync(`/proc/${pid}/status`, "latin1");
  } catch (err) {
    return `cannot read /proc/${pid}/status: ${(err as Error).message}`;
  }
  if (c.sandbox) {
    const mode = /^Seccomp:\s*(\d+)/m.exec(status)?.[1];
    if (mode !== "2") return `its seccomp mode is ${mode ?? "unknown"}, not 2 (filter)`;
  }
  if (c.user) {
    const uids = /^Uid:\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)/m.exec(status);
    if (!uids || uids.slice(1).some((u) => Number(u) !== c.user!.uid)) return `it runs as uid ${uids?.[1] ?? "?"}, not ${c.user.uid} (${c.user.name})`;
  }
  return undefined;
}
