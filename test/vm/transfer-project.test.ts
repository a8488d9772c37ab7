// A 3-image project (test/fixtures/cache-project) through the CLI and loadPools, on real VMs:
// baked once, exported to a directory and to a registry on loopback, imported into EMPTY homes
// (only the built-in image's source layout there, as setup leaves it; no root filesystem), where
// build --frozen then finds everything cached and run restores from the imported snapshots.
import { createHash } from "node:crypto";
import { spawn } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadPools } from "../../src/index.js";
import { homePaths } from "../../src/paths.js";
import { generateSigningKey } from "../../src/transfer/sign.js";
import { configOf, entryOf, manifestOf, readIndex, type FileIndexJson } from "../helpers/transfer-format.js";
import { startRegistry, type Registry } from "../helpers/registry.js";
import { inHome } from "../helpers/transfer.js";

const root = join(import.meta.dirname, "..", "..");
const fixture = join(root, "test", "fixtures", "cache-project");
const work = mkdtempSync(join(tmpdir(), "sm-cache-project-"));
const sharedHome = homePaths().home;
/** The project's cache signing key (every copy of the project holds it and trusts it). */
const signing = generateSigningKey();
let reg: Registry;
let project: string;
let cacheDir: string;

interface Row {
  name: string;
  key: string;
  status: string;
}
interface Entry {
  name: string;
  key: string;
  status: string;
  chunks: number;
  chunksMoved: number;
  bytesMoved: number;
}

interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/**
 * The CLI in a child process, asynchronously: the registry's log pipe is read by this process,
 * which must keep running its event loop while the CLI talks to the registry.
 */
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

/** A project copy without snapshots. */
function copyProject(name: string): string {
  const dir = join(work, name);
  cpSync(fixture, dir, { recursive: true });
  rmSync(join(dir, ".snapshots"), { recursive: true, force: true });
  writeFileSync(join(dir, "cache.key"), signing.privatePem, { mode: 0o600 });
  writeFileSync(join(dir, "cache.pub"), signing.publicKey + "\n");
  return dir;
}

/** A home with nothing but the built-in image's source layout (what setup builds), no root filesystem. */
function emptyHome(name: string): string {
  const home = join(work, `home-${name}`);
  mkdirSync(join(home, "builtin"), { recursive: true });
  cpSync(join(sharedHome, "builtin", "busybox"), join(home, "builtin", "busybox"), { recursive: true });
  return home;
}

const imageJsonOf = (home: string) => {
  const dirs = readdirSync(join(home, "images")).filter((n) => /^[0-9a-f]{64}$/.test(n));
  return Object.fromEntries(dirs.map((d) => [d, readFileSync(join(home, "images", d, "image.json"), "utf8")]));
};

let baked: Row[];

beforeAll(async () => {
  reg = await startRegistry("plain");
  project = copyProject("a");
  baked = (await json<{ images: Row[] }>(cli(project, undefined, "build", "--json"))).images;
  cacheDir = join(work, "cache");
}, 900_000);

afterAll(async () => {
  await reg?.stop();
  rmSync(work, { recursive: true, force: true });
});

