/**
 * Confinement set up once per host: as root, the unprivileged system user QEMU runs as
 * (`supermachine`, no login shell, no home; src/engine/confine.ts) is created when missing, the
 * cache directory is made private (src/private.ts), and the kernel and agent in it are given to
 * QEMU's group, read-only.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, chownSync, statSync } from "node:fs";
import { SetupError } from "../errors.js";
import { lookupUser, qemuUserName, tightenTree, unsandboxed, type SystemUser } from "../private.js";
import { run, type SetupContext } from "./context.js";

/** The system user QEMU runs as, when this process is root and sandboxes QEMU (null: not needed). */
export function qemuUserState(): { name: string; user: SystemUser | undefined } | null {
  if (process.getuid?.() !== 0 || unsandboxed()) return null;
  const name = qemuUserName();
  return { name, user: lookupUser(name) ?? undefined };
}

export function ensureConfinement(ctx: SetupContext, artifacts: string[]): void {
  const state = qemuUserState();
  let user = state?.user;
  if (state && !user) {
    const name = state.name;
    run(ctx, "useradd", ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "--comment", "supermachine QEMU", name]);
    const r = spawnSync("getent", ["passwd", name], { encoding: "utf8" });
    const f = r.stdout.trim().split(":");
    if (r.status !== 0 || f.length < 4) throw new SetupError("SETUP_QEMU_USER", `useradd ${name} did not create the user`);
    user = { name, uid: Number(f[2]), gid: Number(f[3]) };
    ctx.say(`created the system user ${name} (uid ${user.uid}) that QEMU runs as`);
  }
  const n = tightenTree(ctx.home, user?.gid);
  if (n) ctx.note(`made ${n} entries of ${ctx.home} private`);
  if (user) {
    for (const f of artifacts) {
      const st = statSync(f);
      if (st.gid !== user.gid || (st.mode & 0o777) !== 0o640) {
        chownSync(f, -1, user.gid);
        chmodSync(f, 0o640);
      }
    }
  }
}
