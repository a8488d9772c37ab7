/**
 * Baking: boot an image once, make it ready (agent, extraFiles, warmup, workload listener),
 * capture it as a snapshot and publish that in the store; the booted VM then goes on running for
 * the image's first pool (warm handoff). The snapshot's key covers every input (see key.ts), so a
 * build whose inputs were baked already boots nothing.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { MicroVm } from "../engine/qemu.js";
import type { Accel } from "../engine/accel.js";
import { BakeError, ImageError } from "../errors.js";
import type { ExecDefaults } from "../session/env.js";
import { logger } from "../debug.js";
import type { BakeProgress, BakeStep } from "../schema/image.js";
import type { WarmupVm } from "../schema/calls.js";
import type { ResolvedNetwork } from "../schema/network.js";
import { publishSnapshot, SNAPSHOT_FILES, sealSnapshot, type LoadedSnapshot, type SnapshotMeta, type WorkloadSpec } from "../store/snapshots.js";
import type { SnapshotInputs, SnapshotSources } from "../schema/key.js";
import { holderInfo } from "../store/lock.js";
import type { RamSums } from "../store/ram-sums.js";
import { BakeLog } from "./bake-log.js";
import { stageExtraFiles, type PlannedFile } from "./extra-files.js";
import { detachForHandoff, sparseCopy } from "./handoff.js";
import { runWarmup } from "./warmup.js";
import { startWorkload, waitListening } from "./workload.js";

const log = logger("bake");

export interface BakeRequest {
  dir: string;
  hash: string;
  inputs: SnapshotInputs;
  /** What explains the key (kept in meta.json for `why`). */
  sources?: SnapshotSources | undefined;
  /** Bake on this snapshot (an image built `from` another) instead of booting the image. */
  parent?: LoadedSnapshot | undefined;
  /** Bake even when a snapshot with this key exists. */
  force?: boolean | undefined;
  /** Keep the baked VM running for a pool (warm handoff; default true). `build` has no pool. */
  handoff?: boolean | undefined;
  image: SnapshotMeta["image"];
  memoryMib: number;
  vcpus: number;
  bootTimeoutMs?: number;
  workload: WorkloadSpec | null;
  /** Start the workload at bake and capture once it listens on `guestPort`. */
  listenerRequired: boolean;
  guestPort: number;
  /** How processes run in the guest (for the warmup). */
  defaults: ExecDefaults;
  /** The build env's values (the inputs have their hashes); kept in the snapshot's env.json. */
  buildEnv: Record<string, string>;
  extraFiles: PlannedFile[];
  warmup: ((vm: WarmupVm) => Promise<void>) | undefined;
  /** What the warmup may reach through the egress proxy ("none": nothing). */
  network: ResolvedNetwork | "none";
  onProgress?: ((p: BakeProgress) => void) | undefined;
  signal?: AbortSignal | undefined;
}

/**
 * The VM ran under another accelerator than the key assumed (a KVM boot fell back to TCG):
 * the snapshot belongs under another key. The caller recomputes it and bakes again.
 */
export class AccelMismatch extends Error {
  constructor(readonly actual: Accel) {
    super(`the bake VM ran under ${actual}`);
  }
}

export interface BakeResult {
  snapshot: LoadedSnapshot;
  baked: boolean;
  /** The baked VM, still running, for the image's first pool. */
  handoff?: MicroVm;
}

/**
 * Returns the snapshot in `req.dir` when it matches `req.hash`, and otherwise bakes it and
 * publishes it there. Damaged snapshots are replaced.
 */
export async function ensureBaked(req: BakeRequest): Promise<BakeResult> {
  let handoff: MicroVm | undefined;
  const progress = (p: BakeProgress) => req.onProgress?.(p);
  try {
    const { snapshot, created } = await publishSnapshot(
      req.dir,
      req.hash,
      req.inputs,
      async (tmp) => {
        const r = await bakeInto(tmp, req);
        handoff = r.handoff;
        return r.meta;
      },
      {
        onWait: (w) => {
          const holder = holderInfo(w);
          progress({ phase: "bake-waiting-for-lock", snapshot: req.dir, ...(holder ? { holder } : {}) });
        },
        onDamaged: (reason, quarantine) => {
          log("snapshot %s was damaged (%s): quarantined at %s, rebaking", req.dir, reason, quarantine);
          progress({ phase: "bake-damaged", snapshot: req.dir, reason, quarantine });
        },
        ...(req.signal ? { signal: req.signal } : {}),
        ...(req.force ? { force: true } : {}),
      },
    );
    if (!created) {
      progress({ phase: "bake-cached", snapshot: req.dir });
      return { snapshot, baked: false };
    }
    progress({ phase: "bake-done", snapshot: req.dir, durationMs: snapshot.meta.bakeMs });
    return { snapshot, baked: true, ...(handoff ? { handoff } : {}) };
  } catch (err) {
    // Published nothing (or failed after the bake): the baked VM must not outlive it.
    await handoff?.kill();
    throw err;
  }
}

