// Host faults on real VMs: the Node process SIGKILLed mid-bake, mid-restore and mid-exec leaves
// no QEMU process, no trusted partial entry and no lock that delays the next run; a full file
// system (a small tmpfs as SUPERMACHINE_HOME) while writing an image's root filesystem or a
// snapshot gives STORE_NO_SPACE naming the path, leaves the cache consistent, and the next run
// with room completes. The work runs in child processes (the package as users import it: build
// first).
import { execFileSync, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { Image } from "../../src/index.js";
import { homePaths } from "../../src/paths.js";
import { snapshotInUse } from "../../src/store/leases.js";
import { cli } from "../helpers/run.js";
import { waitFor } from "../helpers/vm.js";

const root = join(import.meta.dirname, "..", "..");
const work = mkdtempSync(join(tmpdir(), "sm-host-faults-"));
const children: ChildProcess[] = [];
afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
});
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Runs `body` (ES module code; `Image` and `emit(obj)` in scope) in a child Node process. */
function child(body: string, env: NodeJS.ProcessEnv = process.env): { proc: ChildProcess; lines: unknown[]; next: (pred: (l: unknown) => boolean, ms?: number) => Promise<unknown> } {
  const code = `import { Image } from "supermachine";\nconst emit = (o) => console.log(JSON.stringify(o));\n${body}`;
  const proc = spawn(process.execPath, ["--input-type=module", "-e", code], { cwd: root, env, stdio: ["ignore", "pipe", "inherit"] });
  children.push(proc);
  const lines: unknown[] = [];
  const waiters: { pred: (l: unknown) => boolean; resolve: (l: unknown) => void }[] = [];
  let buf = "";
  proc.stdout!.on("data", (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      let v: unknown;
      try {
        v = JSON.parse(line);
      } catch {
        continue;
      }
      lines.push(v);
      for (const w of [...waiters]) if (w.pred(v)) waiters.splice(waiters.indexOf(w), 1) && w.resolve(v);
    }
  });
  const next = (pred: (l: unknown) => boolean, ms = 120_000) =>
    new Promise<unknown>((resolve, reject) => {
      const found = lines.find(pred);
      if (found) return resolve(found);
      const timer = setTimeout(() => reject(new Error(`the child printed no matching line within ${ms} ms: ${JSON.stringify(lines)}`)), ms);
      waiters.push({ pred, resolve: (v) => (clearTimeout(timer), resolve(v)) });
      proc.once("exit", (code, sig) => setTimeout(() => reject(new Error(`the child exited (${code ?? sig}) first: ${JSON.stringify(lines)}`)), 50));
    });
  return { proc, lines, next };
}

const exited = (c: ChildProcess) => new Promise<void>((r) => (c.exitCode !== null || c.signalCode !== null ? r() : c.once("exit", () => r())));

/** QEMU processes started by the Node process `pid` (their sockets live in its `sm-<pid>-*` run dirs). */
function qemuOf(pid: number): number[] {
  const r = spawnSync("pgrep", ["-f", `qemu-system.*/sm-${pid}-`], { encoding: "utf8" });
  return r.stdout.split("\n").filter(Boolean).map(Number);
}

const runDirsOf = (pid: number) => readdirSync(tmpdir()).filter((n) => n.startsWith(`sm-${pid}-`));

async function killAndCheck(c: ChildProcess): Promise<void> {
  const pid = c.pid!;
  expect(qemuOf(pid).length).toBeGreaterThan(0);
  c.kill("SIGKILL");
  await exited(c);
  // Their QEMU processes die with them (setpriv --pdeathsig).
  expect(await waitFor(() => qemuOf(pid).length === 0, 5_000)).toBe(true);
}

