// The compatibility tier: the library and the CLI under Node, Bun and Deno (the last two from
// the package's devDependencies), each run as a user runs it (`bun file.mjs`, `deno run -A
// file.mjs`), on real microVMs. Every row of the compatibility table (features.ts, shown in
// docs/runtimes.md) has its test here, per runtime; a row without one fails the tier.
import { spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { runtimeRoot } from "../../src/paths.js";
import { compareVersions, RUNTIME_MINIMUMS, type JsRuntimeName } from "../../src/js-runtime.js";
import { checkExample, EXPECTED, ROOT, RUN_TIMEOUT_MS, type Run } from "../helpers/examples.js";
import { run as runCommand, setupHomeEnv } from "../helpers/run.js";
import { qemuPids, waitFor } from "../helpers/vm.js";
import { FEATURES } from "./features.js";

const CLI = join(ROOT, "dist", "src", "cli", "main.js");
const SCENARIOS = join(ROOT, "test", "compat", "scenarios");
const PROJECT = join(ROOT, "test", "compat", "fixtures", "project");
const bin = (name: string) => join(ROOT, "node_modules", ".bin", name);
const LABELS: Record<JsRuntimeName, string> = { node: "Node", bun: "Bun", deno: "Deno" };
const nodeMajor = Number(process.versions.node.split(".")[0]);

interface Runtime {
  name: JsRuntimeName;
  /** The runtime and its arguments before a script. */
  command: string[];
  /** The version the package's devDependencies pin (undefined for Node: the one running the tests). */
  pinned: string | undefined;
  /** Whether plain JavaScript may use `await using` (a fact of the runtime's version). */
  awaitUsing: boolean;
}

const devDeps = (JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { devDependencies: Record<string, string> }).devDependencies;
const RUNTIMES: Runtime[] = [
  { name: "node", command: [process.execPath], pinned: undefined, awaitUsing: nodeMajor >= 24 },
  { name: "bun", command: [bin("bun")], pinned: devDeps.bun, awaitUsing: true },
  { name: "deno", command: [bin("deno"), "run", "-A"], pinned: devDeps.deno, awaitUsing: true },
];

/** Example output that differs by runtime for a reason outside supermachine. */
const EXPECTED_UNDER: Partial<Record<JsRuntimeName, Record<string, { drop: string; add: string }>>> = {
  // Deno's node:child_process reports a child it sent SIGTERM as ended by the signal, even when
  // the child handled it and exited 0 (checked apart below: `serve` itself exits 0 under Deno).
  deno: { "08-e2b-sdk.mjs": { drop: "server drained, exit 0\n", add: "server drained, ended by SIGTERM\n" } },
};

/** Runs `args` (a script and its arguments) under `rt`, with `env` added. */
async function run(rt: Runtime, args: string[], opts: { cwd?: string; env?: Record<string, string>; timeoutMs?: number } = {}): Promise<Run> {
  const t0 = Date.now();
  const r = await runCommand(rt.command[0]!, [...rt.command.slice(1), ...args], {
    cwd: opts.cwd ?? ROOT,
    env: { ...process.env, ...opts.env },
    timeout: opts.timeoutMs ?? RUN_TIMEOUT_MS,
    killSignal: "SIGKILL",
  });
  if (r.error && r.error.code !== "ETIMEDOUT") throw r.error;
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, ms: Date.now() - t0 };
}

const describeRun = (rt: Runtime, what: string, r: Run) => `${rt.name} ${what}: exit ${r.code ?? r.signal} after ${r.ms} ms\n--- stdout\n${r.stdout}--- stderr\n${r.stderr}`;

/** Runs a scenario under `rt`; expects exit 0 and returns its COMPAT report. */
async function scenario(rt: Runtime, name: string, args: string[] = [], env: Record<string, string> = {}): Promise<Record<string, unknown>> {
  const r = await run(rt, [join(SCENARIOS, `${name}.mjs`), ...args], { env });
  const line = r.stdout.split("\n").find((l) => l.startsWith("COMPAT "));
  expect(r.code, describeRun(rt, name, r)).toBe(0);
  expect(line, describeRun(rt, name, r)).toBeDefined();
  const facts = JSON.parse(line!.slice("COMPAT ".length)) as Record<string, unknown>;
  console.log(`[compat] ${rt.name} ${name}: ${JSON.stringify(facts)}`);
  return facts;
}

