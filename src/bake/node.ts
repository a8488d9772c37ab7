/**
 * One node of an image graph made ready: a root image's reference resolved (pulled and flattened
 * when needed) or a child's parent snapshot found, the node keyed by content (src/graph/keys.ts),
 * and its snapshot found in the store, fetched from a cache, or baked. The project's build walks
 * a graph through this (src/project/build.ts); `Image.build` runs it on a graph of one node.
 */
import { join, relative } from "node:path";
import { logger } from "../debug.js";
import { engineFingerprint } from "../engine/fingerprint.js";
import type { MicroVm } from "../engine/qemu.js";
import { BuildError } from "../errors.js";
import type { ModuleDigest } from "../graph/bundle.js";
import type { NodeSpec } from "../graph/graph.js";
import { keyOf, nodeInputs } from "../graph/keys.js";
import { parsePlatform, pinnableRef, platformOf, type RefPins } from "../image/pins.js";
import { resolveImage } from "../image/resolve.js";
import type { BuildProgress } from "../schema/image.js";
import type { BuiltImage, FetchRequest } from "../schema/events.js";
import type { SnapshotInputs, SnapshotSources } from "../schema/key.js";
import { recipeKeyOf } from "../schema/host.js";
import { execDefaults } from "../session/env.js";
import { damageReason, isDamaged, loadSnapshot, quarantineSnapshot, type LoadedSnapshot, type SnapshotMeta, type WorkloadSpec } from "../store/snapshots.js";
import { AccelMismatch, ensureBaked } from "./bake.js";
import { planExtraFiles } from "./extra-files.js";

const log = logger("build");

/** A node of a build as the library keeps it: the public BuiltImage, with its key inputs, what it runs, its snapshot and the baked VM. */
export interface BuiltNode extends BuiltImage {
  inputs: SnapshotInputs;
  /** Its key without the host's part (src/schema/host.ts): what a cache has it under for any host. */
  recipeKey: string;
  sources: SnapshotSources;
  /** What the image is and runs (children inherit both), known even when not baked. */
  image?: SnapshotMeta["image"];
  workload?: WorkloadSpec | null;
  snapshot?: LoadedSnapshot;
  /** The baked VM, still running, for the image's first pool (warm handoff). */
  handoff?: MicroVm;
}

export const defaultDirName = (spec: NodeSpec, key: string): string => `${spec.name}-${key.slice(0, 16)}`;

/** How one node is built (the build's options that concern a single node). */
export interface NodeBuildOptions {
  /** Bake even what is cached. */
  force?: boolean | undefined;
  /** Compute the key and status, bake nothing. */
  dryRun?: boolean | undefined;
  /** Bake nothing: a node that is not baked (nor in the cache) is `would-bake`. */
  frozen?: boolean | undefined;
  /** Keep the baked VM running for the image's first pool (warm handoff; default true). */
  handoff?: boolean | undefined;
  snapshotsDir: string;
  /** Project root: module file names in keys and reports are relative to it. */
  root: string;
  /** The snapshot directory's name for a node and its key (default `<name>-<key[0:16]>`). */
  dirName?: ((spec: NodeSpec, key: string) => string) | undefined;
  onProgress?: ((p: BuildProgress) => void) | undefined;
  signal?: AbortSignal | undefined;
  /** A cache to try before baking (see BuildOptions.fetch). */
  fetch?: ((node: FetchRequest) => Promise<boolean>) | undefined;
  /**
   * The project's pins (its lockfile): a root image whose `ref` is a registry tag resolves by
   * its pinned digest, and a tag resolved without one is recorded. Absent outside a project.
   */
  pins?: RefPins | undefined;
}

