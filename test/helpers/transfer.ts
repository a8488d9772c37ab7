// Snapshots made without a VM, for the transfer tests that need no boot: a sparse RAM file with
// some random chunks, a device state, an image store entry, meta.json keyed by its inputs.
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, openSync, closeSync, writeSync, ftruncateSync, copyFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { engineFingerprint } from "../../src/engine/fingerprint.js";
import { keyOf, type SnapshotInputs } from "../../src/schema/key.js";
import { homePaths } from "../../src/paths.js";
import { loadSnapshot, sealSnapshot, SNAPSHOT_FILES, type LoadedSnapshot } from "../../src/store/snapshots.js";
import { generateSigningKey, readSigningKey } from "../../src/transfer/sign.js";

/** A signing key for the tests' exports, and the trust setting that accepts what it signed. */
const pair = generateSigningKey();
export const SIGNING = readSigningKey(pair.privatePem, "the tests' signing key");
export const TRUST = [SIGNING.publicKey];
/** Options for exports (signed) and imports (trusting that key). */
export const signed = { signingKey: SIGNING } as const;
export const trusted = { trust: TRUST } as const;

export const CHUNK = 16 * 1024;
const temps: string[] = [];
export function tempDir(prefix: string): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  temps.push(d);
  return d;
}
export function cleanup(): void {
  for (const d of temps.splice(0)) rmSync(d, { recursive: true, force: true });
}

/** Runs `fn` with SUPERMACHINE_HOME set to `home`. */
export async function inHome<T>(home: string, fn: () => Promise<T>): Promise<T> {
  const saved = process.env.SUPERMACHINE_HOME;
  process.env.SUPERMACHINE_HOME = home;
  try {
    return await fn();
  } finally {
    if (saved === undefined) delete process.env.SUPERMACHINE_HOME;
    else process.env.SUPERMACHINE_HOME = saved;
  }
}

export interface FakeImage {
  digest: string;
  rootfs: string;
  size: number;
}

/** An image store entry in the current home: a "squashfs" of random chunks and a hole. */
export function fakeImage(seed = randomBytes(32).toString("hex")): FakeImage {
  const digest = `sha256:${seed.padEnd(64, "0").slice(0, 64)}`;
  const dir = join(homePaths().images, digest.slice(7));
  mkdirSync(dir, { recursive: true });
  const rootfs = join(dir, "rootfs.sqfs");
  const size = 40 * CHUNK + 1000; // a short last chunk
  const fd = openSync(rootfs, "w");
  ftruncateSync(fd, size);
  for (let i = 0; i < 41; i++) if (i % 5 !== 3) writeSync(fd, randomBytes(i === 40 ? 1000 : CHUNK), 0, i === 40 ? 1000 : CHUNK, i * CHUNK);
  closeSync(fd);
  writeFileSync(join(dir, "image.json"), JSON.stringify({ version: 1, ref: "fake:image", manifestDigest: digest, config: {}, sizeBytes: size, created: new Date().toISOString() }, null, 2) + "\n");
  return { digest, rootfs, size };
}

export interface FakeOptions {
  name: string;
  image: FakeImage;
  parent?: LoadedSnapshot;
  /** Chunks (by index) the child rewrites, or the parent fills. */
  chunks: number[];
  snapshotsDir?: string;
  ramMib?: number;
}

/** A snapshot in `snapshotsDir` (default the home's), sealed as a bake seals one. */
export async function fakeSnapshot(o: FakeOptions): Promise<LoadedSnapshot> {
  const ramMib = o.ramMib ?? 64;
  const inputs: SnapshotInputs = {
    parent: o.parent?.meta.hash ?? null,
    manifestDigest: o.parent ? null : o.image.digest,
    memoryMib: ramMib,
    vcpus: 1,
    env: {},
    cmd: null,
    guestPort: 0,
    listenerRequired: false,
    warmup: true,
    warmupTag: `${o.name}-${randomBytes(4).toString("hex")}`,
    extraFiles: [],
    module: null,
    engine: engineFingerprint(),
  };
  const key = keyOf(inputs);
  const snapshotsDir = o.snapshotsDir ?? homePaths().snapshots;
  const dir = join(snapshotsDir, `${o.name}-${key.slice(0, 16)}`);
  mkdirSync(dir, { recursive: true });
  const ram = join(dir, SNAPSHOT_FILES.ram);
  if (o.parent) copyFileSync(o.parent.ram, ram);
  const fd = openSync(ram, o.parent ? "r+" : "w");
  if (!o.parent) ftruncateSync(fd, ramMib * 1024 * 1024);
  if (o.chunks.some((i) => (i + 1) * CHUNK > ramMib * 1024 * 1024)) throw new Error(`fakeSnapshot ${o.name}: a chunk beyond its ${ramMib} MiB`);
  for (const i of o.chunks) {
    // Half random, half a repeated pattern: compressible like real pages.
    const b = Buffer.alloc(CHUNK, i % 7);
    randomBytes(CHUNK / 2).copy(b);
    writeSync(fd, b, 0, CHUNK, i * CHUNK);
  }
  // The same page twice (a duplicate chunk within one file).
  if (!o.parent) {
    const same = Buffer.alloc(CHUNK, 0x42);
    writeSync(fd, same, 0, CHUNK, 3000 * CHUNK);
    writeSync(fd, same, 0, CHUNK, 3001 * CHUNK);
  }
  closeSync(fd);
  writeFileSync(join(dir, SNAPSHOT_FILES.state), randomBytes(30_000));
  writeFileSync(join(dir, SNAPSHOT_FILES.log), "fake\n");
  await sealSnapshot(
    dir,
    {
      hash: key,
      inputs,
      sources: { name: o.name, ref: "fake:image", module: null, files: {} },
      image: { ref: "fake:image", digest: o.image.digest, config: {} as never, rootfs: o.image.rootfs, rootfsSize: o.image.size },
      memoryMib: ramMib,
      vcpus: 1,
      workload: null,
      workloadRunning: false,
      created: new Date().toISOString(),
      bakeMs: 1,
    },
    o.name,
  );
  return (await loadSnapshot(dir, key))!;
}

/** Every entry under `dir` whose name marks a temp or a lock. */
export function leftovers(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    let names: string[];
    try {
      names = readdirSync(d);
    } catch {
      return;
    }
    for (const n of names) {
      if (n.includes(".tmp-") || n.endsWith(".lock")) out.push(join(d, n));
      else walk(join(d, n));
    }
  };
  walk(dir);
  return out;
}
