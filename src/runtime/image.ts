/**
 * `Image`: an OCI image made ready to serve VMs. `Image.build` resolves the reference (pulling
 * or importing it when needed), flattens it into a cached squashfs, boots it once and captures
 * the booted VM as a snapshot ("bake"). Pools then restore that snapshot for every VM. A build
 * whose inputs were already baked returns without booting anything.
 */
import { resolve as resolvePath } from "node:path";
import { buildNode } from "../bake/node.js";
import { buildImageGraph } from "../graph/graph.js";
import { chooseAccel } from "../engine/accel.js";
import { checkSnapshotHost } from "../engine/identity.js";
import type { AccelChoice } from "../schema/key.js";
import type { MicroVm, VmSpec } from "../engine/qemu.js";
import { BuildError, ImageError, OptionError } from "../errors.js";
import { execDefaults } from "../session/env.js";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";
import type { ImageConfig } from "../schema/image.js";
import { buildSchema, poolSchema, type BuildOptions, type PoolOptions } from "../schema/options.js";
import { mergeLimits } from "../schema/fields.js";
import { parseOptions } from "../schema/parse.js";
import { holdSnapshot } from "../store/leases.js";
import { loadSnapshot, quarantineSnapshot, verifySnapshot, type LoadedSnapshot } from "../store/snapshots.js";
import { clearRestoreFailures, QUARANTINE_AFTER_FAILURES, quarantineFailingSnapshot, recordRestoreFailure } from "../store/restore-failures.js";
import { isRestoreFault } from "../engine/qemu.js";
import { Pool, type PoolHealth } from "./pool.js";

const log = logger("image");
/** How long a baked VM waits for a pool to claim it (warm handoff) before it is stopped. */
const HANDOFF_TTL_MS = 60_000;

/**
 * @internal Bakes the image's snapshot again (after the one there was found damaged and
 * quarantined). `fresh`: bake it, never fetch it from a cache (whose copy is where the bad bytes
 * likely came from).
 */
export type Rebuild = (opts?: { fresh?: boolean }) => Promise<LoadedSnapshot>;

/** @internal After a failed restore: restore from `snapshot` now; `retry`: it is the same one, tried again. */
interface Recovery {
  snapshot: LoadedSnapshot;
  retry: boolean;
}

export class Image {
  /** The VM that was baked, kept running for this image's first pool (warm handoff). */
  private handoff: MicroVm | undefined;
  /** A recovery in progress (pools of this image share it). */
  private recovering: Promise<Recovery | undefined> | undefined;
  /** Failed restores in a row, by snapshot checksum, as this process counted them. */
  private readonly failures = new Map<string, number>();
  /** Set once this image baked its snapshot again because restores of it kept failing. */
  private rebakedForRestore = false;
  /** Whether a successful restore already cleared the failures on record (done once). */
  private failureRecordChecked = false;

  private constructor(
    private snap: LoadedSnapshot,
    handoff?: MicroVm,
    /** How to bake the snapshot again; without it (fromSnapshot) a damaged snapshot is an error. */
    private readonly rebuild?: Rebuild,
  ) {
    if (handoff) {
      this.handoff = handoff;
      // Not kept forever if no pool claims it.
      const t = setTimeout(() => this.takeHandoff()?.kill(), HANDOFF_TTL_MS);
      t.unref();
    }
  }

  /** @internal How the library makes one (users get it from the API, never by `new`). */
  static create(snap: LoadedSnapshot, handoff?: MicroVm, rebuild?: Rebuild): Image {
    return new Image(snap, handoff, rebuild);
  }

  /** @internal Stops the baked VM kept for the first pool, when no pool will take it. */
  async dropHandoff(): Promise<void> {
    await this.takeHandoff()?.kill();
  }

  private takeHandoff(): MicroVm | undefined {
    const h = this.handoff;
    this.handoff = undefined;
    return h;
  }

  /**
   * Resolve `ref`, build its root filesystem and bake its snapshot, each step served from the
   * cache when its inputs are unchanged.
   */
  static async build(options: BuildOptions): Promise<Image> {
    if (options && typeof options === "object" && (options as { ref?: unknown }).ref === undefined) {
      throw new OptionError("OPTION_REF_REQUIRED", "Image.build: `ref` is required (an image reference such as \"builtin:busybox\" or \"oci:./layout:tag\")", {
        hint: "the accepted reference forms are in docs/api.md (Images)",
      });
    }
    const b = parseOptions("Image.build", buildSchema, options);
    // One image is a graph of one node, made ready by the same path as a project's images.
    const name = b.name ?? "image";
    const spec = buildImageGraph([{ name, module: null, from: null, definition: b }]).spec(name);
    const opts = {
      snapshotsDir: b.snapshotsDir ? resolvePath(b.snapshotsDir) : homePaths().snapshots,
      root: process.cwd(),
      dirName: (_spec: unknown, key: string) => b.name ?? `img-${key.slice(0, 16)}`,
      onProgress: b.onProgress,
    };
    const node = await buildNode(spec, undefined, null, opts);
    log("%s: snapshot %s (%s)", b.ref, node.dir, node.status === "baked" ? `baked in ${node.snapshot!.meta.bakeMs} ms` : "cached");
    const rebuild: Rebuild = async () => (await buildNode(spec, undefined, null, { ...opts, handoff: false })).snapshot!;
    return Image.create(node.snapshot!, node.handoff, rebuild);
  }

