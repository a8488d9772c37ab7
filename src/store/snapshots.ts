/**
 * Baked snapshots on disk: `<snapshotsDir>/<name>/{ram,state,meta.json,bake.log}`. Data only:
 * the format, its verification, publication and listing. Baking lives in `src/bake/`.
 *
 * `ram` is the guest memory (the file the bake VM's RAM lived in; restores map it copy-on-write),
 * `state` the device state QEMU migration wrote, `meta.json` what the snapshot was made from,
 * `bake.log` what the bake did (warmup output included). The input hash covers everything that
 * changes the snapshot, and the inputs themselves are kept beside it, so that a rebake can say
 * what changed.
 */
import { createHash } from "node:crypto";
import { statSync } from "node:fs";
import { readdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { EngineError, ImageError } from "../errors.js";
import type { EngineFingerprint } from "../engine/fingerprint.js";
import type { ImageConfig } from "../spec/image.js";
import { logger } from "../log.js";
import { fsyncPath, writeFileSynced } from "./durable.js";
import { publish } from "./publish.js";

const log = logger("snapshots");
export const META_VERSION = 3;
export const SNAPSHOT_FILES = { ram: "ram", state: "state", meta: "meta.json", log: "bake.log" } as const;

/**
 * Everything a snapshot depends on (its key is their hash). Changing any of it makes a
 * different snapshot. Nothing here depends on the machine, the checkout's path or mtimes,
 * except what the engine is (the accelerator among it).
 */
export interface SnapshotInputs {
  /** The parent snapshot's key (an image built `from` another), or null for a root image. */
  parent: string | null;
  /** A root image's manifest digest (never its tag); null for a child (it is in the parent's key). */
  manifestDigest: string | null;
  memoryMib: number;
  vcpus: number;
  env: Record<string, string>;
  cmd: string[] | null;
  guestPort: number;
  listenerRequired: boolean;
  /** Whether a warmup function runs, and its tag (the function's code is in `module`). */
  warmup: boolean;
  warmupTag: string;
  /** Staged host files: where they go, their mode and the sha256 of their contents. */
  extraFiles: { guestPath: string; mode: number; sha256: string }[];
  /** The declaring module bundled and minified (config projects), or null (the API). */
  module: { sha256: string; packages: Record<string, string> } | null;
  engine: EngineFingerprint;
  /** Limits of every exec (warmup included), when the image sets them. */
  execLimits?: { processes?: number; memoryMib?: number };
}

/**
 * What explains a key but is not part of it: the reference as written (the key has its digest),
 * and the files of the module with their digests (the key has the bundle's). `why` reports from it.
 */
export interface SnapshotSources {
  name: string;
  ref: string;
  /** The declaring module, relative to the project root. */
  module: string | null;
  files: Record<string, string>;
}

/** The image's main process, as the agent runs it (PROTOCOL.md: WORKLOAD_START). */
export interface WorkloadSpec {
  argv: string[];
  env: string[];
  cwd: string;
  /** Image `User`, resolved in the guest. */
  user: string | undefined;
}

export interface SnapshotMeta {
  version: number;
  hash: string;
  inputs: SnapshotInputs;
  sources?: SnapshotSources;
  image: { ref: string; digest: string; config: ImageConfig; rootfs: string; rootfsSize: number };
  memoryMib: number;
  vcpus: number;
  files: { ram: { size: number }; state: { size: number; sha256: string } };
  /** The workload to run in every VM, and whether it already runs in the snapshot. */
  workload: WorkloadSpec | null;
  workloadRunning: boolean;
  created: string;
  bakeMs: number;
}

export interface LoadedSnapshot {
  dir: string;
  ram: string;
  state: string;
  meta: SnapshotMeta;
}

export function inputHash(inputs: SnapshotInputs): string {
  return createHash("sha256").update(stableJson(inputs)).digest("hex");
}

/** JSON with sorted keys, so that the hash does not depend on property order. */
export function stableJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(stableJson).join(",")}]`;
  if (v && typeof v === "object") {
    return `{${Object.keys(v)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${stableJson((v as Record<string, unknown>)[k])}`)
      .join(",")}}`;
  }
  return JSON.stringify(v);
}