/** Imports into an empty home, then: frozen build all cached, and run reads what the warmup wrote. */
async function roundTrip(src: string, name: string): Promise<void> {
  const home = emptyHome(name);
  const copy = copyProject(name);
  const imported = await json<{ snapshots: Entry[] }>(cli(copy, home, "cache", "import", "--json", src));
  expect(imported.snapshots.map((s) => [s.name, s.status]).sort()).toEqual([["app", "imported"], ["base", "imported"], ["tool", "imported"]]);
  // The root filesystem came from the artifact: the exporter's image.json, but for the facts this
  // machine records of its root filesystem (sha256 and mtime, as when built here).
  const mine = imageJsonOf(home);
  const theirs = imageJsonOf(sharedHome);
  expect(Object.keys(mine)).toHaveLength(1);
  const [digest] = Object.keys(mine);
  const { sha256, rootfsMtimeNs: _mine, ...importedMeta } = JSON.parse(mine[digest!]!) as Record<string, unknown>;
  const { sha256: _s, rootfsMtimeNs: _theirs, ...exportedMeta } = JSON.parse(theirs[digest!]!) as Record<string, unknown>;
  expect(importedMeta).toEqual(exportedMeta);
  expect(sha256).toBe(createHash("sha256").update(readFileSync(join(home, "images", digest!, "rootfs.sqfs"))).digest("hex"));
  const frozen = await json<{ images: Row[] }>(cli(copy, home, "build", "--frozen", "--json"));
  expect(frozen.images.map((r) => r.status)).toEqual(["cached", "cached", "cached"]);
  expect(Object.fromEntries(frozen.images.map((r) => [r.name, r.key]))).toEqual(Object.fromEntries(baked.map((r) => [r.name, r.key])));
  const run = await cli(copy, home, "run", "app", "--", "cat", "/srv/base", "/srv/app");
  expect(run.stderr).toBe("");
  expect(run.stdout).toBe("base\nhello from app\n");
  expect(run.status).toBe(0);
  // Present now: a second import moves nothing.
  const again = await json<{ snapshots: Entry[]; bytesMoved: number }>(cli(copy, home, "cache", "import", "--json", src));
  expect(again.snapshots.map((s) => s.status)).toEqual(["present", "present", "present"]);
  expect(again.bytesMoved).toBe(0);
}