  /**
   * Opens a snapshot directory made by `Image.build` (or `vm.snapshot`), after verifying it; one
   * made on another host (QEMU, machine type, accelerator, CPU model) is refused here, with
   * SNAPSHOT_HOST_MISMATCH, before any VM starts.
   */
  static async fromSnapshot(path: string): Promise<Image> {
    const snap = await loadSnapshot(path);
    if (!snap) {
      throw new ImageError("SNAPSHOT_NOT_FOUND", `no snapshot at ${path} (no meta.json)`, {
        hint: "pass the directory Image.build baked into: image.snapshotPath",
      });
    }
    checkSnapshotHost(snap.meta.inputs.engine, `snapshot ${path}`);
    return Image.create(snap);
  }

  get ref(): string {
    return this.snap.meta.image.ref;
  }
  /** Manifest digest the image resolved to (`sha256:...`). */
  get digest(): string {
    return this.snap.meta.image.digest;
  }
  /** Parsed image config (Env, Cmd, WorkingDir, User, ...). */
  get config(): ImageConfig {
    return this.snap.meta.image.config;
  }
  get memoryMib(): number {
    return this.snap.meta.memoryMib;
  }
  get vcpus(): number {
    return this.snap.meta.vcpus;
  }
  /** The snapshot directory (`ram`, `state`, `meta.json`). */
  get snapshotPath(): string {
    return this.snap.dir;
  }
  /** Path of the squashfs root filesystem the VMs run on. */
  get rootfsPath(): string {
    return this.snap.meta.image.rootfs;
  }
  /** Hash of everything the snapshot depends on. */
  get inputHash(): string {
    return this.snap.meta.hash;
  }

  /** The accelerator VMs will use, and why. */
  static accel(): AccelChoice {
    return chooseAccel();
  }

  /** @internal How a pool makes a VM: a restore of the snapshot, or a cold boot when the shape differs. */
  vmSpec(memoryMib: number, vcpus: number, timeoutMs: number, snap: LoadedSnapshot = this.snap): VmSpec {
    const base = { rootfs: snap.meta.image.rootfs, memoryMib, vcpus, bootTimeoutMs: timeoutMs };
    if (memoryMib !== snap.meta.memoryMib || vcpus !== snap.meta.vcpus) {
      // A snapshot holds the guest's RAM size and CPU count: another shape needs a boot.
      log("pool shape %d MiB/%d vCPU differs from the snapshot (%d/%d): VMs boot cold", memoryMib, vcpus, snap.meta.memoryMib, snap.meta.vcpus);
      return base;
    }
    return { ...base, memoryFile: { path: snap.ram, shared: false }, incomingState: snap.state, capturedBy: { engine: snap.meta.inputs.engine, what: `snapshot ${snap.dir}` } };
  }

  /**
   * @internal A restore from `from` failed with `err`. Verifies the snapshot (every RAM chunk
   * against its checksum); when it is damaged, moves it into the quarantine and bakes it again.
   * A whole snapshot whose restore QEMU refused (ENGINE_RESTORE_FAILED) has the failure recorded
   * (store/restore-failures.ts): the first is retried, the second in a row quarantines it and
   * bakes it again too. Resolves the snapshot to restore from now, or undefined when the failure
   * has another cause. Throws when it must go and cannot be rebaked (fromSnapshot, a frozen
   * project).
   */
  async recover(from: LoadedSnapshot, err: Error): Promise<Recovery | undefined> {
    if (this.snap !== from) return { snapshot: this.snap, retry: false }; // another pool of this image recovered already
    this.recovering ??= this.recoverOnce(from, err).finally(() => (this.recovering = undefined));
    return this.recovering;
  }