/** Which inputs differ (for logs: why a cached snapshot was not used). */
export function explainDiff(a: SnapshotInputs | undefined, b: SnapshotInputs | undefined): string {
  if (!a || !b) return "inputs changed";
  const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])] as (keyof SnapshotInputs)[];
  const changed = keys.filter((k) => stableJson(a[k]) !== stableJson(b[k]));
  return changed.length ? `changed: ${changed.join(", ")}` : "no input changed";
}

function paths(dir: string): Omit<LoadedSnapshot, "meta"> {
  return { dir, ram: join(dir, SNAPSHOT_FILES.ram), state: join(dir, SNAPSHOT_FILES.state) };
}

/**
 * Reads and verifies a snapshot directory: metadata, the device state's checksum, the RAM
 * file's size and the root filesystem it was made on. Resolves undefined when there is none or
 * when `hash` is given and differs; throws ImageError when it is present but damaged.
 */
export async function loadSnapshot(dir: string, hash?: string, inputs?: SnapshotInputs): Promise<LoadedSnapshot | undefined> {
  let meta: SnapshotMeta;
  try {
    meta = JSON.parse(await readFile(join(dir, SNAPSHOT_FILES.meta), "utf8")) as SnapshotMeta;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw damaged(dir, `its ${SNAPSHOT_FILES.meta} cannot be read: ${(err as Error).message}`);
  }
  if (meta.version !== META_VERSION || typeof meta.hash !== "string") {
    if (hash !== undefined) {
      log("snapshot %s has format version %s (this version writes %d); rebaking", dir, String(meta.version), META_VERSION);
      return undefined;
    }
    throw damaged(dir, `its metadata has format version ${String(meta.version)}; this version of supermachine reads ${META_VERSION}`);
  }
  if (hash !== undefined && meta.hash !== hash) {
    log("snapshot %s was made from other inputs (%s); rebaking", dir, explainDiff(inputs, meta.inputs));
    return undefined;
  }
  const p = paths(dir);
  const ramSize = await stat(p.ram).then((s) => s.size, () => -1);
  if (ramSize !== meta.files.ram.size) throw damaged(dir, `its RAM file is ${ramSize < 0 ? "missing" : `${ramSize} bytes`}, expected ${meta.files.ram.size}`);
  let stateBytes: Buffer;
  try {
    stateBytes = await readFile(p.state);
  } catch {
    throw damaged(dir, "its device-state file is missing");
  }
  const sum = createHash("sha256").update(stateBytes).digest("hex");
  if (stateBytes.length !== meta.files.state.size || sum !== meta.files.state.sha256) {
    throw damaged(dir, `its device-state file does not match its checksum (sha256 ${sum.slice(0, 12)}…, expected ${meta.files.state.sha256.slice(0, 12)}…)`);
  }
  const rootfsSize = await stat(meta.image.rootfs).then((s) => s.size, () => -1);
  if (rootfsSize !== meta.image.rootfsSize) {
    throw damaged(dir, `the root filesystem it was made on (${meta.image.rootfs}) is ${rootfsSize < 0 ? "gone" : "different"}`);
  }
  return { ...p, meta };
}

function damaged(dir: string, why: string): ImageError {
  return new ImageError("SNAPSHOT_DAMAGED", `snapshot ${dir} is damaged: ${why}`, {
    hint: "Image.build rebakes it; Image.fromSnapshot cannot: bake it again",
  });
}

/**
 * Finishes a snapshot directory whose `ram` and `state` are written: checks and fsyncs them,
 * writes `meta.json` (everything but the file facts comes from `meta`) and returns the meta.
 */
