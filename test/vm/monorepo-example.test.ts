// examples/monorepo, as its README says to use it: copied to a temp dir, `npm install` (workspace
// links only, nothing downloaded), build bakes the twelve images and then reports them cached,
// ls/graph/run/loadPools see them, after an edit to a shared helper `why` names the helper's
// file for exactly the images whose bundle it changes, and the CI cache flow of its README works:
// export into a cache directory, import into a fresh checkout and an empty home, build --frozen.
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadPools } from "../../src/index.js";
import { homePaths } from "../../src/paths.js";
import { run as runProcess, cli as runCli } from "../helpers/run.js";

const root = join(import.meta.dirname, "..", "..");
const example = join(root, "examples", "monorepo");
const work = realpathSync(mkdtempSync(join(tmpdir(), "sm-monorepo-example-")));
const dir = join(work, "monorepo");
afterAll(() => rmSync(work, { recursive: true, force: true }));

const IMAGES = ["base", "httpd", "tools", "checkout-api", "checkout-cron", "checkout-docs", "checkout-worker", "search-index", "search-ingest", "search-report", "search-shell", "search-site"];
const HELPER = "packages/helpers/src/stamp.ts";

function cli(...args: string[]) {
  return cliIn(dir, {}, ...args);
}

function cliIn(cwd: string, env: Record<string, string>, ...args: string[]) {
  return runCli(args, { cwd, timeout: 300_000, env: { ...process.env, ...env } });
}

async function prepare(target: string, source = example): Promise<void> {
  // What a checkout holds: a local node_modules or snapshots of someone's run are not copied.
  cpSync(source, target, { recursive: true, filter: (src) => !/\/(node_modules|\.snapshots)$/.test(src) && !src.endsWith("package-lock.json") });
  const install = await runProcess("npm", ["install", "--offline", "--no-audit", "--no-fund"], { cwd: target, timeout: 120_000 });
  if (install.status !== 0) throw new Error(`npm install failed: ${install.stdout}\n${install.stderr}`);
}

