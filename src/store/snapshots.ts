/**
 * Baked snapshots on disk: `<snapshotsDir>/<name>/{ram,state,meta.json,bake.log}`. Data only:
 * the format, its verification, publication and listing. Baking lives in `src/bake/`.
 *
 * `ram` is the guest memory (the file the bake VM's RAM lived in; restores map it copy-on-write),
 * `state` the device state QEMU migration wrote, `meta.json` what the snapshot was made from,
 * `bake.log` what the bake did (warmup output included). The input hash covers everything that
 * changes the snapshot, and the inputs themselves are kept beside it, so that a rebake can say
 * what changed.
 *
 * The build `env` is not in meta.json in clear: its inputs hold a salted sha256 per variable
 * (`hashEnv`), so the key still covers every value and `why` still names the variable that
 * changed; the values a VM needs (exec defaults, the workload's environment) are in `env.json`,
 * 0600 like every file here, loaded into `meta.buildEnv` and checked against those hashes.
 */
import { createHash, randomBytes } from "node:crypto";
import { statSync } from "node:fs";
import { readdir, readFile, rename, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { EngineError, ImageError } from "../errors.js";
import { explainDiff, hashEnvValue, stableJson, type SnapshotInputs, type SnapshotSources } from "../schema/key.js";
import type { ImageConfig } from "../schema/image.js";
import { logger } from "../debug.js";
import { fsyncPath, writeFileSynced } from "./durable.js";
import { computeRamSums, encodeRamSums, RAM_SUMS_FILE, readRamSums, recordOf, verifyRam, type RamSums, type RamSumsRecord } from "./ram-sums.js";
import { publish, type LockWait } from "./publish.js";
import { quarantine, quarantineLocked } from "./quarantine.js";

const log = logger("snapshots");
/**
 * 4: RAM checksums per chunk (`ram.sums`), the RAM file's mtime, a checksum of meta.json itself,
 * and the build env's values only in `env.json` (meta.json keeps salted hashes).
 */
export const META_VERSION = 4;
export const SNAPSHOT_FILES = { ram: "ram", state: "state", meta: "meta.json", log: "bake.log", env: "env.json", sums: RAM_SUMS_FILE } as const;

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
  /** `rootfsSha256`: the root filesystem's sha256 its image store entry recorded when this was made. */
  image: { ref: string; digest: string; config: ImageConfig; rootfs: string; rootfsSize: number; rootfsSha256?: string };
  memoryMib: number;
  vcpus: number;
  files: {
    /** `mtimeNs`: the RAM file's mtime when sealed; when it differs, loading verifies the RAM against `sums`. */
    ram: { size: number; mtimeNs: string; sums: RamSumsRecord };
    state: { size: number; sha256: string };
  };
  /** The workload to run in every VM, and whether it already runs in the snapshot. */
  workload: WorkloadSpec | null;
  workloadRunning: boolean;
  created: string;
  bakeMs: number;
  /**
   * The build env's values (in memory only: meta.json has their hashes in `inputs.env`, and the
   * workload's environment with those values replaced by their hashes; env.json has the values).
   */
  buildEnv?: Record<string, string>;
  /** sha256 of the stable JSON of everything else in meta.json: an edit or a flipped bit shows. */
  checksum: string;
}

export interface LoadedSnapshot {
  dir: string;
  ram: string;
  state: string;
  meta: SnapshotMeta;
}

const isHashedEnv = (env: Record<string, string>) => Object.values(env).every((v) => /^sha256:[0-9a-f]{64}$/.test(v));

/** A workload environment (`K=V` list) with the build env's values replaced by their hashes. */
function redactWorkloadEnv(list: string[], names: Record<string, string>): string[] {
  return list.map((kv) => {
    const i = kv.indexOf("=");
    const k = i > 0 ? kv.slice(0, i) : kv;
    return i > 0 && k in names ? `${k}=${hashEnvValue(k, kv.slice(i + 1))}` : kv;
  });
}

/** env.json: the values meta.json keeps only hashes of. */
interface EnvFile {
  version: 1;
  env: Record<string, string>;
  /** The workload's environment, unredacted (null: no workload). */
  workloadEnv: string[] | null;
}