export async function sealSnapshot(dir: string, meta: Omit<SnapshotMeta, "version" | "files">, what: string): Promise<SnapshotMeta> {
  const p = paths(dir);
  const stateBytes = await readFile(p.state);
  if (stateBytes.length === 0) throw new EngineError("ENGINE_SNAPSHOT_EMPTY", `snapshot of ${what}: QEMU wrote no device state`);
  await fsyncPath(p.ram);
  await fsyncPath(p.state);
  const full: SnapshotMeta = {
    version: META_VERSION,
    ...meta,
    files: {
      ram: { size: statSync(p.ram).size },
      state: { size: stateBytes.length, sha256: createHash("sha256").update(stateBytes).digest("hex") },
    },
  };
  await writeFileSynced(join(dir, SNAPSHOT_FILES.meta), JSON.stringify(full, null, 2) + "\n");
  return full;
}

/**
 * Returns the snapshot at `dir` when it matches `hash`; otherwise has `write` fill a fresh
 * directory and publishes it there atomically (lock, temp, fsync, rename). A damaged snapshot
 * is replaced.
 */
export async function publishSnapshot(
  dir: string,
  hash: string,
  inputs: SnapshotInputs | undefined,
  write: (tmp: string) => Promise<SnapshotMeta>,
  opts: { onWait?: () => void; signal?: AbortSignal; force?: boolean } = {},
): Promise<{ snapshot: LoadedSnapshot; created: boolean }> {
  // force: a snapshot with this key is made again (and replaces the one there).
  const check = async () =>
    opts.force ? undefined : loadSnapshot(dir, hash, inputs).catch((err: unknown) => {
      log("%s", (err as Error).message);
      return undefined;
    });
  const r = await publish<LoadedSnapshot>({
    target: dir,
    kind: "dir",
    what: `snapshot ${dir}`,
    check,
    write: async (tmp) => ({ ...paths(dir), meta: await write(tmp) }),
    ...(opts.onWait ? { onWait: opts.onWait } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
  });
  return { snapshot: r.value, created: r.created };
}

/** Snapshot directories under `snapshotsDir` with their metadata (damaged ones are skipped). */
export async function listSnapshots(snapshotsDir: string): Promise<LoadedSnapshot[]> {
  let names: string[];
  try {
    names = await readdir(snapshotsDir);
  } catch {
    return [];
  }
  const out: LoadedSnapshot[] = [];
  for (const name of names.sort()) {
    if (name.includes(".tmp-") || name.endsWith(".lock")) continue;
    const snap = await loadSnapshot(join(snapshotsDir, name)).catch(() => undefined);
    if (snap) out.push(snap);
  }
  return out;
}

/** The metadata of a snapshot directory, unverified (for reports), or undefined. */
export async function readSnapshotMeta(dir: string): Promise<SnapshotMeta | undefined> {
  try {
    const meta = JSON.parse(await readFile(join(dir, SNAPSHOT_FILES.meta), "utf8")) as SnapshotMeta;
    return meta.version === META_VERSION && typeof meta.hash === "string" ? meta : undefined;
  } catch {
    return undefined;
  }
}

/** Snapshots of the image `name` (by their recorded sources) under `snapshotsDir`, newest first. */
export async function snapshotsOf(snapshotsDir: string, name: string): Promise<{ dir: string; meta: SnapshotMeta }[]> {
  let names: string[];
  try {
    names = await readdir(snapshotsDir);
  } catch {
    return [];
  }
  const out: { dir: string; meta: SnapshotMeta }[] = [];
  for (const n of names) {
    if (!n.startsWith(`${name}-`) || n.includes(".tmp-") || n.endsWith(".lock")) continue;
    const meta = await readSnapshotMeta(join(snapshotsDir, n));
    if (meta?.sources?.name === name) out.push({ dir: join(snapshotsDir, n), meta });
  }
  return out.sort((a, b) => b.meta.created.localeCompare(a.meta.created));
}

/** Bytes a snapshot directory takes on disk (its RAM file is sparse: allocated blocks only). */
export async function diskUsage(dir: string): Promise<number> {
  let total = 0;
  for (const f of Object.values(SNAPSHOT_FILES)) {
    total += await stat(join(dir, f)).then((s) => s.blocks * 512, () => 0);
  }
  return total;
}
