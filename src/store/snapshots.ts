/**
 * Baked snapshots on disk: `<snapshotsDir>/<name>/{ram,state,meta.json}`.
 *
 * `ram` is the guest memory (a file the bake VM's RAM lived in; restores map it copy-on-write),
 * `state` the device state QEMU migration wrote, `meta.json` what the snapshot was made from.
 * Its input hash covers everything that changes the snapshot, and the inputs themselves are
 * kept beside it, so that a rebake can say what changed.
 *
 * A snapshot directory appears only by renaming a complete, fsynced temp directory; bakes of one
 * directory take turns under a file lock, and the second one reuses the first one's result.
 */
import { createHash, randomBytes } from "node:crypto";
import { existsSync, readdirSync, statSync } from "node:fs";
import { mkdir, open, readFile, rename, rm, stat } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import lockfile from "proper-lockfile";
import { EngineError, ImageError } from "../errors.js";
import { logger } from "../log.js";
import { fsyncPath, writeFileSynced } from "./durable.js";
import { MicroVm } from "../engine/qemu.js";
import type { ImageConfig } from "../image/oci-layout.js";
import { resolveImageUser } from "../runtime/vm.js";

const log = logger("snapshots");
const META_VERSION = 1;
export const SNAPSHOT_FILES = { ram: "ram", state: "state", meta: "meta.json" } as const;

/** Everything a snapshot depends on. Changing any of it makes a different snapshot. */
export interface SnapshotInputs {
  manifestDigest: string;
  memoryMib: number;
  vcpus: number;
  env: Record<string, string>;
  cmd: string[] | null;
  guestPort: number;
  listenerRequired: boolean;
  warmupTag: string;
  extraFiles: { guestPath: string; sha256: string }[];
  engine: { qemu: string; accel: string; kernelKey: string; agentKey: string; agentVersion: string };
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

export function inputHash(inputs: SnapshotInputs): string {
  return createHash("sha256").update(stableJson(inputs)).digest("hex");
}

/** JSON with sorted keys, so that the hash does not depend on property order. */
function stableJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(stableJson).join(",")}]`;
  if (v && typeof v === "object") {
    return `{${Object.keys(v)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${stableJson((v as Record<string, unknown>)[k])}`)
      .join(",")}}`;
  }
  return JSON.stringify(v);
}

