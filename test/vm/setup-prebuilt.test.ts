// The prebuilt guest package: `npm run pack:all` writes both tarballs, a fresh project installs
// them, and with an EMPTY cache directory `npx supermachine setup` compiles nothing (the kernel
// and agent come from supermachine-guest-linux-x64; only the busybox image, a packing step, is
// made) and a five-line program boots a VM. Nothing here builds a kernel: pack:all takes the
// shared cache's artifacts (npm test's setup made them).
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { run as runProcess, setupHomeEnv, type RunOptions } from "../helpers/run.js";

const root = join(import.meta.dirname, "..", "..");
const temps: string[] = [];
afterAll(() => {
  for (const d of temps) rmSync(d, { recursive: true, force: true });
});

const run = async (cmd: string, args: string[], opts: RunOptions = {}) => {
  const r = await runProcess(cmd, args, { timeout: 120_000, ...opts });
  if (r.error) throw r.error;
  return r;
};

/** The installed project's first program (prints "exit 0: hello"). */
const HELLO = readFileSync(new URL("../fixtures/hello.mjs", import.meta.url), "utf8");

describe("prebuilt guest package", () => {
  it("pack:all, install both tarballs, setup on an empty cache compiles nothing, first hello", { timeout: 240_000 }, async () => {
    // pack:all takes the artifacts setup left in its home (and would build them into another).
    const pack = await run(process.execPath, [join(root, "scripts", "pack-all.mjs"), "--json"], { cwd: root, env: setupHomeEnv() });
    expect(pack.status, pack.stderr).toBe(0);
    const tgz = JSON.parse(pack.stdout) as { main: string; guest: string; kernelKey: string; agentKey: string };
    const mainList = (await run("tar", ["-tzf", tgz.main])).stdout.split("\n");
    expect(mainList).toContain("package/dist/src/index.js");
    expect(mainList).not.toContain("package/dist/native.json");
    const packedPj = JSON.parse((await run("tar", ["-xzOf", tgz.main, "package/package.json"])).stdout) as { version: string; optionalDependencies?: Record<string, string> };
    expect(packedPj.optionalDependencies).toEqual({ "supermachine-guest-linux-x64": packedPj.version });

    const work = mkdtempSync(join(tmpdir(), "sm-prebuilt-"));
    temps.push(work);
    const project = join(work, "app");
    const home = join(work, "home");
    mkdirSync(project);
    mkdirSync(home);
    writeFileSync(join(project, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
    const install = await run("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error", tgz.main, tgz.guest], { cwd: project });
    expect(install.status, install.stderr).toBe(0);
    const guestDir = join(project, "node_modules", "supermachine-guest-linux-x64");
    const guest = JSON.parse(readFileSync(join(guestDir, "guest.json"), "utf8")) as { kernel: { key: string }; agent: { key: string; protocol: number } };
    expect(guest.kernel.key).toBe(tgz.kernelKey);
    expect(guest.agent.key).toBe(tgz.agentKey);

    // The empty cache directory; no explicit paths, and the prebuilt package allowed.
    const env: NodeJS.ProcessEnv = { ...process.env, SUPERMACHINE_HOME: home };
    for (const k of ["SUPERMACHINE_KERNEL", "SUPERMACHINE_INITRAMFS", "SUPERMACHINE_NO_PREBUILT"]) delete env[k];
    const npx = (...args: string[]) => run("npx", ["--no-install", "supermachine", ...args], { cwd: project, env });

    const before = await npx("setup", "--check", "--json");
    const report = JSON.parse(before.stdout) as { missing: string[]; items: { name: string; source?: string; key?: string; path?: string; prebuilt?: string }[] };
    // Only what the package cannot carry (and the machine-local manifest, which is not shipped)
    // is missing; the kernel and the agent come from it.
    expect(report.missing).toEqual(["busybox", "manifest"]);
    const kernel = report.items.find((i) => i.name === "kernel")!;
    const agent = report.items.find((i) => i.name === "agent")!;
    expect(kernel).toMatchObject({ source: "prebuilt", key: guest.kernel.key, path: join(guestDir, "vmlinux") });
    expect(agent).toMatchObject({ source: "prebuilt", key: guest.agent.key, path: join(guestDir, "initramfs.cpio") });

    const setup = await npx("setup", "--skip-apt", "--json");
    expect(setup.status, setup.stderr).toBe(0);
    const done = JSON.parse(setup.stdout) as { built: string[]; sources: Record<string, string> };
    expect(done.built).toEqual(["busybox"]);
    expect(done.sources).toEqual({ kernel: "prebuilt", agent: "prebuilt" });
    // Nothing compiled: no kernel or agent build started (their cache directories were never made).
    expect(setup.stderr).not.toMatch(/kernel: building|agent: building/);
    // The cache holds the busybox image and the install manifest (pointing into the package).
    expect(readdirSync(home).sort()).toEqual(["builtin", "installs"]);
    expect(existsSync(join(home, "kernel"))).toBe(false);
    expect(existsSync(join(home, "agent"))).toBe(false);
    const after = await npx("setup", "--check");
    expect(after.status, after.stdout).toBe(0);
    expect(after.stdout).toMatch(/^ok +kernel +from supermachine-guest-linux-x64@[^:]+: .*\/vmlinux$/m);

    writeFileSync(join(project, "hello.mjs"), HELLO);
    const hello = await run(process.execPath, ["hello.mjs"], { cwd: project, env });
    expect(hello.stderr).toBe("");
    expect(hello.stdout).toBe("exit 0: hello\n");
    expect(hello.status).toBe(0);
    // The VM ran on the prebuilt artifacts: the snapshot's key inputs name the package's keys.
    const snaps = readdirSync(join(home, "snapshots"));
    expect(snaps.length).toBe(1);
    const meta = readFileSync(join(home, "snapshots", snaps[0]!, "meta.json"), "utf8");
    expect(meta).toContain(guest.kernel.key);
    expect(meta).toContain(guest.agent.key);

    // A guest package built from other inputs is not used: setup --check says the kernel would be built.
    const gj = join(guestDir, "guest.json");
    const stale = JSON.parse(readFileSync(gj, "utf8")) as { kernel: { tree: string } };
    stale.kernel.tree = "0".repeat(64);
    writeFileSync(gj, JSON.stringify(stale));
    const mismatch = JSON.parse((await npx("setup", "--check", "--json")).stdout) as typeof report & { items: { name: string; prebuilt?: string }[] };
    const k2 = mismatch.items.find((i) => i.name === "kernel")!;
    expect(k2.source).toBe("cache");
    expect(k2.prebuilt).toMatch(/built from other kernel inputs/);
    expect(mismatch.items.find((i) => i.name === "agent")!.source).toBe("prebuilt");
  });
});
