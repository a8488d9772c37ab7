// supermachine.lock on real VMs, through the CLI, with a real registry on loopback: a project
// whose root image is a registry tag (busybox pushed as lock/bb:1) is built and its tag pinned;
// with the registry stopped the same project still keys, and a fresh home imports its snapshots
// from a directory cache (build --frozen --cache-from) instead of failing on the network; the tag
// moved to new content, `build --update` moves the pin and `why` names it; `--frozen` refuses a
// tag without a pin; a bad lockfile is refused naming it.
//
// The project's ref names a gate on loopback (a TCP forwarder this file runs) rather than the
// registry itself, so that the registry behind it can be stopped and another started (with the
// tag moved) under the same name, and so that the connections a build makes can be counted.
import { spawn } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createHash } from "node:crypto";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadPools } from "../../src/index.js";
import { generateSigningKey } from "../../src/transfer/sign.js";

/** The project signs its cache exports and trusts that key. */
const signing = generateSigningKey();
import { startRegistry, type Registry } from "../helpers/registry.js";
import { inHome } from "../helpers/transfer.js";

const root = join(import.meta.dirname, "..", "..");
const work = mkdtempSync(join(tmpdir(), "sm-lockfile-"));
const MANIFEST_TYPES = ["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];

interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}
interface Row {
  name: string;
  key: string;
  status: string;
}
interface LockReport {
  file: string;
  pins: { ref: string; platform: string; digest: string; change: string; before?: string }[];
}
interface BuildReport {
  images: Row[];
  lock?: LockReport;
}

