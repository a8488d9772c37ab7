/**
 * From a validated build and a resolved image to a baked snapshot: the snapshot's inputs (its
 * key) and the bake itself. The key is computed from what the engine reports (QEMU, kernel,
 * agent, accelerator); if the bake VM ran under another accelerator than predicted (a KVM boot
 * fell back to TCG), the key is recomputed from the accelerator actually used.
 */
import { join } from "node:path";
import { engineFingerprint, type EngineFingerprint } from "../engine/fingerprint.js";
import { execDefaults } from "../guest/env.js";
import type { ResolvedImage } from "../image/store.js";
import { logger } from "../log.js";
import { homePaths } from "../paths.js";
import type { BakeProgress } from "../spec/image.js";
import type { ResolvedBuild } from "../spec/options.js";
import { inputHash, type SnapshotInputs, type WorkloadSpec } from "../store/snapshots.js";
import { AccelMismatch, ensureBaked, type BakeResult } from "./bake.js";
import { planExtraFiles, type PlannedFile } from "./extra-files.js";

const log = logger("bake");

export function snapshotInputs(b: ResolvedBuild, image: ResolvedImage, workload: WorkloadSpec | null, extra: PlannedFile[], engine: EngineFingerprint): SnapshotInputs {
  return {
    manifestDigest: image.manifestDigest,
    memoryMib: b.memoryMib,
    vcpus: b.vcpus,
    env: b.env,
    cmd: workload ? workload.argv : null,
    guestPort: b.guestPort,
    listenerRequired: b.listenerRequired,
    warmup: b.warmup !== undefined,
    warmupTag: b.warmupTag,
    extraFiles: extra.map((f) => ({ guestPath: f.guestPath, mode: f.mode, sha256: f.sha256 })),
    engine,
  };
}

export async function bakeBuild(b: ResolvedBuild, image: ResolvedImage, opts: { onProgress?: (p: BakeProgress) => void; signal?: AbortSignal } = {}): Promise<BakeResult> {
  const extra = await planExtraFiles(b.extraFiles);
  const defaults = execDefaults(image.config, b.env);
  const argv = b.cmd ?? [...(image.config.entrypoint ?? []), ...(image.config.cmd ?? [])];
  const workload: WorkloadSpec | null = argv.length ? { argv, env: defaults.env, cwd: defaults.workingDir ?? "/", user: defaults.user } : null;
  for (let attempt = 0; ; attempt++) {
    const inputs = snapshotInputs(b, image, workload, extra, engineFingerprint());
    const hash = inputHash(inputs);
    const dir = join(b.snapshotsDir ?? homePaths().snapshots, b.name ?? `img-${hash.slice(0, 16)}`);
    try {
      return await ensureBaked({
        dir,
        hash,
        inputs,
        image: { ref: b.ref, digest: image.manifestDigest, config: image.config, rootfs: image.rootfsPath, rootfsSize: image.sizeBytes },
        memoryMib: b.memoryMib,
        vcpus: b.vcpus,
        workload,
        listenerRequired: b.listenerRequired,
        guestPort: b.guestPort,
        defaults,
        extraFiles: extra,
        warmup: b.warmup,
        onProgress: opts.onProgress,
        signal: opts.signal,
      });
    } catch (err) {
      if (err instanceof AccelMismatch && attempt === 0) {
        log("the bake VM ran under %s, not %s: keying the snapshot by the accelerator used", err.actual, inputs.engine.accel);
        continue;
      }
      throw err;
    }
  }
}