async function json<T>(...args: string[]): Promise<T> {
  const r = await cli(...args, "--json");
  if (r.status !== 0) throw new Error(`${args.join(" ")} failed (${r.status}): ${r.stdout}\n${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

type Rows = { images: { name: string; status: string; parent: string | null }[] };

let first: Rows;

beforeAll(async () => {
  await prepare(dir);
  first = await json<Rows>("build");
}, 600_000);

describe("examples/monorepo", () => {
  it("links the workspace packages and bakes the twelve images, then reports them all cached", async () => {
    expect(realpathSync(join(dir, "node_modules", "@acme", "helpers"))).toBe(join(dir, "packages", "helpers"));
    expect(first.images.map((i) => i.name).sort()).toEqual([...IMAGES].sort());
    expect(first.images.every((i) => i.status === "baked")).toBe(true);
    const again = await json<Rows>("build");
    expect(again.images.map((i) => i.status)).toEqual(IMAGES.map(() => "cached"));
    expect(existsSync(join(dir, ".snapshots"))).toBe(true);
  });

  it("lists, graphs and runs the images; loadPools hands out the pools", async () => {
    const ls = await json<{ images: { name: string; cached: boolean; parent: string | null }[] }>("ls");
    expect(ls.images.every((i) => i.cached)).toBe(true);
    expect(Object.fromEntries(ls.images.map((i) => [i.name, i.parent]))).toMatchObject({ base: null, "checkout-docs": "httpd", "search-index": "search-ingest", "search-ingest": "tools" });
    const graph = await json<{ images: { name: string; children: string[] }[] }>("graph");
    expect(graph.images.find((i) => i.name === "base")!.children.sort()).toEqual(["httpd", "search-shell", "tools"]);
    const run = await cli("run", "search-index", "--", "sh", "-c", "acme-info; ingest");
    expect(run.status, run.stderr).toBe(0);
    expect(run.stdout).toBe("acme: base tools search-ingest search-index \n2\n");

    const pools = await loadPools({ cwd: join(dir, "packages", "team-a"), frozen: true });
    try {
      expect(Object.keys(pools).sort()).toEqual(["checkout", "search"]);
      const vm = await pools.checkout!.acquire();
      try {
        expect(JSON.parse((await vm.exec({ argv: ["cat", "/etc/acme/checkout-api.json"] })).stdout.toString())).toEqual({ service: "checkout-api", team: "a" });
      } finally {
        await vm.release();
      }
    } finally {
      await pools.close();
    }
  });

  it("names an edited shared helper in why for the images whose bundle it changes", async () => {
    const file = join(dir, HELPER);
    writeFileSync(file, readFileSync(file, "utf8").replace(">> /etc/acme/images", ">> /etc/acme/images && sync"));
    const why: Record<string, { cached: boolean; changes: { input: string }[] }> = {};
    for (const n of IMAGES) why[n] = await json<{ cached: boolean; changes: { input: string }[] }>("why", n);
    const naming = IMAGES.filter((n) => why[n]!.changes.some((c) => c.input === `module:${HELPER}`)).sort();
    // httpd imports @acme/helpers too, but not stamp: its bundle, and so its key, is unchanged.
    const untouched = ["base", "httpd", "search-shell"];
    expect(naming).toEqual(IMAGES.filter((n) => !untouched.includes(n)).sort());
    for (const n of untouched) expect(why[n], n).toMatchObject({ cached: true, changes: [] });
    expect(why["checkout-api"]!.changes.map((c) => c.input)).toEqual(["parent", `module:${HELPER}`]);
    const text = await cli("why", "checkout-api");
    expect(text.stdout).toContain(`module:${HELPER}`);
    const rebuilt = await json<Rows>("build");
    expect(rebuilt.images.filter((i) => i.status === "baked").map((i) => i.name).sort()).toEqual(naming);
  });

  it("follows the README's CI flow: keygen, signed export, import into a fresh checkout and home, build --frozen", async () => {
    const cache = join(work, "ci-cache");
    // The README's first step: a key pair; the config trusts its public key, the export signs with it.
    const keyFile = join(work, "ci-cache.key");
    const keygen = await cli("cache", "keygen", keyFile);
    expect(keygen.status, keygen.stderr).toBe(0);
    const publicKey = keygen.stdout.trim();
    expect(publicKey).toMatch(/^ed25519:[A-Za-z0-9+/]{43}=$/);
    const configFile = join(dir, "supermachine.config.ts");
    writeFileSync(configFile, readFileSync(configFile, "utf8").replace(/ed25519:[A-Za-z0-9+/]{43}=/, publicKey));
    const unsigned = await cli("cache", "export", join(work, "unsigned-cache"), "--json");
    expect(unsigned.status, unsigned.stderr).toBe(0);
    const exported = await cliIn(dir, { SUPERMACHINE_CACHE_SIGNING_KEY: keyFile }, "cache", "export", cache, "--json");
    expect(exported.status, `${exported.stdout}\n${exported.stderr}`).toBe(0);
    const report = JSON.parse(exported.stdout) as { snapshots: { name: string; status: string }[] };
    expect(report.snapshots.map((s) => s.name).sort()).toEqual([...IMAGES].sort());
    // Another machine: a fresh checkout and a home that has never baked or pulled anything (only
    // the built-in busybox source layout, which setup builds on every machine).
    const other = join(work, "other");
    await prepare(other, dir); // the same sources as the exporting checkout (its helper edit included)
    const home = join(work, "other-home");
    mkdirSync(join(home, "builtin"), { recursive: true });
    cpSync(join(homePaths().builtin, "busybox"), join(home, "builtin", "busybox"), { recursive: true });
    const frozenBefore = await cliIn(other, { SUPERMACHINE_HOME: home }, "build", "--frozen", "--json");
    expect(frozenBefore.status).toBe(1);
    // What the key did not sign is refused, naming the snapshot.
    const refused = await cliIn(other, { SUPERMACHINE_HOME: home }, "cache", "import", join(work, "unsigned-cache"), "--json");
    expect(refused.status).not.toBe(0);
    expect(`${refused.stdout}${refused.stderr}`).toMatch(/CACHE_UNTRUSTED[\s\S]*is not signed/);
    const imported = await cliIn(other, { SUPERMACHINE_HOME: home }, "cache", "import", cache, "--json");
    expect(imported.status, `${imported.stdout}\n${imported.stderr}`).toBe(0);
    const frozen = await cliIn(other, { SUPERMACHINE_HOME: home }, "build", "--frozen", "--json");
    expect(frozen.status, `${frozen.stdout}\n${frozen.stderr}`).toBe(0);
    const rows = (JSON.parse(frozen.stdout) as Rows).images;
    expect(rows.map((r) => r.status)).toEqual(rows.map(() => "cached"));
    expect(rows).toHaveLength(IMAGES.length);
    const run = await cliIn(other, { SUPERMACHINE_HOME: home }, "run", "checkout-api", "--", "cat", "/etc/acme/checkout-api.json");
    expect(run.status, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout)).toEqual({ service: "checkout-api", team: "a" });
  });
});