  private async recoverOnce(from: LoadedSnapshot, err: Error): Promise<Recovery | undefined> {
    const dir = from.dir;
    log("restoring %s failed (%s): verifying the snapshot", dir, err.message.split("\n")[0]);
    const v = await verifySnapshot(dir);
    if (v.ok) {
      // Sound. Another process may have replaced it meanwhile: then restore from that one.
      if (v.snapshot.meta.checksum !== from.meta.checksum) {
        this.snap = v.snapshot;
        return { snapshot: v.snapshot, retry: false };
      }
      // Whole, yet QEMU refused what it loaded (or the guest it gave is broken): counted against
      // the snapshot. The first failure is retried; at the second it goes.
      if (!isRestoreFault(err)) return undefined;
      const reason = err.message.split("\n")[0]!;
      const known = (this.failures.get(from.meta.checksum) ?? 0) + 1;
      this.failures.set(from.meta.checksum, known);
      const n = Math.max(known, await recordRestoreFailure(dir, from.meta.checksum, reason));
      if (n < QUARANTINE_AFTER_FAILURES) {
        log("restore %d of %s failed (%s): trying again", n, dir, reason);
        return { snapshot: from, retry: true };
      }
      if (this.rebakedForRestore) {
        // Its own fresh bake fails the same way: the host (QEMU, its kernel) is at fault, not the
        // snapshot. Baking again and again would not help: the error goes to the caller.
        log("the rebaked snapshot %s fails to restore too (%s): not replacing it again", dir, reason);
        return undefined;
      }
      const why = `its restore failed ${n} times in a row; the last time: ${reason}`;
      const next = await this.replace(from, why, err, () => quarantineFailingSnapshot(dir, from.meta.checksum, `restore failed ${n} times in a row: ${reason}`), true);
      this.rebakedForRestore = true;
      return { snapshot: next, retry: false };
    }
    const quarantine = v.missing ? async () => undefined : () => quarantineSnapshot(dir, v.reason);
    return { snapshot: await this.replace(from, v.reason, err, quarantine), retry: false };
  }

  /** The snapshot at `from.dir` is damaged (`reason`): quarantines it and bakes (or fetches) it again. */
  private async replace(from: LoadedSnapshot, reason: string, err: Error, quarantine: () => Promise<string | undefined>, fresh = false): Promise<LoadedSnapshot> {
    const dir = from.dir;
    if (!this.rebuild) {
      throw new ImageError("SNAPSHOT_DAMAGED", `snapshot ${dir} is damaged: ${reason}`, {
        hint: "it was opened with Image.fromSnapshot, which cannot rebake it: bake it again (Image.build) or restore it from a backup",
        cause: err,
      });
    }
    const quarantined = await quarantine();
    const what = `snapshot ${dir} is damaged (${reason})${quarantined ? `; moved to ${quarantined}` : ""}`;
    log("%s; rebaking", what);
    process.emitWarning(`supermachine: ${what}`, { code: "SUPERMACHINE_SNAPSHOT_DAMAGED" });
    let next: LoadedSnapshot;
    try {
      next = await this.rebuild(fresh ? { fresh: true } : {});
    } catch (e) {
      if (e instanceof BuildError && e.code === "BUILD_FROZEN_MISSING") {
        throw new BuildError("BUILD_FROZEN_DAMAGED", `${what}; a frozen build does not rebake it`, {
          hint: "bake it again (supermachine build, or loadPools without frozen), or import it from a cache (cacheFrom)",
          cause: e,
        });
      }
      throw e;
    }
    log("snapshot %s rebaked", next.dir);
    this.snap = next;
    return next;
  }

  /** @internal A restore from `snap` worked: failures on record before it no longer count. */
  restored(snap: LoadedSnapshot): void {
    if (this.failureRecordChecked && !this.failures.has(snap.meta.checksum)) return;
    this.failureRecordChecked = true;
    this.failures.delete(snap.meta.checksum);
    void clearRestoreFailures(snap.dir);
  }

  /** Create a pool and make its first `min` VMs ready. */
  async pool(options: PoolOptions = {}): Promise<Pool> {
    const o = parseOptions("image.pool", poolSchema, options);
    const memoryMib = o.memoryMib ?? this.memoryMib;
    const vcpus = o.vcpus ?? this.vcpus;
    const spec = this.vmSpec(memoryMib, vcpus, o.restoreTimeoutMs);
    // The workload runs in every VM: captured running (listenerRequired) or started after each
    // restore or boot.
    const restored = spec.incomingState !== undefined;
    const workload = this.snap.meta.workload && !(restored && this.snap.meta.workloadRunning) ? this.snap.meta.workload : undefined;
    // While the pool restores from the snapshot, gc and watch mode leave it alone.
    const lease = restored ? holdSnapshot(this.snap.dir) : () => {};
    const limits = mergeLimits(this.snap.meta.inputs.execLimits, o.execLimits);
    // A restore that fails: the image verifies its snapshot and, if damaged, bakes it again.
    let used = this.snap;
    const health: PoolHealth = {
      recover: async (_failed, err) => {
        const r = await this.recover(used, err);
        if (!r) return undefined;
        used = r.snapshot;
        return { spec: this.vmSpec(memoryMib, vcpus, o.restoreTimeoutMs, r.snapshot), origin: r.snapshot.meta, retry: r.retry };
      },
      restored: () => this.restored(used),
    };
    const defaults = execDefaults(this.config, this.snap.meta.buildEnv ?? this.snap.meta.inputs.env, limits);
    const pool = Pool.create(spec, o.user ? { ...defaults, user: o.user } : defaults, o, workload ?? undefined, { meta: this.snap.meta, open: (snap) => Image.create(snap) }, lease, restored ? health : undefined);
    // The baked VM has the snapshot's shape; a pool of another shape cannot use it.
    const handoff = spec.incomingState !== undefined ? this.takeHandoff() : undefined;
    await pool.warm(handoff);
    return pool;
  }
}

