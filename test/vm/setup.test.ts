// `supermachine setup`: --check on this (set-up) host, on an empty cache directory, and from a
// project that installed the packed tarball, which then boots a VM with what setup found.
// Nothing here builds a kernel: the shared cache must already hold it (npm test's setup made it).
// "This host" is the home setup used (SUPERMACHINE_TEST_SETUP_HOME, test/helpers/tier-home.ts),
// not the tier's scratch home.
import { copyFileSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { cli as runCli, run as runProcess, setupHomeEnv, type RunOptions } from "../helpers/run.js";

const root = join(import.meta.dirname, "..", "..");
const cli = (args: string[], env: NodeJS.ProcessEnv = setupHomeEnv()) => runCli(args, { timeout: 60_000, env });

interface Item {
  name: string;
  ok: boolean;
  detail: string;
  fix?: string;
}
interface CheckReport {
  ok: boolean;
  mode: string;
  home: string;
  items: Item[];
  missing: string[];
  estimateSeconds: number;
}

const temps: string[] = [];
const temp = (prefix: string) => {
  const d = mkdtempSync(join(tmpdir(), prefix));
  temps.push(d);
  return d;
};
afterAll(() => {
  for (const d of temps) rmSync(d, { recursive: true, force: true });
});

describe("supermachine setup --check", () => {
  it("reports everything present on this host and exits 0", async () => {
    const r = await cli(["setup", "--check", "--json"]);
    expect(r.stderr).toBe("");
    const report = JSON.parse(r.stdout) as CheckReport;
    expect(report).toMatchObject({ ok: true, mode: "package", missing: [], estimateSeconds: 0 });
    expect(report.items.map((i) => i.name)).toEqual(["packages", "kernel", "agent", "busybox", "manifest", "qemu-user"]);
    expect(report.items.every((i) => i.ok)).toBe(true);
    expect(r.status).toBe(0);
    const text = await cli(["setup", "--check"]);
    expect(text.status).toBe(0);
    expect(text.stdout).toMatch(/^ok +kernel +\/.*vmlinux$/m);
    expect(text.stdout).toContain("all present");
  });

  it("reports the kernel, agent and busybox image missing from an empty cache, exits 1 and creates nothing", async () => {
    const home = temp("sm-setup-empty-");
    const r = await cli(["setup", "--check", "--json"], { ...process.env, SUPERMACHINE_HOME: home });
    expect(r.status).toBe(1);
    const report = JSON.parse(r.stdout) as CheckReport;
    expect(report.ok).toBe(false);
    expect(report.home).toBe(home);
    expect(report.missing).toEqual(expect.arrayContaining(["kernel", "agent", "busybox", "manifest"]));
    for (const name of ["kernel", "agent", "busybox"]) {
      const item = report.items.find((i) => i.name === name)!;
      expect(item.detail).toContain(home);
      expect(item.fix).toContain("npx supermachine setup");
    }
    // The kernel alone takes minutes to build: the estimate says so.
    expect(report.estimateSeconds).toBeGreaterThan(60);
    expect(readdirSync(home)).toEqual([]);
    // Text mode: one MISSING line per artifact, a summary naming the command, still nothing made.
    const text = await cli(["setup", "--check"], { ...process.env, SUPERMACHINE_HOME: home });
    expect(text.status).toBe(1);
    expect(text.stdout).toMatch(/^MISSING +kernel +not in the cache/m);
    expect(text.stdout).toMatch(/missing: kernel, agent, busybox, manifest; npx supermachine setup installs them \(about \d/);
    expect(readdirSync(home)).toEqual([]);
  });

  it("is a usage error with an unknown option", async () => {
    const r = await cli(["setup", "--frobnicate"]);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("unknown option");
  });
});

describe("setup from a project that installed the packed tarball", () => {
  it("finds the cached artifacts, writes its manifest without building, and boots a VM", { timeout: 180_000 }, async () => {
    const work = temp("sm-setup-pack-");
    const run = async (cmd: string, args: string[], opts: RunOptions = {}) => {
      const r = await runProcess(cmd, args, { timeout: 120_000, env: setupHomeEnv(), ...opts });
      if (r.error) throw r.error;
      return r;
    };
    const pack = await run("npm", ["pack", "--json", "--pack-destination", work], { cwd: root });
    expect(pack.status, pack.stderr).toBe(0);
    const tgz = join(work, (JSON.parse(pack.stdout) as { filename: string }[])[0]!.filename);
    const project = join(work, "app");
    await run("mkdir", [project]);
    writeFileSync(join(project, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
    const install = await run("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error", tgz], { cwd: project });
    expect(install.status, install.stderr).toBe(0);
    const installed = join(project, "node_modules", "supermachine");
    expect(readdirSync(installed)).not.toContain("src");
    expect(readdirSync(join(installed, "dist"))).not.toContain("native.json");

    const npx = (...args: string[]) => run("npx", ["--no-install", "supermachine", ...args], { cwd: project });
    const before = await npx("setup", "--check", "--json");
    const report = JSON.parse(before.stdout) as CheckReport;
    // Same guest sources as this checkout, same keys and the same install manifest (it lives in
    // the cache, named by those sources): the shared cache's kernel, agent and image are found.
    expect(report.mode).toBe("package");
    expect(report.missing).toEqual([]);
    expect(before.status).toBe(0);
    const manifest = report.items.find((i) => i.name === "manifest")!;
    expect(manifest.detail).toMatch(/\/installs\/[0-9a-f]{16}\.json$/);
    expect(manifest.detail.startsWith(installed)).toBe(false);

    const setup = await npx("setup", "--skip-apt", "--json");
    expect(setup.status, setup.stderr).toBe(0);
    expect(JSON.parse(setup.stdout)).toMatchObject({ ok: true, mode: "package", built: [] });
    expect(setup.stderr).not.toMatch(/npm ci|compiling TypeScript|building/);
    const after = await npx("setup", "--check");
    expect(after.status, after.stdout).toBe(0);
    expect(after.stdout).toContain("all present");

    copyFileSync(new URL("../fixtures/hello.mjs", import.meta.url), join(project, "hello.mjs"));
    const hello = await run(process.execPath, ["hello.mjs"], { cwd: project });
    expect(hello.stderr).toBe("");
    expect(hello.stdout).toBe("exit 0: hello\n");
    expect(hello.status).toBe(0);
  });
});