export async function buildNode(spec: NodeSpec, parent: BuiltNode | undefined, module: ModuleDigest | null, opts: NodeBuildOptions): Promise<BuiltNode> {
  const onProgress = (progress: BuildProgress) => opts.onProgress?.(progress);
  // What the image is: a root's reference resolved (pulled if needed), a child's parent snapshot.
  let image: SnapshotMeta["image"];
  let workload: WorkloadSpec | null;
  let parentSnapshot: LoadedSnapshot | undefined;
  let pin: SnapshotSources["pin"];
  if (!parent) {
    const canonical = opts.pins ? pinnableRef(spec.ref) : undefined;
    const platform = platformOf(spec.platform);
    const pinned = canonical !== undefined ? opts.pins?.get(spec.ref, platform) : undefined;
    const resolved = await resolveImage(spec.ref, {
      ...(pinned ? { pinned } : {}),
      pullPolicy: spec.pullPolicy,
      ...(spec.platform ? { platform: parsePlatform(spec.platform) } : {}),
      ...(spec.insecureRegistries ? { insecureRegistries: spec.insecureRegistries } : {}),
      onProgress,
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    // The first resolve of a tag pins it (written when the build ends: src/project/lock.ts); a
    // dry run writes no pin, so its nodes record none either.
    if (canonical !== undefined && !pinned && !opts.dryRun) opts.pins?.record({ ref: spec.ref, platform, digest: resolved.manifestDigest, resolved: canonical });
    if (canonical !== undefined && (pinned || !opts.dryRun)) pin = { platform, digest: resolved.manifestDigest };
    image = { ref: spec.ref, digest: resolved.manifestDigest, config: resolved.config, rootfs: resolved.rootfsPath, rootfsSize: resolved.sizeBytes, ...(resolved.sha256 ? { rootfsSha256: resolved.sha256 } : {}) };
    const defaults = execDefaults(resolved.config, spec.env);
    const argv = spec.cmd ?? [...(resolved.config.entrypoint ?? []), ...(resolved.config.cmd ?? [])];
    workload = argv.length ? { argv, env: defaults.env, cwd: defaults.workingDir ?? "/", user: defaults.user } : null;
  } else {
    parentSnapshot = parent.snapshot ?? (await loadSnapshot(parent.dir, parent.key).catch(() => undefined));
    // A dry run keys a child of an image that is not baked yet from what its parent would be.
    if (!parent.image || parent.workload === undefined) {
      throw new BuildError("BUILD_PARENT_NOT_BAKED", `${spec.name}: its parent ${parent.name} is not baked`, { hint: "build without --dry-run/--frozen first" });
    }
    image = parent.image;
    workload = parent.workload;
    pin = parent.sources.pin; // the root's: a moved pin rekeys every image built on it
  }
  const extraFiles = await planExtraFiles(spec.extraFiles);
  const sources: SnapshotSources = {
    name: spec.name,
    ref: spec.ref,
    module: spec.module === null ? null : relative(opts.root, spec.module),
    files: module?.files ?? {},
    ...(pin ? { pin } : {}),
  };
  const dirName = opts.dirName ?? defaultDirName;
  for (let attempt = 0; ; attempt++) {
    const inputs = nodeInputs(spec, {
      parentKey: parent ? parent.key : null,
      manifestDigest: parent ? null : image.digest,
      workload: workload?.argv ?? null,
      extraFiles,
      module,
      engine: engineFingerprint(),
    });
    const key = keyOf(inputs);
    const recipeKey = recipeKeyOf(inputs, parent ? parent.recipeKey : null);
    const dir = join(opts.snapshotsDir, dirName(spec, key));
    const base = { name: spec.name, key, recipeKey, parent: spec.parent, ms: 0, dir, inputs, sources, image, workload };
    let damaged: BuiltNode["damaged"];
    let cacheError: BuiltNode["cacheError"];
    if (!opts.force && (opts.dryRun || opts.frozen || opts.fetch)) {
      const cached = await loadSnapshot(dir, key).catch(async (err: unknown) => {
        if (!isDamaged(err)) return undefined;
        log("%s: %s", spec.name, err.message);
        if (opts.dryRun) return undefined; // a dry run changes nothing
        const reason = damageReason(err);
        // Never used again, kept for inspection; then fetched from the cache or (not frozen) rebaked.
        const quarantine = await quarantineSnapshot(dir, reason);
        damaged = { reason, quarantine };
        onProgress({ phase: "bake-damaged", snapshot: dir, reason, quarantine });
        return undefined;
      });
      if (cached) return { ...base, status: "cached", snapshot: cached };
      if (opts.fetch && !opts.dryRun) {
        let fetched = false;
        try {
          fetched = await opts.fetch({ name: spec.name, key, recipeKey, dir, inputs, sources, expect: { workload, image: { digest: image.digest, config: image.config } } });
        } catch (err) {
          // A cache that cannot give this snapshot (refused, damaged, unreachable, or made for
          // another host) is not a reason to fail the build: the image is baked instead, and the
          // cause reported. A frozen build bakes nothing, so there it is the error.
          const code = (err as { code?: unknown }).code;
          if (opts.frozen || opts.signal?.aborted || typeof code !== "string" || !/^(CACHE|REGISTRY)_|^SNAPSHOT_HOST_MISMATCH$/.test(code)) throw err;
          cacheError = { code, message: (err as Error).message };
          log("%s: not imported (%s): baking it", spec.name, cacheError.message);
          onProgress({ phase: "cache-refused", code, reason: cacheError.message });
        }
        if (fetched) {
          const imported = await loadSnapshot(dir, key);
          if (imported) return { ...base, status: "imported", snapshot: imported };
        }
      }
      if (opts.dryRun || opts.frozen) return { ...base, status: "would-bake", ...(damaged ? { damaged } : {}) };
    }
    if (opts.dryRun) return { ...base, status: "would-bake" };
    if (spec.parent !== null && !parentSnapshot) {
      throw new BuildError("BUILD_PARENT_NOT_BAKED", `${spec.name}: its parent ${spec.parent} is not baked`, { hint: "build the parent first" });
    }
    try {
      const r = await ensureBaked({
        dir,
        hash: key,
        inputs,
        sources,
        image,
        memoryMib: spec.memoryMib,
        vcpus: spec.vcpus,
        workload,
        listenerRequired: parentSnapshot ? parentSnapshot.meta.workloadRunning : spec.listenerRequired,
        guestPort: spec.guestPort,
        defaults: execDefaults(image.config, spec.env, spec.execLimits),
        buildEnv: spec.env,
        extraFiles,
        warmup: spec.warmup,
        network: spec.network,
        parent: parentSnapshot,
        force: opts.force ?? false,
        handoff: opts.handoff ?? true,
        onProgress,
        signal: opts.signal,
      });
      return { ...base, status: r.baked ? "baked" : "cached", snapshot: r.snapshot, ...(r.handoff ? { handoff: r.handoff } : {}), ...(damaged ? { damaged } : {}), ...(cacheError ? { cacheError } : {}) };
    } catch (err) {
      if (err instanceof AccelMismatch && attempt === 0) {
        log("%s: the bake VM ran under %s, not %s: keying the snapshot by the accelerator used", spec.name, err.actual, inputs.engine.accel);
        continue;
      }
      if (err instanceof AccelMismatch) {
        throw new BuildError("BUILD_ACCEL_UNSTABLE", `${spec.name}: the accelerator changed twice during the build (now ${err.actual})`, { cause: err });
      }
      throw err;
    }
  }
}