/** meta.json as written: without the build env's values. */
function persistedMeta(meta: SnapshotMeta): { meta: SnapshotMeta; envFile: EnvFile | undefined } {
  const { buildEnv, ...rest } = meta;
  const names = rest.inputs.env;
  if (Object.keys(names).length === 0 || !isHashedEnv(names)) return { meta: rest, envFile: undefined };
  const env = buildEnv ?? {};
  for (const [k, h] of Object.entries(names)) {
    if (env[k] === undefined || hashEnvValue(k, env[k]) !== h) {
      throw new EngineError("ENGINE_SNAPSHOT_ENV", `the value of the build env variable ${k} does not match the snapshot's key`);
    }
  }
  return {
    meta: { ...rest, workload: rest.workload ? { ...rest.workload, env: redactWorkloadEnv(rest.workload.env, names) } : null },
    envFile: { version: 1, env: Object.fromEntries(Object.keys(names).map((k) => [k, env[k]!])), workloadEnv: rest.workload?.env ?? null },
  };
}

/** Puts the values of env.json back into a meta.json read from `dir`; throws `damaged` when they do not match. */
async function hydrateEnv(dir: string, meta: SnapshotMeta): Promise<SnapshotMeta> {
  const names = meta.inputs.env ?? {};
  if (Object.keys(names).length === 0) return { ...meta, buildEnv: {} };
  // Made before the values were hashed: they are in the inputs.
  if (!isHashedEnv(names)) return { ...meta, buildEnv: names };
  let file: EnvFile;
  try {
    file = JSON.parse(await readFile(join(dir, SNAPSHOT_FILES.env), "utf8")) as EnvFile;
  } catch (err) {
    throw damaged(dir, `its ${SNAPSHOT_FILES.env} (the build env's values) cannot be read: ${(err as Error).message}`);
  }
  const env = file?.env ?? {};
  for (const [k, h] of Object.entries(names)) {
    if (typeof env[k] !== "string" || hashEnvValue(k, env[k]) !== h) throw damaged(dir, `its ${SNAPSHOT_FILES.env} has another value for ${k} than its key`);
  }
  let workload = meta.workload;
  if (workload) {
    const clear = file.workloadEnv;
    if (!Array.isArray(clear) || stableJson(redactWorkloadEnv(clear, names)) !== stableJson(workload.env)) {
      throw damaged(dir, `its ${SNAPSHOT_FILES.env} does not match the workload's environment`);
    }
    workload = { ...workload, env: clear };
  }
  return { ...meta, workload, buildEnv: Object.fromEntries(Object.keys(names).map((k) => [k, env[k]!])) };
}

function paths(dir: string): Omit<LoadedSnapshot, "meta"> {
  return { dir, ram: join(dir, SNAPSHOT_FILES.ram), state: join(dir, SNAPSHOT_FILES.state) };
}

/** The checksum meta.json carries of itself. */
export function metaChecksum(meta: Omit<SnapshotMeta, "checksum"> & { checksum?: string }): string {
  const { checksum: _c, ...rest } = meta;
  return createHash("sha256").update(stableJson(rest)).digest("hex");
}

export interface LoadOptions {
  /**
   * How much of the RAM to check: "fast" (default) reads it only when its mtime differs from the
   * one recorded at capture (it was written since); "full" always compares every chunk with its
   * checksum (about 0.1 s for a 256 MiB guest).
   */
  verify?: "fast" | "full";
}

/**
 * Reads and verifies a snapshot directory: metadata (and its checksum), the device state's
 * checksum, the RAM file's size (and, when it was written since the capture or with `verify:
 * "full"`, every chunk against its checksum) and the root filesystem it was made on. Resolves
 * undefined when there is none or when `hash` is given and differs; throws ImageError
 * SNAPSHOT_DAMAGED when it is present but damaged.
 */
