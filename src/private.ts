/**
 * Who may read what supermachine keeps on disk. Everything under `$SUPERMACHINE_HOME` belongs to
 * the user who runs supermachine: directories 0700, files 0600. The only exception is the files
 * a QEMU process reopens by itself (the guest kernel, the agent initramfs, snapshot RAM files):
 * when the host process is root, QEMU runs as an unprivileged system user (`supermachine`, see
 * `src/engine/confine.ts`) and those files are group-owned by that user's group, 0640 or 0660.
 * Nothing is ever readable by other local users.
 *
 * Writers create their entries private; a home made by an older version (0755 directories,
 * 0644 files) is tightened the first time this process uses it.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, lstatSync, mkdirSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { logger } from "./debug.js";

const log = logger("private");

export const PRIVATE_DIR_MODE = 0o700;
export const PRIVATE_FILE_MODE = 0o600;
/** The system user QEMU runs as when the host process is root; `SUPERMACHINE_QEMU_USER` overrides. */
export const DEFAULT_QEMU_USER = "supermachine";

export interface SystemUser {
  name: string;
  uid: number;
  /** Its primary group, which owns the files QEMU reopens. */
  gid: number;
}

export const qemuUserName = (env: NodeJS.ProcessEnv = process.env): string => env.SUPERMACHINE_QEMU_USER?.trim() || DEFAULT_QEMU_USER;

/** Whether QEMU runs as another user than this process: the process is root and not unsandboxed. */
export function dropsPrivileges(env: NodeJS.ProcessEnv = process.env): boolean {
  return process.getuid?.() === 0 && !unsandboxed(env);
}

/** `SUPERMACHINE_UNSANDBOXED=1`: QEMU runs without its seccomp sandbox and as this process's user. */
export function unsandboxed(env: NodeJS.ProcessEnv = process.env): boolean {
  return /^(1|true|yes)$/i.test(env.SUPERMACHINE_UNSANDBOXED?.trim() ?? "");
}

const users = new Map<string, SystemUser | null>();
/** Looks a user up through NSS (`getent passwd`), memoised; null when there is none. */
export function lookupUser(name: string): SystemUser | null {
  let u = users.get(name);
  if (u === undefined) {
    const r = spawnSync("getent", ["passwd", name], { encoding: "utf8", timeout: 10_000 });
    const f = r.status === 0 ? r.stdout.trim().split(":") : [];
    u = f.length >= 4 && /^\d+$/.test(f[2]!) && /^\d+$/.test(f[3]!) ? { name, uid: Number(f[2]), gid: Number(f[3]) } : null;
    users.set(name, u);
  }
  return u;
}

/** The group whose members may keep group access to files under the home (QEMU's), if any. */
function qemuGroup(env: NodeJS.ProcessEnv = process.env): number | undefined {
  return dropsPrivileges(env) ? (lookupUser(qemuUserName(env))?.gid ?? undefined) : undefined;
}

/**
 * Removes every permission of other users under `root` (itself included): directories become
 * 0700, files lose their group and other bits, except group bits on files owned by QEMU's group.
 * Symbolic links are not followed. Errors on single entries (raced away) are ignored.
 */
export function tightenTree(root: string, keepGroup: number | undefined = qemuGroup()): number {
  let changed = 0;
  const visit = (p: string) => {
    let st;
    try {
      st = lstatSync(p);
    } catch {
      return;
    }
    if (st.isSymbolicLink()) return;
    const perm = st.mode & 0o7777;
    const want = st.isDirectory() ? perm & ~0o077 : st.gid === keepGroup && keepGroup !== undefined ? perm & ~0o007 : perm & ~0o077;
    if (want !== perm) {
      try {
        chmodSync(p, want);
        changed++;
      } catch {
        /* gone meanwhile */
      }
    }
    if (st.isDirectory()) {
      let names: string[] = [];
      try {
        names = readdirSync(p);
      } catch {
        /* gone meanwhile */
      }
      for (const n of names) visit(join(p, n));
    }
  };
  visit(root);
  return changed;
}

const checkedHomes = new Set<string>();
/**
 * Makes sure `home` exists and is private: created 0700; an existing one whose mode lets anyone
 * else in is tightened, with everything under it (once per process and home).
 */
export function ensurePrivateHome(home: string): void {
  if (checkedHomes.has(home)) return;
  checkedHomes.add(home);
  try {
    mkdirSync(home, { recursive: true, mode: PRIVATE_DIR_MODE });
    const st = statSync(home);
    if ((st.mode & 0o077) !== 0 && st.uid === process.getuid?.()) {
      const n = tightenTree(home);
      log("tightened %s: %d entries were readable by other users", home, n);
    }
  } catch (err) {
    // A read-only or foreign home: its writers will fail with their own errors.
    log("cannot secure %s: %s", home, (err as Error).message);
  }
}
