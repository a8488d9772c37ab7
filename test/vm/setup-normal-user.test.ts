// Run as a normal user: a local user who is not root (and has no sudo) uses both packed tarballs,
// installed by root into the user's project and left root's (read-only to the user, as a global or
// shared install is), and, with its own empty HOME and cache directory, runs
// `npx supermachine setup --check`, `setup --skip-apt`, `doctor --json` and a hello program. Under
// TCG it needs no /dev/kvm; QEMU runs as that user (no privilege drop), inside its seccomp sandbox.
// Needs root to create the user and switch to it (setpriv); skipped otherwise.
import { chmodSync, chownSync, copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { run as runProcess, setupHomeEnv, type RunOptions } from "../helpers/run.js";

const root = join(import.meta.dirname, "..", "..");
const USER = "sm-test-user";
const isRoot = process.getuid?.() === 0;
const temps: string[] = [];
let createdUser = false;
afterAll(async () => {
  for (const d of temps) rmSync(d, { recursive: true, force: true });
  if (createdUser) await runProcess("userdel", [USER]);
});

const run = async (cmd: string, args: string[], opts: RunOptions = {}) => {
  const r = await runProcess(cmd, args, { timeout: 120_000, ...opts });
  if (r.error) throw r.error;
  return r;
};

/** The user's uid and gid, creating it (a system user, no home directory) when missing. */
async function testUser(): Promise<{ uid: number; gid: number }> {
  let r = await run("getent", ["passwd", USER]);
  if (r.status !== 0) {
    const add = await run("useradd", ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", USER]);
    expect(add.status, add.stderr).toBe(0);
    createdUser = true;
    r = await run("getent", ["passwd", USER]);
  }
  const f = r.stdout.trim().split(":");
  return { uid: Number(f[2]), gid: Number(f[3]) };
}

/** The installed project's first program (prints "exit 0: hello"). */
const HELLO = readFileSync(new URL("../fixtures/hello.mjs", import.meta.url), "utf8");

describe("as a normal user", () => {
  it.skipIf(!isRoot)("setup --check, setup --skip-apt, doctor, first hello: all without root", { timeout: 240_000 }, async () => {
    const { uid, gid } = await testUser();
    expect(uid).toBeGreaterThan(0);

    // pack:all takes the artifacts setup left in its home (and would build them into another).
    const pack = await run(process.execPath, [join(root, "scripts", "pack-all.mjs"), "--json"], { cwd: root, env: setupHomeEnv() });
    expect(pack.status, pack.stderr).toBe(0);
    const tgz = JSON.parse(pack.stdout) as { main: string; guest: string };

    // A directory the user can enter, holding everything it owns: the tarballs, its project, its
    // HOME, its cache directory and its runtime directory.
    const work = mkdtempSync(join(tmpdir(), "sm-user-"));
    temps.push(work);
    chmodSync(work, 0o755);
    const project = join(work, "app");
    const home = join(work, "home");
    const cache = join(work, "cache");
    const rt = join(work, "run");
    for (const d of [project, home, cache, rt]) mkdirSync(d);
    const main = join(work, basename(tgz.main));
    const guest = join(work, basename(tgz.guest));
    copyFileSync(tgz.main, main);
    copyFileSync(tgz.guest, guest);
    writeFileSync(join(project, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
    writeFileSync(join(project, "hello.mjs"), HELLO);
    // Installed by root (its npm cache makes this quick). The project is handed to the user, the
    // two installed packages stay root's: nothing may need to write into them.
    const install = await run("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error", main, guest], { cwd: project });
    expect(install.status, install.stderr).toBe(0);
    await run("chown", ["-R", `${uid}:${gid}`, project, home, cache, rt]);
    const pkgs = ["supermachine", "supermachine-guest-linux-x64"].map((n) => join(project, "node_modules", n));
    await run("chown", ["-R", "0:0", ...pkgs]);
    await run("chmod", ["-R", "go-w", ...pkgs]);
    expect(statSync(join(pkgs[0]!, "package.json")).uid).toBe(0);

    const env: NodeJS.ProcessEnv = { PATH: process.env.PATH, HOME: home, SUPERMACHINE_HOME: cache, TMPDIR: rt, npm_config_cache: join(home, ".npm"), npm_config_update_notifier: "false" };
    const as = (cmd: string, ...args: string[]) =>
      run("setpriv", ["--reuid", String(uid), "--regid", String(gid), "--clear-groups", "--", cmd, ...args], { cwd: project, env });
    const npx = (...args: string[]) => as("npx", "--no-install", "supermachine", ...args);

    const whoami = await as("id", "-u");
    expect(whoami.stdout.trim()).toBe(String(uid));
    for (const p of [...pkgs, join(pkgs[0]!, "dist")]) expect((await as("test", "-w", p)).status, `${p} writable by the user`).toBe(1);

    // Debian packages missing (a dpkg-query that knows of no installed package), no root, no sudo:
    // setup prints the one line to run and exits 1 before doing anything else.
    const shims = join(work, "shims");
    mkdirSync(shims);
    writeFileSync(join(shims, "dpkg-query"), "#!/bin/sh\nexit 0\n", { mode: 0o755 });
    const noPkgs = await run("setpriv", ["--reuid", String(uid), "--regid", String(gid), "--clear-groups", "--", "npx", "--no-install", "supermachine", "setup"], {
      cwd: project,
      env: { ...env, PATH: `${shims}:${env.PATH}` },
    });
    expect(noPkgs.status, noPkgs.stderr).toBe(1);
    expect(noPkgs.stdout).toBe("sudo apt-get install -y --no-install-recommends qemu-system-x86 squashfs-tools util-linux passwd zstd busybox-static\n");
    expect(noPkgs.stderr).toMatch(/SETUP_APT_NEEDS_ROOT|cannot install them: it is not root and has no password-less sudo/);
    expect(noPkgs.stderr).not.toMatch(/building|apt-get update/);
    expect(readdirSync(cache)).toEqual([]);

    // Missing: only what the guest package cannot carry. No root-only item (the QEMU user).
    const before = await npx("setup", "--check", "--json");
    expect(before.stderr).not.toMatch(/EACCES|permission denied/i);
    const report = JSON.parse(before.stdout) as { missing: string[]; items: { name: string; ok: boolean; detail: string }[] };
    expect(report.missing).toEqual(["busybox", "manifest"]);
    expect(report.items.find((i) => i.name === "qemu-user")).toMatchObject({ ok: true, detail: "not needed (QEMU runs as this user)" });
    expect(before.status).toBe(1);

    const setup = await npx("setup", "--skip-apt", "--json");
    expect(setup.status, setup.stderr).toBe(0);
    const done = JSON.parse(setup.stdout) as { built: string[]; sources: Record<string, string> };
    expect(done.built).toEqual(["busybox"]);
    expect(done.sources).toEqual({ kernel: "prebuilt", agent: "prebuilt" });
    expect(setup.stderr).not.toMatch(/kernel: building|agent: building|useradd/);
    expect(statSync(cache).uid).toBe(uid);

    const after = await npx("setup", "--check");
    expect(after.status, after.stdout + after.stderr).toBe(0);

    const doctor = await npx("doctor", "--json");
    expect(doctor.status, doctor.stdout + doctor.stderr).toBe(0);
    const dr = JSON.parse(doctor.stdout) as { ok: boolean; checks: { id: string; status: string; summary: string }[] };
    expect(dr.ok, doctor.stdout).toBe(true);
    expect(dr.checks.filter((c) => c.status === "fail")).toEqual([]);
    // QEMU runs in its seccomp sandbox as this user (no privilege drop without root).
    expect(dr.checks.find((c) => c.id === "sandbox")).toMatchObject({ status: "pass", summary: `on (seccomp), QEMU runs as ${USER} (uid ${uid}), this process's user` });
    expect(dr.checks.find((c) => c.id === "cache")?.status).toBe("pass");

    const hello = await as(process.execPath, "hello.mjs");
    expect(hello.stderr).toBe("");
    expect(hello.stdout).toBe("exit 0: hello\n");
    expect(hello.status).toBe(0);
    // Nothing left behind by the VM in the user's runtime directory; every cache entry is the user's.
    expect(readdirSync(rt).filter((n) => n.startsWith("sm-"))).toEqual([]);
    for (const n of readdirSync(cache)) expect(statSync(join(cache, n)).uid, n).toBe(uid);
    // The install manifest is the user's, in the user's cache; the packages are as installed.
    expect(readdirSync(join(cache, "installs")).filter((n) => /^[0-9a-f]{16}\.json$/.test(n))).toHaveLength(1);
    for (const p of pkgs) expect((await run("find", [p, "-newer", join(project, "package-lock.json"), "-print"])).stdout, `${p} changed`).toBe("");
  });
});