async function bakeInto(tmp: string, req: BakeRequest): Promise<{ meta: SnapshotMeta; handoff: MicroVm | undefined }> {
  const t0 = performance.now();
  const bakeLog = new BakeLog();
  const name = req.dir.split("/").pop() ?? "snapshot";
  let kept: string | undefined;
  const keepLog = () => (kept ??= bakeLog.keep(name));
  const step = (s: BakeStep) => {
    bakeLog.line(`step: ${s}`);
    req.onProgress?.({ phase: "bake", step: s, snapshot: req.dir });
  };
  bakeLog.line(`baking ${req.image.ref} (${req.image.digest}) into ${req.dir}; key ${req.hash}`);
  step("boot");
  const ram = join(tmp, SNAPSHOT_FILES.ram);
  if (req.parent) {
    // A child starts as a copy of its parent: the parent's RAM (sparse, so only its written
    // pages are copied) becomes this snapshot's RAM file, and the VM restores the parent's
    // device state on it, writing to it from then on.
    bakeLog.line(`on the snapshot of its parent: ${req.parent.dir} (key ${req.parent.meta.hash})`);
    await sparseCopy(req.parent.ram, ram);
  }
  const vm = await MicroVm.launch({
    rootfs: req.image.rootfs,
    memoryMib: req.memoryMib,
    vcpus: req.vcpus,
    memoryFile: { path: ram, shared: true },
    ...(req.parent ? { incomingState: req.parent.state, capturedBy: { engine: req.parent.meta.inputs.engine, what: `the snapshot of its parent ${req.parent.dir}` } } : {}),
    ...(req.bootTimeoutMs ? { bootTimeoutMs: req.bootTimeoutMs } : {}),
  }).catch((err: unknown) => {
    bakeLog.line(`boot failed: ${(err as Error).message}`);
    keepLog();
    throw err;
  });
  bakeLog.line(`booted in ${vm.bootMs.toFixed(0)} ms (accel ${vm.accel}, agent ${vm.hello.agentVersion}, QEMU pid ${vm.pid})`);
  let handoff: MicroVm | undefined;
  let ramSums: RamSums | undefined;
  try {
    if (vm.accel !== req.inputs.engine.accel) throw new AccelMismatch(vm.accel);
    req.signal?.throwIfAborted();
    // A parent's snapshot is warm already.
    if (!req.parent) await warmGuest(vm, req.image.config.env);
    if (req.extraFiles.length) {
      step("extra-files");
      await stageExtraFiles(vm.agent, req.extraFiles, (l) => bakeLog.line(l));
    }
    if (req.warmup) {
      step("warmup");
      await runWarmup(vm, req.defaults, req.warmup, bakeLog, req.image.ref, keepLog, req.network);
    }
    req.signal?.throwIfAborted();
    if (req.listenerRequired && !req.parent) {
      step("listener");
      if (!req.workload) {
        throw new ImageError("IMAGE_NO_WORKLOAD", `${req.image.ref}: listenerRequired needs a workload, and the image has no ENTRYPOINT or CMD`, {
          hint: "pass cmd: [...] to Image.build",
        });
      }
      const pid = await startWorkload(vm, req.workload);
      bakeLog.line(`workload started (guest pid ${pid}): ${req.workload.argv.join(" ")}`);
      await waitListening(vm, req.guestPort, req.bootTimeoutMs ?? 60_000, req.image.ref, req.signal);
      bakeLog.line(`workload listens on port ${req.guestPort}`);
    }
    step("capture");
    const { durationMs } = await vm.capture(join(tmp, SNAPSHOT_FILES.state));
    bakeLog.line(`captured in ${durationMs.toFixed(0)} ms`);
    if (req.handoff !== false) {
      step("handoff");
      const detached = await detachForHandoff(vm, join(tmp, SNAPSHOT_FILES.ram));
      handoff = detached?.vm;
      ramSums = detached?.sums;
      bakeLog.line(handoff ? "the baked VM goes on running for the first pool" : "no warm handoff");
    }
  } catch (err) {
    if (!(err instanceof AccelMismatch)) {
      bakeLog.line(`bake failed: ${(err as Error).message}`);
      if (!(err instanceof BakeError && err.code === "BAKE_WARMUP_FAILED")) {
        const path = keepLog();
        log("bake of %s failed; bake log kept at %s", req.image.ref, path);
      }
    }
    throw err;
  } finally {
    if (!handoff) await vm.kill();
  }
  try {
    const bakeMs = Math.round(performance.now() - t0);
    bakeLog.line(`done in ${bakeMs} ms`);
    await writeFile(join(tmp, SNAPSHOT_FILES.log), bakeLog.text());
    const meta = await sealSnapshot(
      tmp,
      {
        hash: req.hash,
        inputs: req.inputs,
        ...(req.sources ? { sources: req.sources } : {}),
        image: req.image,
        memoryMib: req.memoryMib,
        vcpus: req.vcpus,
        workload: req.workload,
        workloadRunning: req.listenerRequired,
        created: new Date().toISOString(),
        bakeMs,
        buildEnv: req.buildEnv,
      },
      req.image.ref,
      ramSums ? { ramSums } : {},
    );
    log("baked %s in %d ms", req.image.ref, meta.bakeMs);
    return { meta, handoff };
  } catch (err) {
    await handoff?.kill();
    throw err;
  }
}

/**
 * Runs the image's shell once before the capture, so that the snapshot's page cache already
 * holds the shell, the C library and the loader: a restored VM's first exec then reads nothing
 * from its (compressed) root disk. Images without a shell just skip it.
 */
async function warmGuest(vm: MicroVm, imageEnv: string[]): Promise<void> {
  const env = imageEnv.some((e) => e.startsWith("PATH=")) ? imageEnv : [...imageEnv, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"];
  for (const argv of [["sh", "-c", "true"], ["true"]]) {
    try {
      await vm.agent.exec({ argv, env, timeoutMs: 10_000 }).wait();
    } catch (err) {
      log("warm-up %s: %s", argv.join(" "), (err as Error).message);
    }
  }
}