export async function loadSnapshot(dir: string, hash?: string, inputs?: SnapshotInputs, opts: LoadOptions = {}): Promise<LoadedSnapshot | undefined> {
  let meta: SnapshotMeta;
  try {
    meta = JSON.parse(await readFile(join(dir, SNAPSHOT_FILES.meta), "utf8")) as SnapshotMeta;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw damaged(dir, `its ${SNAPSHOT_FILES.meta} cannot be read: ${(err as Error).message}`);
  }
  if (!meta || typeof meta !== "object" || meta.version !== META_VERSION || typeof meta.hash !== "string") {
    if (hash !== undefined) {
      log("snapshot %s has format version %s (this version writes %d); rebaking", dir, String(meta?.version), META_VERSION);
      return undefined;
    }
    throw damaged(dir, `its metadata has format version ${String(meta?.version)}; this version of supermachine reads ${META_VERSION}`);
  }
  if (typeof meta.checksum !== "string" || metaChecksum(meta) !== meta.checksum) throw damaged(dir, `its ${SNAPSHOT_FILES.meta} does not match its checksum (edited or damaged)`);
  if (hash !== undefined && meta.hash !== hash) {
    log("snapshot %s was made from other inputs (%s); rebaking", dir, explainDiff(inputs, meta.inputs));
    return undefined;
  }
  const p = paths(dir);
  const ram = await stat(p.ram, { bigint: true }).catch(() => undefined);
  if (!ram || Number(ram.size) !== meta.files.ram.size) throw damaged(dir, `its RAM file is ${!ram ? "missing" : `${ram.size} bytes`}, expected ${meta.files.ram.size}`);
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
  // The root filesystem it was made on must be there, the same: the guest's page cache in the
  // snapshot holds its blocks. One that was rebuilt (even at the same size) makes the snapshot
  // stale: rebaked when a key is given, refused otherwise.
  const rootfsSize = await stat(meta.image.rootfs).then((s) => s.size, () => -1);
  const nowSha = meta.image.rootfsSha256 ? await rootfsDigest(meta.image.rootfs) : undefined;
  const rootfsChanged =
    rootfsSize !== meta.image.rootfsSize
      ? `is ${rootfsSize < 0 ? "gone" : "different"}`
      : nowSha !== undefined && nowSha !== meta.image.rootfsSha256
        ? `was rebuilt since (sha256 ${nowSha.slice(0, 12)}…, it was made on ${meta.image.rootfsSha256!.slice(0, 12)}…)`
        : undefined;
  if (rootfsChanged) {
    if (hash !== undefined) {
      log("snapshot %s: the root filesystem it was made on (%s) %s; rebaking", dir, meta.image.rootfs, rootfsChanged);
      return undefined;
    }
    throw damaged(dir, `the root filesystem it was made on (${meta.image.rootfs}) ${rootfsChanged}`);
  }
  const written = String(ram.mtimeNs) !== meta.files.ram.mtimeNs;
  if (opts.verify === "full" || written) {
    if (written) log("the RAM file of snapshot %s was modified after its capture: verifying it", dir);
    const t0 = performance.now();
    const sums = await readRamSums(join(dir, SNAPSHOT_FILES.sums), meta.files.ram.sums);
    if (typeof sums === "string") throw damaged(dir, sums);
    const bad = await verifyRam(p.ram, sums);
    if (bad) throw damaged(dir, bad + (written ? " (the file was modified after the capture)" : ""));
    log("verified the RAM of snapshot %s in %d ms", dir, Math.round(performance.now() - t0));
  }
  return { ...p, meta: await hydrateEnv(dir, meta) };
}

/**
 * The sha256 the image store's entry records for the root filesystem at `rootfs` (its
 * `image.json` beside it; see src/image/store.ts), or undefined when it records none.
 */
export async function rootfsDigest(rootfs: string): Promise<string | undefined> {
  try {
    const m = JSON.parse(await readFile(join(dirname(rootfs), "image.json"), "utf8")) as { sha256?: unknown };
    return typeof m.sha256 === "string" ? m.sha256 : undefined;
  } catch {
    return undefined;
  }
}

function damaged(dir: string, why: string): ImageError {
  return new ImageError("SNAPSHOT_DAMAGED", `snapshot ${dir} is damaged: ${why}`, {
    hint: "Image.build rebakes it; Image.fromSnapshot cannot: bake it again",
  });
}

/** Whether `err` says a snapshot is damaged (its reason is in the message). */
export const isDamaged = (err: unknown): err is ImageError => err instanceof ImageError && err.code === "SNAPSHOT_DAMAGED";

/** Why a SNAPSHOT_DAMAGED error says the snapshot is damaged (its message without "snapshot <dir> is damaged: "). */
export const damageReason = (err: ImageError): string => err.message.replace(/^snapshot .* is damaged: /s, "");

/**
 * Finishes a snapshot directory whose `ram` and `state` are written: checksums the RAM per chunk
 * (`ram.sums`; or takes `ramSums` already known, e.g. from an imported chunk index), checks and
 * fsyncs the files, writes `meta.json` (everything but the file facts comes from `meta`) and
 * returns the meta.
 */