const made: string[] = [];
afterAll(() => {
  for (const d of made) rmSync(d, { recursive: true, force: true });
});
/** A copy of the compat project in a new temporary directory, `data` in its data.txt. */
function projectCopy(data?: string): string {
  const dir = realpathSync(mkdtempSync(join(tmpdir(), "sm-compat-")));
  made.push(dir);
  cpSync(PROJECT, dir, { recursive: true });
  if (data !== undefined) writeFileSync(join(dir, "data.txt"), data);
  return dir;
}

let installing: Promise<string> | undefined;
/**
 * A project that installed the packed package (pack:all's two tarballs) with hello.mjs in it,
 * made once for every runtime. pack:all takes the guest artifacts setup left in its home.
 */
function installedApp(): Promise<string> {
  installing ??= (async () => {
    const pack = await runCommand(process.execPath, [join(ROOT, "scripts", "pack-all.mjs"), "--json"], { cwd: ROOT, env: setupHomeEnv(), timeout: 300_000 });
    expect(pack.status, pack.stderr).toBe(0);
    const tgz = JSON.parse(pack.stdout) as { main: string; guest: string };
    const work = realpathSync(mkdtempSync(join(tmpdir(), "sm-compat-installed-")));
    made.push(work);
    writeFileSync(join(work, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
    const install = await runCommand("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error", tgz.main, tgz.guest], { cwd: work, timeout: 300_000 });
    expect(install.status, install.stderr).toBe(0);
    cpSync(join(ROOT, "test", "fixtures", "hello.mjs"), join(work, "hello.mjs"));
    return work;
  })();
  return installing;
}

/** Each image's key and status as one runtime's project scenario saw it, by runtime. */
const keysBy = new Map<JsRuntimeName, Record<string, { key: string; status: string }>>();

const TESTS: Record<string, (rt: Runtime) => void> = {
  examples(rt) {
    const files = Object.keys(EXPECTED).sort();
    for (const file of files) {
      it(`examples/${file}`, async () => {
        const change = EXPECTED_UNDER[rt.name]?.[file];
        const checks = change ? [...EXPECTED[file]!.filter((c) => c !== change.drop), change.add] : EXPECTED[file];
        await checkExample(file, rt.command, rt.name, checks);
      }, RUN_TIMEOUT_MS + 20_000);
    }
  },

  project(rt) {
    it("bakes a project of its own and loads its pools", async () => {
      // Data of its own: this runtime bakes both images itself.
      const facts = await scenario(rt, "project", [projectCopy(`data for ${rt.name} ${randomBytes(4).toString("hex")}\n`)]);
      expect(facts.nodes).toMatchObject({ base: { status: "baked" }, child: { status: "baked" } });
    }, 400_000);
    it("computes the same keys as every other runtime for the same project", async () => {
      const facts = await scenario(rt, "project", [projectCopy()]);
      const nodes = facts.nodes as Record<string, { key: string; status: string }>;
      keysBy.set(rt.name, nodes);
      for (const [other, theirs] of keysBy) {
        expect({ base: nodes.base!.key, child: nodes.child!.key }, `keys under ${rt.name} and ${other}`).toEqual({ base: theirs.base!.key, child: theirs.child!.key });
      }
      if (keysBy.size > 1) expect(nodes).toMatchObject({ base: { status: "cached" }, child: { status: "cached" } });
    }, 400_000);
  },

  spawn(rt) {
    it("streams a spawn's output and input with backpressure", async () => {
      const facts = await scenario(rt, "spawn");
      expect(facts).toMatchObject({ bytesOut: 16 * 1024 * 1024, bytesIn: 8 * 1024 * 1024 });
    });
  },

  tcp(rt) {
    it("forwards TCP into the guest", async () => {
      expect(await scenario(rt, "tcp")).toMatchObject({ echoedBytes: 4 * 1024 * 1024, downloadedBytes: 4 * 1024 * 1024 });
    });
  },

  "fork-bomb"(rt) {
    it("kills a fork bomb at its exec timeout", async () => {
      const facts = await scenario(rt, "fork-bomb");
      expect(facts.overshootMs as number).toBeLessThan(2_000);
    });
  },

  owner(rt) {
    it("kills QEMU and removes its directory when the owner calls process.exit() with the VM still out", async () => {
      const facts = await scenario(rt, "owner", ["exit"]);
      const pid = facts.qemuPid as number;
      expect(await waitFor(() => !qemuPids().includes(pid), 5_000, 100), `QEMU ${pid} outlived its ${rt.name} owner`).toBe(true);
      expect(runDirsOf(facts.ownerPid as number), "runtime directories left by the owner").toEqual([]);
    });
    it("kills QEMU when the owner is SIGKILLed", async () => {
      const child = spawn(rt.command[0]!, [...rt.command.slice(1), join(SCENARIOS, "owner.mjs"), "hang"], { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
      let out = "";
      let err = "";
      child.stdout.on("data", (c: Buffer) => (out += c.toString()));
      child.stderr.on("data", (c: Buffer) => (err += c.toString()));
      const line = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no report from ${rt.name} owner.mjs hang:\n${out}\n${err}`)), 120_000);
        child.stdout.on("data", () => {
          const l = out.split("\n").find((x) => x.startsWith("COMPAT "));
          if (l) {
            clearTimeout(timer);
            resolve(l);
          }
        });
        child.once("exit", (code) => reject(new Error(`${rt.name} owner.mjs hang exited (${code}):\n${out}\n${err}`)));
      });
      const pid = (JSON.parse(line.slice("COMPAT ".length)) as { qemuPid: number }).qemuPid;
      expect(qemuPids()).toContain(pid);
      child.kill("SIGKILL");
      expect(await waitFor(() => !qemuPids().includes(pid), 5_000, 100), `QEMU ${pid} outlived its SIGKILLed ${rt.name} owner`).toBe(true);
    });
  },

  "await-using"(rt) {
    it(rt.awaitUsing ? "releases and shuts down at the end of `await using` blocks" : "cannot parse `await using` in plain JavaScript (this Node is older than 24)", async () => {
      const r = await run(rt, [join(SCENARIOS, "await-using.mjs")]);
      if (rt.awaitUsing) {
        expect(r.code, describeRun(rt, "await-using", r)).toBe(0);
        expect(r.stdout).toContain('"scenario":"await-using"');
      } else {
        expect(r.code, describeRun(rt, "await-using", r)).not.toBe(0);
        expect(r.stderr).toContain("SyntaxError");
      }
    });
  },

  cli(rt) {
    it("lists, builds, explains and runs a project's images", async () => {
      const dir = projectCopy();
      const cli = (args: string[]) => run(rt, [CLI, ...args], { cwd: dir });
      const built = await cli(["build", "--json"]);
      expect(built.code, describeRun(rt, "build", built)).toBe(0);
      const ls = await cli(["ls", "--json"]);
      expect(ls.code, describeRun(rt, "ls", ls)).toBe(0);
      const { images } = JSON.parse(ls.stdout) as { images: { name: string; cached: boolean }[] };
      expect(images.map((i) => [i.name, i.cached]).sort()).toEqual([["base", true], ["child", true]]);
      const why = await cli(["why", "child"]);
      expect(why.code, describeRun(rt, "why", why)).toBe(0);
      expect(why.stdout).toContain("nothing changed");
      const ran = await cli(["run", "child", "--", "cat", "/etc/child-warm"]);
      expect(ran.code, describeRun(rt, "run", ran)).toBe(0);
      expect(ran.stdout).toBe("warmed by child: 42\n");
      const failed = await cli(["run", "child", "--", "sh", "-c", "exit 7"]);
      expect(failed.code, describeRun(rt, "run exit 7", failed)).toBe(7);
    }, 400_000);
  },

  installed(rt) {
    it("runs from an installed package: a program, and the CLI as docs/runtimes.md says", async () => {
      const app = await installedApp();
      const hello = await runCommand(rt.command[0]!, [...rt.command.slice(1), "hello.mjs"], { cwd: app, timeout: 240_000, killSignal: "SIGKILL" });
      expect(hello.stdout, `${rt.name} hello.mjs in an installed project:\n${hello.stderr}`).toBe("exit 0: hello\n");
      expect(hello.status).toBe(0);
      // The CLI, invoked as the page says; doctor names the runtime it runs on.
      const cli = { node: ["npx", "--no-install", "supermachine"], bun: [bin("bun"), "x", "--bun", "supermachine"], deno: [bin("deno"), "run", "-A", "npm:supermachine"] }[rt.name];
      const doctor = await runCommand(cli[0]!, [...cli.slice(1), "doctor", "--json"], { cwd: app, timeout: 120_000 });
      const report = JSON.parse(doctor.stdout || "{}") as { checks?: { id: string; summary: string }[] };
      const check = report.checks?.find((c) => c.id === "runtime");
      expect(check?.summary, `${cli.join(" ")} doctor --json:\n${doctor.stdout}\n${doctor.stderr}`).toMatch(new RegExp(`^${LABELS[rt.name]} \\d`));
    }, 400_000);
  },

  cache(rt) {
    it("signs an export and imports it into another home", async () => {
      const dir = projectCopy();
      const keyFile = join(dir, "cache.key");
      const cacheDir = join(dir, "cache");
      const keygen = await run(rt, [CLI, "cache", "keygen", keyFile, "--json"], { cwd: dir });
      expect(keygen.code, describeRun(rt, "keygen", keygen)).toBe(0);
      const publicKey = (JSON.parse(keygen.stdout) as { publicKey: string }).publicKey;
      expect(publicKey).toBeTruthy();
      // Both homes trust that key (the config is part of the images' keys: it is the same on both sides).
      const config = readFileSync(join(dir, "supermachine.config.ts"), "utf8").replace("images: { base, child },", `images: { base, child },\n  cache: { trust: [${JSON.stringify(publicKey)}] },`);
      writeFileSync(join(dir, "supermachine.config.ts"), config);
      const built = await run(rt, [CLI, "build", "--json"], { cwd: dir });
      expect(built.code, describeRun(rt, "build", built)).toBe(0);
      const exported = await run(rt, [CLI, "cache", "export", cacheDir, "--json"], { cwd: dir, env: { SUPERMACHINE_CACHE_SIGNING_KEY: keyFile } });
      expect(exported.code, describeRun(rt, "cache export", exported)).toBe(0);
      const home = realpathSync(mkdtempSync(join(tmpdir(), "sm-compat-home-")));
      made.push(home);
      cpSync(join(process.env.SUPERMACHINE_HOME!, "builtin"), join(home, "builtin"), { recursive: true });
      const imported = await run(rt, [CLI, "cache", "import", cacheDir, "--json"], { cwd: dir, env: { SUPERMACHINE_HOME: home } });
      expect(imported.code, describeRun(rt, "cache import", imported)).toBe(0);
      const ls = await run(rt, [CLI, "ls", "--json"], { cwd: dir, env: { SUPERMACHINE_HOME: home } });
      const { images } = JSON.parse(ls.stdout) as { images: { name: string; cached: boolean }[] };
      expect(images.map((i) => [i.name, i.cached]).sort(), describeRun(rt, "ls in the importing home", ls)).toEqual([["base", true], ["child", true]]);
      const ran = await run(rt, [CLI, "run", "child", "--", "cat", "/etc/child-warm"], { cwd: dir, env: { SUPERMACHINE_HOME: home } });
      expect(ran.stdout, describeRun(rt, "run from the imported snapshot", ran)).toBe("warmed by child: 42\n");
    }, 400_000);
  },

  serve(rt) {
    it("serves the project to connect() and drains on SIGTERM with exit 0", async () => {
      const dir = projectCopy();
      const keysFile = join(dir, "keys.json");
      const created = await run(rt, [CLI, "keys", "create", "--keys", keysFile, "--json"], { cwd: dir });
      expect(created.code, describeRun(rt, "keys create", created)).toBe(0);
      const key = (JSON.parse(created.stdout) as { key: string }).key;
      const server = spawn(rt.command[0]!, [...rt.command.slice(1), CLI, "serve", "--listen", "127.0.0.1:0", "--keys", keysFile, "--log-level", "warn"], {
        cwd: dir,
        stdio: ["ignore", "pipe", "pipe"],
      });
      let err = "";
      server.stderr.on("data", (c: Buffer) => (err += c.toString()));
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => server.once("exit", (code, signal) => r({ code, signal })));
      try {
        const url = await waitForUrl(() => /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(err)?.[1], () => err);
        expect(await readyWithin(`${url}/readyz`, 240_000), `serve under ${rt.name} never got ready:\n${err}`).toBe(true);
        await scenario(rt, "remote", [url], { SUPERMACHINE_API_KEY: key });
      } finally {
        server.kill("SIGTERM");
      }
      const end = await Promise.race([exited, new Promise<undefined>((r) => setTimeout(() => r(undefined), 60_000))]);
      if (!end) server.kill("SIGKILL");
      expect(end, `serve under ${rt.name} after SIGTERM:\n${err}`).toEqual({ code: 0, signal: null });
    }, 400_000);
  },

  permissions(rt) {
    it(rt.name === "deno" ? "passes the runtime check with -A" : "passes the runtime check with no flag at all", async () => {
      const r = await run(rt, [CLI, "doctor", "--json"], { timeoutMs: 120_000 });
      const check = (JSON.parse(r.stdout || "{}") as { checks?: { id: string; status: string; summary: string }[] }).checks?.find((c) => c.id === "runtime");
      expect(check, describeRun(rt, "doctor --json", r)).toMatchObject({ status: "pass", summary: expect.stringMatching(new RegExp(`^${LABELS[rt.name]} \\d`)) });
    });
    if (rt.name !== "deno") return;
    it("refuses to run without -A, naming the missing flags, at once", async () => {
      const r = await run({ ...rt, command: [bin("deno"), "run"] }, [join(ROOT, "examples", "01-hello.mjs")], { timeoutMs: 60_000 });
      expect(r.code, describeRun(rt, "without -A", r)).not.toBe(0);
      expect(r.stderr).toContain("RuntimeError: supermachine under Deno");
      expect(r.stderr).toContain("--allow-run");
      const cli = await run({ ...rt, command: [bin("deno"), "run", "--allow-env", "--allow-read", "--allow-write", "--allow-run", "--allow-net", "--allow-sys", "--allow-ffi"] }, [CLI, "info", "--json"], {
        timeoutMs: 60_000,
      });
      expect(cli.code, describeRun(rt, "with every flag but -A", cli)).toBe(1);
      expect(JSON.parse(cli.stdout)).toMatchObject({ error: { code: "RUNTIME_PERMISSIONS", hint: expect.stringContaining("deno run -A") } });
    });
  },
};

/** The runtime directories (sm-<pid>-*) an owner with `pid` left in the runtime root. */
function runDirsOf(pid: number): string[] {
  return readdirSync(runtimeRoot()).filter((n) => n.startsWith(`sm-${pid}-`));
}

/** Whether `url` answers 200 within `ms`. */
async function readyWithin(url: string, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if ((await fetch(url).catch(() => undefined))?.status === 200) return true;
    await new Promise((r) => setTimeout(r, 250));
  }
  return false;
}

async function waitForUrl(get: () => string | undefined, log: () => string): Promise<string> {
  const t0 = Date.now();
  while (Date.now() - t0 < 60_000) {
    const url = get();
    if (url) return url;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`serve printed no address:\n${log()}`);
}

describe("the compatibility table", () => {
  it("has a test for every row", () => {
    expect(FEATURES.map((f) => f.id).filter((id) => !(id in TESTS))).toEqual([]);
    expect(Object.keys(TESTS).filter((id) => !FEATURES.some((f) => f.id === id))).toEqual([]);
  });
});

for (const rt of RUNTIMES) {
  describe(`under ${rt.name}`, () => {
    it("is the runtime the table names, at or above its minimum", () => {
      expect(existsSync(rt.command[0]!), `${rt.command[0]} (npm ci installs it)`).toBe(true);
      const v = spawnSync(rt.command[0]!, ["--version"], { encoding: "utf8" });
      const version = /(\d+\.\d+\.\d+)/.exec(v.stdout)?.[1];
      expect(version, `${rt.command[0]} --version: ${v.stdout}${v.stderr}`).toBeDefined();
      if (rt.pinned) expect(version).toBe(rt.pinned);
      expect(compareVersions(version!, RUNTIME_MINIMUMS[rt.name].version)).toBeGreaterThanOrEqual(0);
    });
    for (const f of FEATURES) describe(f.id, () => TESTS[f.id]!(rt));
  });
}
