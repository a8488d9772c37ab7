// No way out: QEMU runs under its seccomp sandbox and, when the host process is root (as in CI
// here), as the unprivileged `supermachine` user; the guest has no network device; exposeTcp
// binds loopback only; nothing under $SUPERMACHINE_HOME is readable by another local user.
import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { networkInterfaces, tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { MicroVm } from "../../src/engine/qemu.js";
import { diffInputs } from "../../src/graph/keys.js";
import { Image, type Vm } from "../../src/index.js";
import { LOG_RETENTION } from "../../src/failure-logs.js";
import { homePaths } from "../../src/paths.js";
import { lookupUser } from "../../src/private.js";
import { useBusyboxVm } from "../helpers/vm.js";
import { cli as runCli, run } from "../helpers/run.js";

const asRoot = process.getuid?.() === 0;
const qemuUser = lookupUser("supermachine");
const machineOf = (vm: Vm) => (vm as unknown as { machine: MicroVm }).machine;

function procStatus(pid: number): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(`/proc/${pid}/status`, "utf8").split("\n")) {
    const i = line.indexOf(":");
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1).trim();
  }
  return out;
}

const env = useBusyboxVm();

describe("the QEMU process", () => {
  it("runs under its seccomp sandbox with no_new_privs, as the unprivileged user when we are root", () => {
    const st = procStatus(env.vm.pid);
    expect(st.Seccomp).toBe("2");
    expect(st.NoNewPrivs).toBe("1");
    const cmdline = readFileSync(`/proc/${env.vm.pid}/cmdline`, "utf8").split("\0");
    expect(cmdline).toContain("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
    if (asRoot) {
      expect(qemuUser).not.toBeNull();
      expect(qemuUser!.uid).not.toBe(0);
      expect(st.Uid!.split(/\s+/).map(Number)).toEqual([qemuUser!.uid, qemuUser!.uid, qemuUser!.uid, qemuUser!.uid]);
      expect(st.Gid!.split(/\s+/).map(Number)).toEqual([qemuUser!.gid, qemuUser!.gid, qemuUser!.gid, qemuUser!.gid]);
      expect(st.Groups).toBe("");
      expect(st.CapEff).toBe("0000000000000000");
    } else {
      expect(Number(st.Uid!.split(/\s+/)[0])).toBe(process.getuid!());
    }
  });

  it("opens nothing of the host's by path: its files are descriptors it was handed", () => {
    const cmdline = readFileSync(`/proc/${env.vm.pid}/cmdline`, "utf8").split("\0");
    const home = homePaths().home;
    expect(cmdline.filter((a) => a.includes(home))).toEqual([]);
    expect(cmdline).toContain("/proc/self/fd/3");
    // What it holds open under the home: the kernel, initramfs, root disk and RAM file, nothing else.
    const held = readdirSync(`/proc/${env.vm.pid}/fd`)
      .map((fd) => {
        try {
          return execFileSync("readlink", [`/proc/${env.vm.pid}/fd/${fd}`], { encoding: "utf8" }).trim();
        } catch {
          return "";
        }
      })
      .filter((p) => p.startsWith(home))
      // Another test file sharing the home may rebake or collect the snapshot meanwhile; a VM
      // a bake handed off holds the RAM it ran on (ram.live, copied to ram at the capture).
      .map((p) => p.replace(/ \(deleted\)$/, ""));
    for (const p of held) expect(p, p).toMatch(/\/(vmlinux|initramfs\.cpio|rootfs\.sqfs|ram(\.live)?)$/);
  });

  it("cannot start a process: a migration to an exec: URI kills it (SIGSYS) and the command never runs", async () => {
    const image = await Image.build({ ref: "builtin:busybox" });
    const pool = await image.pool({ min: 1, max: 1 });
    const proof = join(tmpdir(), `sm-spawn-proof-${process.pid}`);
    try {
      const vm = await pool.acquire();
      const m = machineOf(vm);
      const qmp = (m as unknown as { qmp: { execute(cmd: string, args?: unknown): Promise<unknown> } }).qmp;
      await qmp.execute("migrate", { uri: `exec:touch ${proof}` }).catch(() => {});
      const exit = await m.exited;
      expect(exit.signal).toBe("SIGSYS");
      expect(existsSync(proof)).toBe(false);
      await vm.release();
    } finally {
      rmSync(proof, { force: true });
      await pool.shutdown();
    }
  });
});

describe("the guest's ways out", () => {
  it("has no network device, only loopback", async () => {
    const r = await env.vm.exec({ argv: ["ls", "/sys/class/net"] });
    expect(r.stdout.toString().split(/\s+/).filter(Boolean)).toEqual(["lo"]);
    const cmdline = readFileSync(`/proc/${env.vm.pid}/cmdline`, "utf8").split("\0");
    expect(cmdline.some((a) => /^-(net|netdev|nic)$/.test(a))).toBe(false);
  });

  it("exposeTcp listens on 127.0.0.1 only", async () => {
    await env.vm.exec({ argv: ["sh", "-c", "nc -ll -p 7100 -e cat & sleep 0.2"] });
    const fwd = await env.vm.exposeTcp(0, 7100);
    try {
      expect(fwd.localAddr).toBe(`127.0.0.1:${fwd.port}`);
      // The kernel's view: the listening socket is bound to 127.0.0.1, not to any address.
      const hexPort = fwd.port.toString(16).toUpperCase().padStart(4, "0");
      const listening = [readFileSync("/proc/net/tcp", "utf8"), existsSync("/proc/net/tcp6") ? readFileSync("/proc/net/tcp6", "utf8") : ""]
        .join("\n")
        .split("\n")
        .map((l) => l.trim().split(/\s+/))
        .filter((f) => f[1]?.endsWith(`:${hexPort}`) && f[3] === "0A")
        .map((f) => f[1]);
      expect(listening).toEqual([`0100007F:${hexPort}`]);
      // Another address of this host is refused.
      const external = Object.values(networkInterfaces())
        .flat()
        .find((a) => a && a.family === "IPv4" && !a.internal)?.address;
      if (external) {
        const err = await new Promise<NodeJS.ErrnoException | undefined>((res) => {
          const s = connect({ host: external, port: fwd.port }, () => {
            s.destroy();
            res(undefined);
          });
          s.once("error", (e) => res(e));
        });
        expect(err?.code).toBe("ECONNREFUSED");
      }
    } finally {
      fwd.stop();
    }
  });
});

/** Runs a Node script as `uid`/`gid` (no supplementary groups) that tries to read each path. */
async function readableAs(uid: number, gid: number, paths: string[]): Promise<string[]> {
  const script = `
    const fs = require("node:fs");
    const paths = JSON.parse(fs.readFileSync(0, "utf8"));
    const open = [];
    for (const p of paths) {
      try {
        if (fs.lstatSync(p).isDirectory()) fs.readdirSync(p); else fs.closeSync(fs.openSync(p, "r"));
        open.push(p);
      } catch {}
    }
    process.stdout.write(JSON.stringify(open));`;
  const r = await run(process.execPath, ["-e", script], { uid, gid, cwd: "/", input: JSON.stringify(paths), timeout: 60_000 });
  if (r.status !== 0) throw new Error(`walker as uid ${uid} failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as string[];
}

function walk(dir: string): string[] {
  const out = [dir];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...walk(p));
    else out.push(p);
  }
  return out;
}

describe("a private home", () => {
  const saved = { ...process.env };
  let home: string;
  let busyboxLayout: string;

  beforeAll(() => {
    busyboxLayout = join(homePaths().builtin, "busybox");
    // A home an older version left open: 0755, with a world-readable file and directory in it.
    home = mkdtempSync(join(tmpdir(), "sm-private-home-"));
    chmodSync(home, 0o755);
    mkdirSync(join(home, "logs"), { mode: 0o755 });
    chmodSync(join(home, "logs"), 0o755);
    writeFileSync(join(home, "logs", "vm-old.log"), "an old console log\n", { mode: 0o644 });
    chmodSync(join(home, "logs", "vm-old.log"), 0o644);
    // Logs to prune: one past its age, and more than the count limit.
    const old = (Date.now() - LOG_RETENTION.maxAgeMs - 3_600_000) / 1000;
    utimesSync(join(home, "logs", "vm-old.log"), old, old);
    for (let i = 0; i < LOG_RETENTION.maxFiles + 5; i++) {
      const f = join(home, "logs", `vm-filler-${i}.log`);
      writeFileSync(f, "x\n", { mode: 0o600 });
      const t = (Date.now() - 3_600_000 - i * 1000) / 1000;
      utimesSync(f, t, t);
    }
    process.env.SUPERMACHINE_HOME = home;
  });

  afterEach(() => {
    for (const k of ["SUPERMACHINE_KERNEL"]) {
      if (saved[k] === undefined) delete process.env[k];
      else process.env[k] = saved[k];
    }
  });

  afterAll(() => {
    process.env.SUPERMACHINE_HOME = saved.SUPERMACHINE_HOME;
    if (saved.SUPERMACHINE_HOME === undefined) delete process.env.SUPERMACHINE_HOME;
    rmSync(home, { recursive: true, force: true });
  });

  it("keeps the build env out of meta.json, VMs still get it, and why names the variable that changed", async () => {
    const secret = `hunter2-${process.pid}-${Date.now()}`;
    const image = await Image.build({ ref: `oci:${busyboxLayout}`, env: { API_TOKEN: secret, MODE: "a" }, cmd: ["sleep", "1000000"] });
    await image.dropHandoff();
    expect(image.snapshotPath.startsWith(home)).toBe(true);
    const metaText = readFileSync(join(image.snapshotPath, "meta.json"), "utf8");
    expect(metaText).not.toContain(secret);
    const meta = JSON.parse(metaText) as { inputs: { env: Record<string, string> }; workload: { env: string[] } };
    expect(Object.keys(meta.inputs.env).sort()).toEqual(["API_TOKEN", "MODE"]);
    expect(meta.inputs.env.API_TOKEN).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(meta.workload.env.find((e) => e.startsWith("API_TOKEN="))).toMatch(/^API_TOKEN=sha256:/);
    const envFile = join(image.snapshotPath, "env.json");
    expect(readFileSync(envFile, "utf8")).toContain(secret);
    expect(statSync(envFile).mode & 0o777).toBe(0o600);

    // A fresh open of the snapshot gives VMs the value.
    const reopened = await Image.fromSnapshot(image.snapshotPath);
    const pool = await reopened.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      expect((await vm.exec({ argv: ["sh", "-c", "echo $API_TOKEN"] })).stdout.toString().trim()).toBe(secret);
      await vm.release();
    } finally {
      await pool.shutdown();
    }

    // Another value of one variable: another key, and the change is named by variable.
    const other = await Image.build({ ref: `oci:${busyboxLayout}`, env: { API_TOKEN: secret, MODE: "b" }, cmd: ["sleep", "1000000"] });
    await other.dropHandoff();
    expect(other.inputHash).not.toBe(image.inputHash);
    const before = JSON.parse(readFileSync(join(image.snapshotPath, "meta.json"), "utf8"));
    const after = JSON.parse(readFileSync(join(other.snapshotPath, "meta.json"), "utf8"));
    expect(diffInputs(before, after).map((c) => c.input)).toEqual(["env:MODE"]);

    // A value that does not match the key (env.json edited) is a damaged snapshot, not a VM with the wrong env.
    writeFileSync(envFile, readFileSync(envFile, "utf8").replace(secret, "tampered"));
    await expect(Image.fromSnapshot(image.snapshotPath)).rejects.toMatchObject({ code: "SNAPSHOT_DAMAGED" });
  });

  it("keeps a failed VM's console log (0600, named by the error) and prunes old logs", async () => {
    const image = await Image.build({ ref: `oci:${busyboxLayout}` });
    const pool = await image.pool({ min: 1, max: 1 });
    let named: string | undefined;
    try {
      const vm = await pool.acquire();
      process.kill(vm.pid, "SIGKILL");
      const err = (await vm.exec({ argv: ["true"] }).catch((e: unknown) => e)) as Error & { code: string };
      expect(err.code).toBe("VM_DEAD");
      named = /guest console log: (\S+?)\)?$/m.exec(err.message)?.[1];
      expect(named, err.message).toBeDefined();
      expect(named!.startsWith(join(home, "logs"))).toBe(true);
      expect(existsSync(named!)).toBe(true);
      expect(statSync(named!).mode & 0o777).toBe(0o600);
      await vm.release();
    } finally {
      await pool.shutdown();
    }
    // A QEMU that exits during boot before the guest wrote anything (a cold boot: another
    // memory size; the kernel cannot load): QEMU's stderr says why, and no empty log is named.
    process.env.SUPERMACHINE_KERNEL = "/etc/hostname";
    const boot = (await image.pool({ min: 1, memoryMib: 192 }).catch((e: unknown) => e)) as Error & { code: string };
    expect(boot.code).toBe("ENGINE_EXITED_DURING_BOOT");
    expect(boot.message).toMatch(/QEMU stderr/);
    expect(boot.message).not.toContain("guest console log");

    const logs = readdirSync(join(home, "logs"));
    expect(logs).not.toContain("vm-old.log");
    expect(logs.length).toBeLessThanOrEqual(LOG_RETENTION.maxFiles);
    expect(logs).toContain(named!.split("/").pop());
  });

  it("lets no other local user read anything under it", async () => {
    // Something running too: a pool's lease, a VM's files.
    const image = await Image.build({ ref: `oci:${busyboxLayout}` });
    const logsBefore = readdirSync(join(home, "logs")).sort();
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      await vm.exec({ argv: ["true"] });
      const paths = walk(home);
      expect(paths.length).toBeGreaterThan(20);
      // Modes: nothing for other users anywhere; group bits only for QEMU's group.
      const open = paths.filter((p) => {
        const st = statSync(p);
        return (st.mode & 0o007) !== 0 || ((st.mode & 0o070) !== 0 && st.gid !== qemuUser?.gid);
      });
      expect(open.map((p) => `${p} ${(statSync(p).mode & 0o777).toString(8)}`)).toEqual([]);
      expect(statSync(home).mode & 0o777).toBe(0o700);
      // And as another user: nothing opens, by any path.
      expect(await readableAs(65534, 65534, paths)).toEqual([]);
      // Nor as QEMU's own user: it only has the descriptors it was handed.
      if (asRoot && qemuUser) expect(await readableAs(qemuUser.uid, qemuUser.gid, paths)).toEqual([]);
      await vm.release();
    } finally {
      await pool.shutdown();
    }
    // VMs that ran and stopped normally keep no console log.
    expect(readdirSync(join(home, "logs")).sort()).toEqual(logsBefore);
  });
});

describe("refusing to run unconfined", () => {
  const saved = { ...process.env };
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "sm-noseccomp-"));
    chmodSync(dir, 0o755);
    // A QEMU built without seccomp support, as far as -sandbox goes.
    writeFileSync(
      join(dir, "qemu-system-x86_64"),
      '#!/bin/sh\ncase "$*" in *-sandbox*) echo "qemu-system-x86_64: -sandbox: seccomp support is disabled" >&2; exit 1;; esac\nexec qemu-system-x86_64 "$@"\n',
      { mode: 0o755 },
    );
  });
  afterEach(() => {
    for (const k of ["SUPERMACHINE_QEMU", "SUPERMACHINE_UNSANDBOXED", "SUPERMACHINE_QEMU_USER", "SUPERMACHINE_RUNTIME_DIR"]) {
      if (saved[k] === undefined) delete process.env[k];
      else process.env[k] = saved[k];
    }
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("refuses a QEMU whose sandbox cannot be enabled, unless SUPERMACHINE_UNSANDBOXED=1", async () => {
    const image = await Image.build({ ref: "builtin:busybox" });
    process.env.SUPERMACHINE_QEMU = join(dir, "qemu-system-x86_64");
    const err = (await image.pool({ min: 1 }).catch((e: unknown) => e)) as Error & { code: string; hint: string };
    expect(err.code).toBe("ENGINE_SANDBOX_UNAVAILABLE");
    expect(err.message).toContain("seccomp support is disabled");
    expect(err.hint).toContain("SUPERMACHINE_UNSANDBOXED=1");

    process.env.SUPERMACHINE_UNSANDBOXED = "1";
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      expect((await vm.exec({ argv: ["echo", "ok"] })).stdout.toString()).toBe("ok\n");
      const st = procStatus(vm.pid);
      expect(st.Seccomp).toBe("0");
      expect(Number(st.Uid!.split(/\s+/)[0])).toBe(process.getuid!());
      await vm.release();
    } finally {
      await pool.shutdown();
    }
  });

  it("supermachine info reports the sandbox, the QEMU user and SUPERMACHINE_UNSANDBOXED", async () => {
    const info = async (args: string[], extra: NodeJS.ProcessEnv) => {
      const r = await runCli(args, { env: { ...process.env, ...extra } });
      if (r.status !== 0) throw new Error(`supermachine ${args.join(" ")} exited with ${r.status ?? r.signal}: ${r.stderr}`);
      return r.stdout;
    };
    const cli = async (extra: NodeJS.ProcessEnv) =>
      JSON.parse(await info(["info", "--json"], extra)) as {
        confinement: { sandbox: string; unsandboxed: boolean; qemuUser: { name: string; uid: number; dropped: boolean }; error: string | null };
      };
    const on = (await cli({})).confinement;
    expect(on.sandbox).toBe("on");
    expect(on.unsandboxed).toBe(false);
    expect(on.error).toBeNull();
    if (asRoot) expect(on.qemuUser).toEqual({ name: "supermachine", uid: qemuUser!.uid, dropped: true });
    const off = (await cli({ SUPERMACHINE_UNSANDBOXED: "1" })).confinement;
    expect(off.sandbox).toBe("off");
    expect(off.unsandboxed).toBe(true);
    const text = await info(["info"], { SUPERMACHINE_UNSANDBOXED: "1" });
    expect(text).toMatch(/sandbox: +off \(SUPERMACHINE_UNSANDBOXED=1\)/);
  });

  it.runIf(asRoot)("refuses to run QEMU as root when its user is missing", async () => {
    const image = await Image.build({ ref: "builtin:busybox" });
    process.env.SUPERMACHINE_QEMU_USER = "sm-no-such-user";
    await expect(image.pool({ min: 1 })).rejects.toMatchObject({ code: "ENGINE_QEMU_USER_MISSING", hint: expect.stringContaining("npx supermachine setup") });
  });

  it.runIf(asRoot)("names a runtime directory QEMU's user cannot reach", async () => {
    const image = await Image.build({ ref: "builtin:busybox" });
    const closed = mkdtempSync(join(tmpdir(), "sm-closed-"));
    try {
      process.env.SUPERMACHINE_RUNTIME_DIR = join(closed, "run");
      mkdirSync(process.env.SUPERMACHINE_RUNTIME_DIR, { mode: 0o755 });
      await expect(image.pool({ min: 1 })).rejects.toMatchObject({ code: "ENGINE_RUNTIME_DIR_ACCESS", message: expect.stringContaining(closed) });
    } finally {
      rmSync(closed, { recursive: true, force: true });
    }
  });
});