export async function sealSnapshot(dir: string, meta: Omit<SnapshotMeta, "version" | "files" | "checksum">, what: string, opts: { ramSums?: RamSums } = {}): Promise<SnapshotMeta> {
  const p = paths(dir);
  const stateBytes = await readFile(p.state);
  if (stateBytes.length === 0) throw new EngineError("ENGINE_SNAPSHOT_EMPTY", `snapshot of ${what}: QEMU wrote no device state`);
  const ramSize = statSync(p.ram).size;
  const t0 = performance.now();
  const sums = opts.ramSums ?? (await computeRamSums(p.ram, ramSize));
  if (!opts.ramSums) log("RAM checksums of %s: %d chunks in %d ms", what, sums.chunks.size, Math.round(performance.now() - t0));
  if (sums.size !== ramSize) throw new EngineError("ENGINE_SNAPSHOT_INVALID", `snapshot of ${what}: its RAM checksums cover ${sums.size} bytes, the file has ${ramSize}`);
  const encoded = encodeRamSums(sums);
  await writeFileSynced(join(dir, SNAPSHOT_FILES.sums), encoded);
  await fsyncPath(p.ram);
  await fsyncPath(p.state);
  const { checksum: _old, ...given } = meta as typeof meta & { checksum?: string };
  const unsealed: Omit<SnapshotMeta, "checksum"> = {
    version: META_VERSION,
    ...given,
    files: {
      ram: { size: ramSize, mtimeNs: String((await stat(p.ram, { bigint: true })).mtimeNs), sums: recordOf(encoded, sums) },
      state: { size: stateBytes.length, sha256: createHash("sha256").update(stateBytes).digest("hex") },
    },
  };
  const { meta: persisted, envFile } = persistedMeta(unsealed as SnapshotMeta);
  if (envFile) await writeFileSynced(join(dir, SNAPSHOT_FILES.env), JSON.stringify(envFile, null, 2) + "\n");
  // As it reads back: properties holding undefined are dropped, so the checksum matches on load.
  const { checksum: _c, ...normalized } = JSON.parse(JSON.stringify(persisted)) as SnapshotMeta;
  const checksum = metaChecksum(normalized);
  await writeFileSynced(join(dir, SNAPSHOT_FILES.meta), JSON.stringify({ ...normalized, checksum }, null, 2) + "\n");
  const { buildEnv: _b, ...clear } = unsealed as SnapshotMeta;
  return { ...clear, checksum, buildEnv: envFile?.env ?? (isHashedEnv(unsealed.inputs.env) ? {} : unsealed.inputs.env) };
}

/**
 * Returns the snapshot at `dir` when it matches `hash`; otherwise has `write` fill a fresh
 * directory and publishes it there atomically (lock, temp, fsync, rename). A damaged snapshot
 * is moved into the quarantine (`onDamaged` says why and where) and replaced.
 */
export async function publishSnapshot(
  dir: string,
  hash: string,
  inputs: SnapshotInputs | undefined,
  write: (tmp: string) => Promise<SnapshotMeta>,
  opts: { onWait?: (w: LockWait) => void; onDamaged?: (reason: string, quarantined: string) => void; signal?: AbortSignal; force?: boolean } = {},
): Promise<{ snapshot: LoadedSnapshot; created: boolean }> {
  let damage: string | undefined;
  // force: a snapshot with this key is made again (and replaces the one there).
  const check = async () =>
    opts.force ? undefined : loadSnapshot(dir, hash, inputs).catch((err: unknown) => {
      log("%s", (err as Error).message);
      if (isDamaged(err)) damage = damageReason(err);
      return undefined;
    });
  const r = await publish<LoadedSnapshot>({
    target: dir,
    kind: "dir",
    what: `snapshot ${dir}`,
    check,
    write: async (tmp) => ({ ...paths(dir), meta: await write(tmp) }),
    // A damaged snapshot is kept for inspection, never used again; one merely outdated goes.
    moveAside: async (target) => {
      if (damage === undefined) {
        const aside = `${target}.tmp-${randomBytes(6).toString("hex")}`;
        await rename(target, aside);
        await rm(aside, { recursive: true, force: true });
        return;
      }
      const q = await quarantine(target, damage);
      opts.onDamaged?.(damage, q);
    },
    ...(opts.onWait ? { onWait: opts.onWait } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
  });
  return { snapshot: r.value, created: r.created };
}

/**
 * Checks every byte of the snapshot at `dir` (metadata, state, RAM chunk by chunk, root
 * filesystem size). Resolves `{ ok: true }`, or why it is damaged (`missing` when there is none).
 */
export async function verifySnapshot(dir: string): Promise<{ ok: true; snapshot: LoadedSnapshot } | { ok: false; reason: string; missing?: true }> {
  try {
    const snapshot = await loadSnapshot(dir, undefined, undefined, { verify: "full" });
    return snapshot ? { ok: true, snapshot } : { ok: false, reason: "there is no snapshot there (no meta.json)", missing: true };
  } catch (err) {
    if (isDamaged(err)) return { ok: false, reason: damageReason(err) };
    throw err;
  }
}

/**
 * Moves a snapshot found damaged into the quarantine, under its publish lock, unless another
 * process replaced it meanwhile (a good snapshot is there now). Resolves where it went.
 */
export async function quarantineSnapshot(dir: string, reason: string): Promise<string | undefined> {
  return quarantineLocked(dir, reason, async () => !(await verifySnapshot(dir)).ok);
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