/** The CLI in a child process, asynchronously: the gate runs in this process's event loop. */
function cli(cwd: string, home: string | undefined, ...args: string[]): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(root, "dist/src/cli/main.js"), ...args], {
      cwd,
      env: { ...process.env, ...(home ? { SUPERMACHINE_HOME: home } : {}) },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), 400_000);
    child.on("error", reject);
    child.on("close", (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
  });
}
async function json<T>(p: Promise<CliResult>): Promise<T> {
  const r = await p;
  if (r.status !== 0) throw new Error(`exit ${r.status}: ${r.stdout}\n${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

/** A TCP forwarder to whichever registry is current; with none, it refuses (resets) every connection. */
interface Gate {
  host: string;
  connections: number;
  target: string | undefined;
  close(): Promise<void>;
}
async function startGate(): Promise<Gate> {
  const sockets = new Set<net.Socket>();
  const gate: Gate = { host: "", connections: 0, target: undefined, close: async () => {} };
  const server = net.createServer((client) => {
    gate.connections++;
    sockets.add(client);
    client.on("close", () => sockets.delete(client));
    client.on("error", () => {});
    if (!gate.target) return void client.resetAndDestroy();
    const [host, port] = gate.target.split(":");
    const upstream = net.connect(Number(port), host!);
    sockets.add(upstream);
    upstream.on("close", () => sockets.delete(upstream));
    upstream.on("error", () => client.destroy());
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  gate.host = `127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  gate.close = () =>
    new Promise<void>((r) => {
      for (const s of sockets) s.destroy();
      server.close(() => r());
    });
  return gate;
}

/** The manifest digest `repo:tag` has in `reg` (asked directly, not through the gate). */
async function digestOf(reg: Registry, repo: string, tag: string): Promise<string> {
  const res = await fetch(`${reg.url}/v2/${repo}/manifests/${tag}`, { method: "HEAD", headers: { Accept: MANIFEST_TYPES.join(", ") } });
  const d = res.headers.get("docker-content-digest");
  if (!res.ok || !d) throw new Error(`${reg.host}/${repo}:${tag}: ${res.status}`);
  return d;
}

const sha256 = (b: Buffer | string) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

/** A copy of the busybox layout whose image config sets one more env variable: another manifest. */
function variantLayout(busybox: string): string {
  const dir = join(work, "busybox-b");
  cpSync(busybox, dir, { recursive: true });
  const blob = (d: string) => join(dir, "blobs", "sha256", d.slice("sha256:".length));
  const put = (bytes: string) => {
    const d = sha256(bytes);
    writeFileSync(blob(d), bytes);
    return { digest: d, size: Buffer.byteLength(bytes) };
  };
  const index = JSON.parse(readFileSync(join(dir, "index.json"), "utf8")) as { manifests: { digest: string; size: number }[] };
  const manifest = JSON.parse(readFileSync(blob(index.manifests[0]!.digest), "utf8")) as { config: { digest: string; size: number } };
  const config = JSON.parse(readFileSync(blob(manifest.config.digest), "utf8")) as { config?: { Env?: string[] } };
  config.config = { ...config.config, Env: [...(config.config?.Env ?? []), "VARIANT=b"] };
  Object.assign(manifest.config, put(JSON.stringify(config)));
  Object.assign(index.manifests[0]!, put(JSON.stringify(manifest)));
  writeFileSync(join(dir, "index.json"), JSON.stringify(index));
  return dir;
}

let gate: Gate;
let reg: Registry;
let busybox: string;
let ref: string;
let digestA: string;
let project: string;
let cacheDir: string;
let first: BuildReport;

/** The project: a root image on the registry tag and a child built on it; snapshots beside it. */
function writeProject(dir: string): string {
  mkdirSync(dir, { recursive: true });
  writeFileSync(
    join(dir, "supermachine.config.ts"),
    `import { defineConfig } from "supermachine/config";
export default defineConfig({
  snapshotsDir: "./.snapshots",
  images: {
    bb: { ref: ${JSON.stringify(ref)} },
    app: { from: "bb", warmup: async (vm) => { await vm.exec({ argv: ["sh", "-c", "mkdir -p /srv && echo hello from app > /srv/app"] }); } },
  },
  pools: { app: { image: "app", min: 1, max: 1 } },
  cache: { signingKey: "./cache.key", trust: [${JSON.stringify(signing.publicKey)}] },
});
`,
  );
  writeFileSync(join(dir, "cache.key"), signing.privatePem, { mode: 0o600 });
  return dir;
}

/** A copy of the project (its lockfile too, unless `lock` is false), without its snapshots. */
function copyProject(name: string, lock = true): string {
  const dir = join(work, name);
  cpSync(project, dir, { recursive: true });
  rmSync(join(dir, ".snapshots"), { recursive: true, force: true });
  if (!lock) rmSync(join(dir, "supermachine.lock"), { force: true });
  return dir;
}

const freshHome = (name: string) => {
  const home = join(work, `home-${name}`);
  mkdirSync(home);
  return home;
};

const lockText = (digest: string) => `{
  "version": 1,
  "pins": [
    {
      "ref": "${ref}",
      "platform": "linux/${process.arch === "arm64" ? "arm64" : "amd64"}",
      "digest": "${digest}",
      "resolved": "${ref}"
    }
  ]
}
`;

beforeAll(async () => {
  // @ts-ignore -- plain JavaScript module
  const { ensureFixtures } = (await import("../fixtures/build-fixtures.mjs")) as { ensureFixtures(o: { only: string[]; log: () => void }): Promise<{ busybox: { layout: string; tag: string } }> };
  busybox = (await ensureFixtures({ only: ["busybox"], log: () => {} })).busybox.layout;
  gate = await startGate();
  reg = await startRegistry("plain");
  await reg.push(busybox, "latest", "lock/bb", "1");
  gate.target = reg.host;
  digestA = await digestOf(reg, "lock/bb", "1");
  ref = `${gate.host}/lock/bb:1`;
  project = writeProject(join(work, "project"));
  cacheDir = join(work, "cache");
  first = await json<BuildReport>(cli(project, undefined, "build", "--json", "--cache-to", cacheDir));
}, 900_000);

afterAll(async () => {
  await reg?.stop();
  await gate?.close();
  rmSync(work, { recursive: true, force: true });
});

describe("supermachine.lock", () => {
  it("pins the tag at the first build, and a build with nothing new does not rewrite it", async () => {
    expect(first.images.map((r) => [r.name, r.status])).toEqual([["bb", "baked"], ["app", "baked"]]);
    const file = join(project, "supermachine.lock");
    expect(first.lock).toEqual({ file, pins: [{ ref, platform: `linux/${process.arch === "arm64" ? "arm64" : "amd64"}`, digest: digestA, change: "pinned" }] });
    expect(readFileSync(file, "utf8")).toBe(lockText(digestA));
    const before = statSync(file);

    const again = await cli(project, undefined, "build");
    expect(again.status).toBe(0);
    expect(again.stderr).not.toContain("lock:");
    expect(again.stderr).toContain("2 images: 0 baked, 2 cached");
    const after = statSync(file);
    expect([after.mtimeMs, after.ino]).toEqual([before.mtimeMs, before.ino]);
    expect(readFileSync(file, "utf8")).toBe(lockText(digestA));
  }, 600_000);

  it("with the registry stopped, keys the same and a fresh home imports from the cache", async () => {
    const keys = Object.fromEntries(first.images.map((r) => [r.name, r.key]));
    const old = reg;
    gate.target = undefined;
    await old.stop();
    const connections = gate.connections;

    // Here: ls and a build key by the pin, and find the snapshots.
    const ls = await json<{ images: { name: string; key: string; cached: boolean }[] }>(cli(project, undefined, "ls", "--json"));
    expect(ls.images.map((r) => [r.name, r.key, r.cached])).toEqual([["bb", keys.bb, true], ["app", keys.app, true]]);

    // A fresh home (no image, no local name, no blob) with the lockfile: the root filesystem and
    // the snapshots come from the directory cache, and a frozen build finds every key.
    const home = freshHome("offline");
    const copy = copyProject("offline");
    const rows = (await json<BuildReport>(cli(copy, home, "build", "--json", "--frozen", "--cache-from", cacheDir))).images;
    expect(rows.map((r) => [r.name, r.status, r.key])).toEqual([["bb", "imported", keys.bb], ["app", "imported", keys.app]]);
    const run = await cli(copy, home, "run", "app", "--", "cat", "/srv/app");
    expect(run.stderr).toBe("");
    expect(run.stdout).toBe("hello from app\n");
    expect(gate.connections - connections).toBe(0); // nothing asked the registry

    // The same without the lockfile: the tag must be resolved, and the registry is gone.
    const unpinned = await cli(copyProject("unpinned", false), freshHome("unpinned"), "build", "--json", "--cache-from", cacheDir);
    expect(unpinned.status).toBe(1);
    const failed = JSON.parse(unpinned.stdout) as { images: (Row & { error?: { code: string } })[] };
    expect(failed.images[0]).toMatchObject({ name: "bb", status: "failed" });
    expect(failed.images[0]!.error?.code).toMatch(/^REGISTRY_/);
    expect(gate.connections).toBeGreaterThan(connections);
  }, 600_000);

  it("build --update moves the pin to what the tag names now, and why names lock:<ref>", async () => {
    // The registry is back, with the tag moved to other content.
    reg = await startRegistry("plain");
    await reg.push(variantLayout(busybox), "latest", "lock/bb", "1");
    gate.target = reg.host;
    const digestB = await digestOf(reg, "lock/bb", "1");
    expect(digestB).not.toBe(digestA);

    // Without --update nothing asks what the tag names: the pin holds.
    const held = await json<{ images: { name: string; key: string }[] }>(cli(project, undefined, "ls", "--json"));
    expect(held.images.map((r) => r.key)).toEqual(first.images.map((r) => r.key));

    // A dry run with --update keys by what the tag names now, and writes no pin.
    const lockBefore = readFileSync(join(project, "supermachine.lock"), "utf8");
    const dry = await json<BuildReport>(cli(project, undefined, "build", "--json", "--dry-run", "--update"));
    expect(dry.images.map((r) => r.status)).toEqual(["would-bake", "would-bake"]);
    expect(dry.lock).toBeUndefined();
    expect(readFileSync(join(project, "supermachine.lock"), "utf8")).toBe(lockBefore);

    // A teammate updates the pin (a copy of the project, with its lockfile) and builds.
    const theirs = copyProject("update");
    const updated = await cli(theirs, undefined, "build", "--json", "--update", "app");
    expect(updated.status, updated.stderr).toBe(0);
    const report = JSON.parse(updated.stdout) as BuildReport;
    expect(report.images.map((r) => [r.name, r.status])).toEqual([["bb", "baked"], ["app", "baked"]]);
    expect(report.images.map((r) => r.key)).toEqual(dry.images.map((r) => r.key));
    expect(report.lock?.pins).toEqual([{ ref, platform: expect.stringMatching(/^linux\//), digest: digestB, change: "moved", before: digestA }]);
    expect(readFileSync(join(theirs, "supermachine.lock"), "utf8")).toBe(lockText(digestB));
    // Its VMs run the new content: the variant's image config sets VARIANT.
    const variant = await cli(theirs, undefined, "run", "bb", "--", "sh", "-c", "echo $VARIANT");
    expect(variant.stdout).toBe("b\n");

    // Here, after a pull of their lockfile: the key moved, and why says it was the pin.
    cpSync(join(theirs, "supermachine.lock"), join(project, "supermachine.lock"));
    const why = await json<{ cached: boolean; changes: { input: string; before: unknown; after: unknown }[] }>(cli(project, undefined, "why", "bb", "--json"));
    expect(why.cached).toBe(false);
    expect(why.changes).toEqual([{ input: `lock:${ref}`, before: digestA, after: digestB }]);
    const child = await json<{ changes: { input: string }[] }>(cli(project, undefined, "why", "app", "--json"));
    expect(child.changes.map((c) => c.input)).toEqual([`lock:${ref}`, "parent"]);
    const plain = await cli(project, undefined, "why", "bb");
    expect(plain.stdout).toContain(`  lock:${ref}: ${digestA.slice(0, 19)} → ${digestB.slice(0, 19)}\n`);
    // The keys here are now theirs, without a bake.
    const ls = await json<{ images: { name: string; key: string }[] }>(cli(project, undefined, "ls", "--json"));
    expect(ls.images.map((r) => r.key)).toEqual(report.images.map((r) => r.key));
  }, 600_000);

  it("--frozen refuses a tag the lockfile does not pin, naming the ref, the image and the file", async () => {
    const copy = copyProject("frozen", false);
    const r = await cli(copy, undefined, "build", "--frozen", "--json");
    expect(r.status).toBe(1);
    const { error } = JSON.parse(r.stdout) as { error: { code: string; message: string; hint: string } };
    expect(error.code).toBe("BUILD_FROZEN_UNPINNED");
    expect(error.message).toContain(`${join(copy, "supermachine.lock")} does not pin "${ref}" (image bb, linux/`);
    expect(error.hint).toContain("supermachine build --update bb");
    // loadPools({ frozen: true }) as well, before anything is resolved or baked.
    await inHome(freshHome("frozen"), async () => {
      await expect(loadPools({ cwd: copy, frozen: true })).rejects.toMatchObject({ code: "BUILD_FROZEN_UNPINNED", message: expect.stringContaining(ref) });
    });
    const plain = await cli(copy, undefined, "build", "--frozen");
    expect(plain.stderr).toContain(`does not pin "${ref}"`);
    expect(plain.stderr).toContain("hint: pin it with a build that may resolve tags (supermachine build --update bb)");
  }, 600_000);

  it("refuses a damaged lockfile by name, and --update with --frozen", async () => {
    const copy = copyProject("damaged");
    const file = join(copy, "supermachine.lock");
    writeFileSync(file, readFileSync(file, "utf8").replace(/"digest": "sha256:[0-9a-f]{8}/, '"digest": "sha256:zz'));
    const r = await cli(copy, undefined, "build", "--json");
    expect(r.status).toBe(1);
    const { error } = JSON.parse(r.stdout) as { error: { code: string; message: string; hint: string } };
    expect(error.code).toBe("CONFIG_LOCK_INVALID");
    expect(error.message).toContain(`lockfile ${file}: pins[0] (${ref}, linux/`);
    expect(error.message).toContain("digest must be sha256:<64 hex digits>");
    expect(error.hint).toContain("supermachine build --update");

    const both = await cli(project, undefined, "build", "--frozen", "--update");
    expect(both.status).toBe(2);
    expect(both.stderr).toContain("--update and --frozen cannot be combined");
  }, 120_000);
});