describe("SIGKILL of the Node process", () => {
  const snapshotsDir = join(work, "kill");
  const warmup = `warmupTag: "slow", warmup: async (vm) => { await vm.exec({ argv: ["true"] }); if (process.env.SM_TEST_HANG) { emit({ warming: true }); await new Promise(() => setInterval(() => {}, 1000)); } }`;

  it("mid-bake: no QEMU left, no snapshot trusted, and the next build takes the lock over at once", async () => {
    const c = child(`await Image.build({ ref: "builtin:busybox", snapshotsDir: ${JSON.stringify(snapshotsDir)}, name: "k", ${warmup} });`, { ...process.env, SM_TEST_HANG: "1" });
    await c.next((l) => (l as { warming?: boolean }).warming === true);
    await killAndCheck(c.proc);
    // What it leaves: its temp and its lock; no snapshot at the target.
    const left = readdirSync(snapshotsDir).sort();
    expect(left).toContain("k.lock");
    expect(left.some((n) => n.startsWith("k.tmp-"))).toBe(true);
    expect(left).not.toContain("k");
    // The same bake again (same key: same warmupTag), in this process: no wait for the dead writer.
    const phases: { phase: string; at: number }[] = [];
    const t0 = performance.now();
    const img = await Image.build({
      ref: "builtin:busybox",
      snapshotsDir,
      name: "k",
      warmupTag: "slow",
      warmup: async (vm) => void (await vm.exec({ argv: ["true"] })),
      onProgress: (p) => phases.push({ phase: p.phase === "bake" ? `bake:${p.step}` : p.phase, at: performance.now() - t0 }),
    });
    await img.dropHandoff();
    expect(phases.map((p) => p.phase)).not.toContain("bake-waiting-for-lock");
    expect(phases.find((p) => p.phase === "bake:boot")!.at).toBeLessThan(1_000); // the lock did not hold it up
    expect(readdirSync(snapshotsDir).sort()).toEqual(["k"]); // its temp is gone, so is the lock
  });

  it("mid-restore: no QEMU left, the lease it held does not count, the next pool restores at once", async () => {
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "r" });
    await img.dropHandoff();
    const c = child(`const img = await Image.fromSnapshot(${JSON.stringify(img.snapshotPath)}); emit({ restoring: true }); await img.pool({ min: 4, max: 4 }); emit({ done: true });`);
    await c.next((l) => (l as { restoring?: boolean }).restoring === true);
    expect(await waitFor(() => qemuOf(c.proc.pid!).length > 0, 20_000)).toBe(true);
    expect(snapshotInUse(img.snapshotPath)).toBe(true); // its lease, while it lives
    await killAndCheck(c.proc);
    expect(c.lines).not.toContainEqual({ done: true });
    expect(snapshotInUse(img.snapshotPath)).toBe(false); // a dead process's lease is ignored (and removed)
    expect(existsSync(`${img.snapshotPath}.lock`)).toBe(false);
    const t0 = performance.now();
    const pool = await img.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      expect((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString()).toBe("ok\n");
    } finally {
      await pool.shutdown();
    }
    expect(performance.now() - t0).toBeLessThan(30_000);
  });

  it("mid-exec: no QEMU left; the next process removes the run directories it left", async () => {
    const dir = join(snapshotsDir, "r");
    const c = child(`const img = await Image.fromSnapshot(${JSON.stringify(dir)}); const pool = await img.pool({ min: 1, max: 1 }); const vm = await pool.acquire(); const run = vm.exec({ argv: ["sleep", "600"] }); emit({ exec: true }); await run;`);
    await c.next((l) => (l as { exec?: boolean }).exec === true);
    await new Promise((r) => setTimeout(r, 300)); // the exec is running in the guest
    const pid = c.proc.pid!;
    await killAndCheck(c.proc);
    expect(runDirsOf(pid).length).toBeGreaterThan(0); // a SIGKILLed process cleans up nothing ...
    const next = child(`const img = await Image.fromSnapshot(${JSON.stringify(dir)}); const pool = await img.pool({ min: 1, max: 1 }); const vm = await pool.acquire(); const r = await vm.exec({ argv: ["echo", "next"] }); emit({ out: r.stdout.toString() }); await pool.shutdown();`);
    expect(await next.next((l) => (l as { out?: string }).out !== undefined)).toEqual({ out: "next\n" });
    await exited(next.proc);
    expect(next.proc.exitCode).toBe(0);
    expect(runDirsOf(pid)).toEqual([]); // ... the next process sweeps what it left
  });
});