describe("a project's snapshots through a cache", () => {
  it("bakes the project once", () => {
    expect(baked.map((r) => r.status)).toEqual(["baked", "baked", "baked"]);
  });

  it("round-trips through a directory into an empty home", async () => {
    const r = await json<{ snapshots: Entry[] }>(cli(project, undefined, "cache", "export", "--json", cacheDir));
    expect(r.snapshots.map((s) => [s.name, s.status])).toEqual([["base", "exported"], ["app", "exported"], ["tool", "exported"]]);
    await roundTrip(cacheDir, "dir");
  }, 600_000);

  it("stores a parent's chunks once: a child adds only what its warmup changed, in a small manifest", () => {
    const keyOfName = (name: string) => readIndex(cacheDir).manifests.find((m) => m.annotations["dev.supermachine.name"] === name)!.annotations["dev.supermachine.key"]!;
    // Distinct frames (by pack and offset) and their compressed bytes.
    const frames = (ix: FileIndexJson, keep: (pack: string) => boolean) => {
      const seen = new Map<string, number>();
      for (const [, p, at, size] of ix.chunks) if (keep(ix.packs[p]!)) seen.set(`${p}:${at}`, size);
      return { n: seen.size, bytes: [...seen.values()].reduce((a, b) => a + b, 0) };
    };
    const base = configOf(cacheDir, keyOfName("base")).ram;
    const app = configOf(cacheDir, keyOfName("app")).ram;
    const baseManifest = manifestOf(cacheDir, keyOfName("base"));
    const inBase = new Set(baseManifest.layers.map((l) => l.digest));
    const parentFrames = frames(base, () => true);
    const fresh = frames(app, (p) => !inBase.has(p));
    const ratio = fresh.bytes / parentFrames.bytes;
    process.stderr.write(`child's new RAM chunks: ${fresh.n} (${(ratio * 100).toFixed(1)}% of the parent's compressed chunk bytes)\n`);
    expect(ratio).toBeLessThan(0.1);
    // A few layers and a few KiB of manifest, not a layer per chunk.
    for (const n of ["base", "app", "tool"]) {
      const e = entryOf(cacheDir, keyOfName(n));
      expect(e.size).toBeLessThan(64 * 1024);
      expect(manifestOf(cacheDir, keyOfName(n)).layers.length).toBeLessThan(12);
    }
  });

  it("exports nothing the second time", async () => {
    const r = await json<{ snapshots: Entry[]; chunksMoved: number; bytesMoved: number }>(cli(project, undefined, "cache", "export", "--json", cacheDir));
    expect(r.snapshots.map((s) => s.status)).toEqual(["present", "present", "present"]);
    expect(r.chunksMoved).toBe(0);
    expect(r.bytesMoved).toBe(0);
  });

  it("round-trips through a registry on loopback", async () => {
    const repo = `${reg.host}/sm/project`;
    const first = await json<{ snapshots: Entry[] }>(cli(project, undefined, "cache", "export", "--json", repo));
    expect(first.snapshots.map((s) => s.status)).toEqual(["exported", "exported", "exported"]);
    // The child pushed a small fraction of what its parent did.
    const [base, app] = first.snapshots;
    // Sharing nothing, it would push about as much (100%). The bench's child_push_bytes /
    // parent_push_bytes holds the 10% target; a restore now also dirties a few pages for the VM's
    // identity and exec cgroups (9.2% before them, 9.9% since), so this allows some noise.
    expect(app!.bytesMoved).toBeLessThan(base!.bytesMoved * 0.12);
    const second = await json<{ chunksMoved: number }>(cli(project, undefined, "cache", "export", "--json", repo));
    expect(second.chunksMoved).toBe(0);
    const plain = await cli(project, undefined, "cache", "export", repo);
    expect(plain.stdout).toMatch(/^base {2}[0-9a-f]{16} {2}present/m);
    await roundTrip(repo, "registry");
  }, 600_000);

  it("imports instead of baking with build --cache-from, and loadPools({ frozen, cacheFrom }) serves pools", async () => {
    const home = emptyHome("cache-from");
    const copy = copyProject("cache-from");
    const rows = (await json<{ images: Row[] }>(cli(copy, home, "build", "--json", "--cache-from", cacheDir))).images;
    expect(rows.map((r) => [r.name, r.status])).toEqual([["base", "imported"], ["app", "imported"], ["tool", "imported"]]);

    const home2 = emptyHome("pools");
    const copy2 = copyProject("pools");
    await inHome(home2, async () => {
      const pools = await loadPools({ cwd: copy2, frozen: true, cacheFrom: cacheDir });
      try {
        const vm = await pools.app!.acquire();
        expect((await vm.exec({ argv: ["cat", "/srv/app"] })).stdout.toString()).toBe("hello from app\n");
        await vm.release();
      } finally {
        await pools.close();
      }
    });
  }, 600_000);

  it("bakes what it cannot import with build --cache-from, warning why; --frozen fails naming the cause", async () => {
    // A copy of the cache whose child "app" has a corrupted pack of its own.
    const broken = join(work, "broken-cache");
    cpSync(cacheDir, broken, { recursive: true });
    const keyOfName = (name: string) => readIndex(broken).manifests.find((m) => m.annotations["dev.supermachine.name"] === name)!.annotations["dev.supermachine.key"]!;
    const inBase = new Set(manifestOf(broken, keyOfName("base")).layers.map((l) => l.digest));
    const own = manifestOf(broken, keyOfName("app")).layers.find((l) => l.mediaType === "application/vnd.supermachine.pack.v2" && !inBase.has(l.digest))!;
    const path = join(broken, "blobs", "sha256", own.digest.slice(7));
    const bytes = readFileSync(path);
    bytes[bytes.length >> 1]! ^= 0xff;
    writeFileSync(path, bytes);

    const frozen = await cli(copyProject("broken-frozen"), emptyHome("broken-frozen"), "build", "--json", "--frozen", "--cache-from", broken);
    expect(frozen.status).toBe(1);
    const failedRow = (JSON.parse(frozen.stdout) as { images: (Row & { error?: { code: string; message: string } })[] }).images.find((r) => r.name === "app")!;
    expect(failedRow).toMatchObject({ status: "failed", error: { code: expect.stringMatching(/^CACHE_(CHUNK_CORRUPT|DIGEST_MISMATCH)$/), message: expect.stringContaining("snapshot app") } });

    const r = await cli(copyProject("broken"), emptyHome("broken"), "build", "--json", "--cache-from", broken);
    expect(r.status, r.stderr).toBe(0);
    const rows = (JSON.parse(r.stdout) as { images: (Row & { cacheError?: { code: string; message: string } })[] }).images;
    expect(rows.map((x) => [x.name, x.status])).toEqual([["base", "imported"], ["app", "baked"], ["tool", "imported"]]);
    expect(rows.find((x) => x.name === "app")!.cacheError).toMatchObject({ code: expect.stringMatching(/^CACHE_/), message: expect.stringContaining("snapshot app") });
    const plain = await cli(copyProject("broken-plain"), emptyHome("broken-plain"), "build", "--cache-from", broken);
    expect(plain.stderr).toMatch(/warning: app was baked: the cache's copy was not imported: .*snapshot app/);
  }, 900_000);
});