export interface LoadedSnapshot {
  dir: string;
  ram: string;
  state: string;
  meta: SnapshotMeta;
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
  if (meta.version !== META_VERSION || typeof meta.hash !== "string") throw damaged(dir, "its metadata has an unknown format");
  if (hash !== undefined && meta.hash !== hash) {
    log("snapshot %s was made from other inputs (%s); rebaking", dir, explainDiff(inputs, meta.inputs));
    return undefined;
  }
  const ram = join(dir, SNAPSHOT_FILES.ram);
  const state = join(dir, SNAPSHOT_FILES.state);
  const ramSize = await stat(ram).then((s) => s.size, () => -1);
  if (ramSize !== meta.files.ram.size) throw damaged(dir, `its RAM file is ${ramSize < 0 ? "missing" : `${ramSize} bytes`}, expected ${meta.files.ram.size}`);
  let stateBytes: Buffer;
  try {
    stateBytes = await readFile(state);
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
  return { dir, ram, state, meta };
}

function damaged(dir: string, why: string): ImageError {
  return new ImageError("SNAPSHOT_DAMAGED", `snapshot ${dir} is damaged: ${why}`, {
    hint: "Image.build rebakes it; Image.fromSnapshot cannot: bake it again",
  });
}

/** Which inputs differ (for logs: why a cached snapshot was not used). */
export function explainDiff(a: SnapshotInputs | undefined, b: SnapshotInputs | undefined): string {
  if (!a || !b) return "inputs changed";
  const keys = Object.keys(a) as (keyof SnapshotInputs)[];
  const changed = keys.filter((k) => stableJson(a[k]) !== stableJson(b[k]));
  return changed.length ? `changed: ${changed.join(", ")}` : "no input changed";
}

export interface BakeRequest {
  dir: string;
  hash: string;
  inputs: SnapshotInputs;
  image: SnapshotMeta["image"];
  memoryMib: number;
  vcpus: number;
  bootTimeoutMs?: number;
  workload: WorkloadSpec | null;
  /** Start the workload at bake and capture once it listens on `guestPort`. */
  listenerRequired: boolean;
  guestPort: number;
}

/**
 * Returns the snapshot in `dir` when it matches `hash`, and otherwise boots the image, captures
 * it and installs the snapshot there. Damaged snapshots are replaced.
 */
export async function ensureSnapshot(req: BakeRequest): Promise<{ snapshot: LoadedSnapshot; baked: boolean; handoff?: MicroVm }> {
  const existing = await loadSnapshot(req.dir, req.hash, req.inputs).catch((err: unknown) => {
    log("%s", (err as Error).message);
    return undefined;
  });
  if (existing) return { snapshot: existing, baked: false };
  const parent = dirname(req.dir);
  await mkdir(parent, { recursive: true });
  const release = await lockfile.lock(req.dir, {
    realpath: false,
    lockfilePath: `${req.dir}.lock`,
    stale: 30_000,
    update: 5_000,
    retries: { retries: 600, factor: 1.2, minTimeout: 20, maxTimeout: 500 },
  });
  try {
    const raced = await loadSnapshot(req.dir, req.hash).catch(() => undefined);
    if (raced) return { snapshot: raced, baked: false };
    await removeTemps(req.dir);
    const tmp = `${req.dir}.tmp-${randomBytes(6).toString("hex")}`;
    await mkdir(tmp);
    try {
      const { meta, handoff } = await bakeInto(tmp, req);
      await rm(req.dir, { recursive: true, force: true });
      await rename(tmp, req.dir);
      await fsyncPath(parent);
      const snapshot = { dir: req.dir, ram: join(req.dir, SNAPSHOT_FILES.ram), state: join(req.dir, SNAPSHOT_FILES.state), meta };
      return { snapshot, baked: true, ...(handoff ? { handoff } : {}) };
    } catch (err) {
      await rm(tmp, { recursive: true, force: true });
      throw err;
    }
  } finally {
    await release().catch(() => {});
  }
}

async function bakeInto(tmp: string, req: BakeRequest): Promise<{ meta: SnapshotMeta; handoff: MicroVm | undefined }> {
  const t0 = performance.now();
  const ram = join(tmp, SNAPSHOT_FILES.ram);
  const state = join(tmp, SNAPSHOT_FILES.state);
  const vm = await MicroVm.launch({
    rootfs: req.image.rootfs,
    memoryMib: req.memoryMib,
    vcpus: req.vcpus,
    memoryFile: { path: ram, shared: true },
    ...(req.bootTimeoutMs ? { bootTimeoutMs: req.bootTimeoutMs } : {}),
  });
  let handoff: MicroVm | undefined;
  try {
    await warmGuest(vm, req.image.config);
    if (req.listenerRequired) {
      if (!req.workload) {
        throw new ImageError("IMAGE_NO_WORKLOAD", `${req.image.ref}: listenerRequired needs a workload, and the image has no ENTRYPOINT or CMD`, {
          hint: "pass cmd: [...] to Image.build",
        });
      }
      await startWorkload(vm, req.workload);
      await waitListening(vm, req.guestPort, req.bootTimeoutMs ?? 60_000, req.image.ref);
    }
    await vm.snapshot(state);
    handoff = await detachForHandoff(vm, ram);
  } finally {
    if (!handoff) await vm.kill();
  }
  try {
    return { meta: await finishBake(tmp, req, t0), handoff };
  } catch (err) {
    await handoff?.kill();
    throw err;
  }
}

async function finishBake(tmp: string, req: BakeRequest, t0: number): Promise<SnapshotMeta> {
  const ram = join(tmp, SNAPSHOT_FILES.ram);
  const state = join(tmp, SNAPSHOT_FILES.state);
  const stateBytes = await readFile(state);
  if (stateBytes.length === 0) throw new EngineError("ENGINE_SNAPSHOT_EMPTY", `snapshot of ${req.image.ref}: QEMU wrote no device state`);
  await fsyncPath(ram);
  await fsyncPath(state);
  const meta: SnapshotMeta = {
    version: META_VERSION,
    hash: req.hash,
    inputs: req.inputs,
    image: req.image,
    memoryMib: req.memoryMib,
    vcpus: req.vcpus,
    files: {
      ram: { size: statSync(ram).size },
      state: { size: stateBytes.length, sha256: createHash("sha256").update(stateBytes).digest("hex") },
    },
    workload: req.workload,
    workloadRunning: req.listenerRequired,
    created: new Date().toISOString(),
    bakeMs: Math.round(performance.now() - t0),
  };
  await writeFileSynced(join(tmp, SNAPSHOT_FILES.meta), JSON.stringify(meta, null, 2) + "\n");
  await fsyncPath(tmp);
  log("baked %s in %d ms", req.image.ref, meta.bakeMs);
  return meta;
}

/**
 * Warm handoff: the baked VM goes on running, for the first VM a pool of this image needs.
 * Its RAM lives in the snapshot's RAM file, which it would keep writing to; so the paused VM
 * keeps that file (renamed away, then unlinked: its mapping stays) and the snapshot gets a
 * sparse copy made while the VM cannot change it. The resumed VM then gets a HELLO of its own:
 * the host's clock and fresh entropy, as every restored VM does. Failing that, no handoff.
 */
async function detachForHandoff(vm: MicroVm, ram: string): Promise<MicroVm | undefined> {
  const live = `${ram}.live`;
  try {
    await rename(ram, live);
    await sparseCopy(live, ram);
    await rm(live, { force: true });
    await vm.qmp.execute("cont");
    await vm.agent.hello({ entropy: randomBytes(64), timeoutMs: 10_000 });
    return vm;
  } catch (err) {
    log("no warm handoff: %s", (err as Error).message);
    if (existsSync(live)) {
      await rm(ram, { force: true });
      await rename(live, ram);
    }
    return undefined;
  }
}

/** Copies `from` to `to`, leaving holes where `from` has all-zero blocks. */
async function sparseCopy(from: string, to: string): Promise<void> {
  const block = ZERO_BLOCK.length;
  const src = await open(from, "r");
  const dst = await open(to, "wx");
  try {
    const size = (await src.stat()).size;
    const buf = Buffer.allocUnsafe(block);
    for (let off = 0; off < size; off += block) {
      const { bytesRead } = await src.read(buf, 0, Math.min(block, size - off), off);
      const chunk = buf.subarray(0, bytesRead);
      if (!isZero(chunk)) await dst.write(chunk, 0, bytesRead, off);
    }
    await dst.truncate(size);
  } finally {
    await src.close();
    await dst.close();
  }
}

const ZERO_BLOCK = Buffer.alloc(1 << 20);
/** memcmp against a zero block: far cheaper than a loop in JavaScript. */
function isZero(b: Buffer): boolean {
  return b.length === ZERO_BLOCK.length ? b.equals(ZERO_BLOCK) : b.equals(ZERO_BLOCK.subarray(0, b.length));
}

/**
 * Runs the image's shell once before the capture, so that the snapshot's page cache already
 * holds the shell, the C library and the loader: a restored VM's first exec then reads nothing
 * from its (compressed) root disk. Images without a shell just skip it.
 */
async function warmGuest(vm: MicroVm, config: ImageConfig): Promise<void> {
  const env = config.env.some((e) => e.startsWith("PATH=")) ? config.env : [...config.env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"];
  for (const argv of [["sh", "-c", "true"], ["true"]]) {
    try {
      await vm.agent.exec({ argv, env, timeoutMs: 10_000 }).wait();
    } catch (err) {
      log("warm-up %s: %s", argv.join(" "), (err as Error).message);
    }
  }
}

/**
 * Captures a running VM (whose RAM is private, as in every restored VM) into a new snapshot
 * directory. Its RAM is not in any file, so the capture goes in two steps: a full migration
 * stream (RAM included) is written while the VM is paused, and the VM resumes; then a helper
 * QEMU loads that stream into a shared RAM file and is captured the usual way, RAM staying in
 * the file. The helper and the full stream are gone afterwards.
 */
export async function captureRunning(vm: MicroVm, destDir: string, origin: SnapshotMeta): Promise<LoadedSnapshot> {
  const t0 = performance.now();
  await mkdir(dirname(destDir), { recursive: true });
  const tmp = `${destDir}.tmp-${randomBytes(6).toString("hex")}`;
  await mkdir(tmp);
  try {
    const full = join(tmp, "full-stream");
    try {
      await vm.snapshot(full, { includeRam: true });
    } finally {
      await vm.qmp.execute("cont").catch((e: Error) => log("resuming VM %d: %s", vm.pid, e.message));
    }
    const helper = await MicroVm.launch({
      rootfs: origin.image.rootfs,
      memoryMib: origin.memoryMib,
      vcpus: origin.vcpus,
      memoryFile: { path: join(tmp, SNAPSHOT_FILES.ram), shared: true },
      incomingState: full,
      incomingHasRam: true,
    });
    try {
      await helper.snapshot(join(tmp, SNAPSHOT_FILES.state));
    } finally {
      await helper.kill();
    }
    await rm(full, { force: true });
    const stateBytes = await readFile(join(tmp, SNAPSHOT_FILES.state));
    await fsyncPath(join(tmp, SNAPSHOT_FILES.ram));
    await fsyncPath(join(tmp, SNAPSHOT_FILES.state));
    const meta: SnapshotMeta = {
      ...origin,
      // Not reproducible from inputs: a capture of one VM at one moment.
      hash: `capture-${randomBytes(16).toString("hex")}`,
      files: {
        ram: { size: statSync(join(tmp, SNAPSHOT_FILES.ram)).size },
        state: { size: stateBytes.length, sha256: createHash("sha256").update(stateBytes).digest("hex") },
      },
      // Whatever the VM was running is running in the capture.
      workloadRunning: origin.workload !== null,
      created: new Date().toISOString(),
      bakeMs: Math.round(performance.now() - t0),
    };
    await writeFileSynced(join(tmp, SNAPSHOT_FILES.meta), JSON.stringify(meta, null, 2) + "\n");
    await fsyncPath(tmp);
    await rm(destDir, { recursive: true, force: true });
    await rename(tmp, destDir);
    await fsyncPath(dirname(destDir));
    return { dir: destDir, ram: join(destDir, SNAPSHOT_FILES.ram), state: join(destDir, SNAPSHOT_FILES.state), meta };
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}

/** Starts the workload in `vm` (the user is resolved against the guest's own files). */
export async function startWorkload(vm: MicroVm, w: WorkloadSpec): Promise<number> {
  const ids = w.user ? await resolveImageUser(vm.agent, w.user) : undefined;
  return vm.agent.startWorkload({ argv: w.argv, env: w.env, cwd: w.cwd, ...ids });
}

/** Polls the guest's TCP tables until something listens on `port`. */
async function waitListening(vm: MicroVm, port: number, timeoutMs: number, ref: string): Promise<void> {
  const hex = `:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  const end = performance.now() + timeoutMs;
  for (;;) {
    for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
      const text = (await vm.agent.readFile(table, 1 << 20).catch(() => Buffer.alloc(0))).toString();
      // Columns: sl local_address rem_address st ...; st 0A is LISTEN.
      if (text.split("\n").some((l) => l.trim().split(/\s+/)[1]?.endsWith(hex) && l.trim().split(/\s+/)[3] === "0A")) return;
    }
    if (performance.now() > end) {
      throw new ImageError("IMAGE_LISTENER_TIMEOUT", `${ref}: the workload did not listen on port ${port} within ${timeoutMs} ms`, {
        hint: "check guestPort, and the workload's output in the guest console log (DEBUG=supermachine:*)",
      });
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Removes temp directories of `dir` left by crashed bakes (the caller holds the lock). */
async function removeTemps(dir: string): Promise<void> {
  const prefix = `${basename(dir)}.tmp-`;
  const parent = dirname(dir);
  if (!existsSync(parent)) return;
  for (const name of readdirSync(parent)) {
    if (name.startsWith(prefix)) await rm(join(parent, name), { recursive: true, force: true });
  }
}