describe("a full file system", () => {
  const home = join(work, "tmpfs-home");
  let mounted = false;
  beforeAll(() => {
    mkdirSync(home, { recursive: true });
  });
  afterAll(() => {
    if (mounted) execFileSync("umount", ["-l", home]);
  });
  const mount = (size: string) => {
    execFileSync("mount", mounted ? ["-o", `remount,size=${size}`, home] : ["-t", "tmpfs", "-o", `size=${size},mode=0700`, "tmpfs", home]);
    mounted = true;
  };
  const env = () => ({ ...process.env, SUPERMACHINE_HOME: home });
  const build = `try { const img = await Image.build({ ref: "builtin:busybox" }); emit({ ok: true, dir: img.snapshotPath }); } catch (e) { emit({ ok: false, name: e.name, code: e.code, message: e.message, hint: e.hint }); } process.exit(0);`;

  /** Nothing half-written or locked anywhere in the home. */
  function consistent(): void {
    const bad = spawnSync("find", [home, "(", "-name", "*.tmp-*", "-o", "-name", ".tmp-*", "-o", "-name", "*.lock", "-o", "-name", "*.break", ")"], { encoding: "utf8" }).stdout.trim();
    expect(bad).toBe("");
  }

  it("while writing an image's root filesystem: STORE_NO_SPACE naming the path; with room, the next run completes", async () => {
    mount("2m");
    cpSync(homePaths().builtin, join(home, "builtin"), { recursive: true }); // about 1.1 MB: the squashfs (1.4 MB) does not fit
    const c = child(build, env());
    const r = (await c.next(() => true)) as { ok: boolean; name: string; code: string; message: string; hint: string };
    await exited(c.proc);
    expect(r).toMatchObject({ ok: false, name: "StoreError", code: "STORE_NO_SPACE" });
    expect(r.message).toContain(`no space left on the file system of ${join(home, "images")} while writing image "builtin:busybox"`);
    expect(r.hint).toContain("free some space");
    consistent();
    expect(readdirSync(join(home, "images"))).toEqual([]);
    mount("512m"); // room for the snapshot too (its RAM file takes about 40 MB)
    const again = child(build, env());
    const r2 = (await again.next(() => true)) as { ok: boolean; dir: string };
    await exited(again.proc);
    expect(r2, JSON.stringify(r2)).toMatchObject({ ok: true });
    consistent();
  });

  it("while writing a snapshot: STORE_NO_SPACE naming the path; with room, the next run completes", async () => {
    // The home of the previous test: the root filesystem is there. Fill it up to 2 MB short of full.
    rmSync(join(home, "snapshots"), { recursive: true, force: true });
    const df = () => Number(execFileSync("df", ["--output=avail", "-B1", home], { encoding: "utf8" }).trim().split("\n")[1]);
    execFileSync("fallocate", ["-l", String(df() - 2 * 2 ** 20), join(home, "filler")]);
    const c = child(build, env());
    const r = (await c.next(() => true, 180_000)) as { ok: boolean; name: string; code: string; message: string; hint: string };
    await exited(c.proc);
    expect(r).toMatchObject({ ok: false, name: "StoreError", code: "STORE_NO_SPACE" });
    expect(r.message).toMatch(new RegExp(`no space left on the file system of ${join(home, "snapshots")} while writing snapshot ${join(home, "snapshots")}/img-[0-9a-f]{16}`));
    expect(qemuOf(c.proc.pid!)).toEqual([]);
    consistent();
    expect(readdirSync(join(home, "snapshots")).filter((n) => !n.startsWith("."))).toEqual([]);
    rmSync(join(home, "filler"));
    const again = child(build, env());
    const r2 = (await again.next(() => true, 180_000)) as { ok: boolean; dir: string };
    await exited(again.proc);
    expect(r2, JSON.stringify(r2)).toMatchObject({ ok: true });
    consistent();
    // And what it wrote is sound.
    const v = await cli(["verify", "--json"], { env: env() });
    expect(v.status, v.stdout).toBe(0);
  });
});
