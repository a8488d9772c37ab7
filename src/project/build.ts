/**
 * The build step: walks an image graph parents first, keys every node by content, and bakes what
 * is missing: a root image from its reference, a child on its parent's snapshot. Independent
 * images bake in parallel up to a limit; one node is never baked twice at once (the store's
 * per-snapshot lock serves two processes too).
 */
import { availableParallelism, totalmem } from "node:os";
import { join, relative } from "node:path";
import { AccelMismatch, ensureBaked } from "../bake/bake.js";
import { planExtraFiles } from "../bake/extra-files.js";
import { engineFingerprint } from "../engine/fingerprint.js";
import type { MicroVm } from "../engine/qemu.js";
import { BuildError } from "../errors.js";
import { execDefaults } from "../session/env.js";
import { digestModules, type ModuleDigest } from "../graph/bundle.js";
import type { ImageGraph, NodeSpec } from "../graph/graph.js";
import { keyOf, nodeInputs } from "../graph/keys.js";
import { resolveImage } from "../image/resolve.js";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";
import type { BuildProgress } from "../schema/image.js";
import { damageReason, isDamaged, loadSnapshot, quarantineSnapshot, type LoadedSnapshot, type SnapshotMeta, type WorkloadSpec } from "../store/snapshots.js";
import type { SnapshotInputs, SnapshotSources } from "../schema/key.js";

const log = logger("build");

export type NodeStatus = "baked" | "cached" | "imported" | "would-bake" | "failed" | "skipped";

/** What a cache lookup gets for a node that is not baked locally. */
export interface FetchRequest {
  name: string;
  key: string;
  /** Where the snapshot must appear (published atomically) if the cache has it. */
  dir: string;
  inputs: SnapshotInputs;
  sources: SnapshotSources;
}

export interface BuiltNode {
  name: string;
  key: string;
  status: NodeStatus;
  parent: string | null;
  /** Time from this node's start to its end (resolve, key, bake). */
  ms: number;
  /** Where its snapshot is (or would be). */
  dir: string;
  inputs: SnapshotInputs;
  sources: SnapshotSources;
  /** @internal What the image is and runs (children inherit both), known even when not baked. */
  image?: SnapshotMeta["image"];
  /** @internal */
  workload?: WorkloadSpec | null;
  snapshot?: LoadedSnapshot;
  /** The baked VM, still running, for the image's first pool (warm handoff). */
  handoff?: MicroVm;
  /** Its snapshot was found damaged (why, and where it was moved), then rebaked or (frozen) not. */
  damaged?: { reason: string; quarantine: string | undefined };
  error?: Error;
}

export type BuildEvent =
  | { type: "start"; name: string }
  | { type: "progress"; name: string; progress: BuildProgress }
  | { type: "done"; name: string; node: BuiltNode };

export interface BuildOptions {
  /** Build these images and their ancestors (default: every image). */
  names?: string[];
  /** Bake even what is cached. */
  force?: boolean;
  /** Compute keys and statuses, bake nothing. */
  dryRun?: boolean;
  /** Fail, naming them, when images are not baked (CI: everything must come from the cache). */
  frozen?: boolean;
  /** Bakes at once (default: from cores and memory). */
  concurrency?: number;
  /**
   * Keep each baked VM running for the image's first pool (warm handoff). Default true; a build
   * that makes no pools (the CLI's) passes false and saves the handoff's copy of the RAM.
   */
  handoff?: boolean | ((name: string) => boolean);
  snapshotsDir?: string;
  /** Project root: module file names in keys and reports are relative to it. */
  root?: string;
  /** The snapshot directory's name for a node and its key (default `<name>-<key[0:16]>`). */
  dirName?: (spec: NodeSpec, key: string) => string;
  onEvent?: (e: BuildEvent) => void;
  signal?: AbortSignal;
  /**
   * A cache to try before baking (and in a frozen build) a node that is not baked locally:
   * resolves true once it has published the node's snapshot at `dir`, false if the cache lacks
   * it. Parents are fetched (or baked) before their children.
   */
  fetch?: (node: FetchRequest) => Promise<boolean>;
}

/** Bakes at once by default: one per core, and no more than memory for about 2 GiB each. */
export function defaultConcurrency(): number {
  return Math.max(1, Math.min(availableParallelism(), Math.floor(totalmem() / 2 ** 31)));
}

export const defaultDirName = (spec: NodeSpec, key: string): string => `${spec.name}-${key.slice(0, 16)}`;

/**
 * Builds the graph (or `names` and their ancestors). Resolves with every node's result; a node
 * that failed has `status: "failed"` and its `error`, its descendants `"skipped"`. With
 * `frozen`, nothing is baked and a BuildError names every image that is not.
 */
export async function buildGraph(graph: ImageGraph, opts: BuildOptions = {}): Promise<Map<string, BuiltNode>> {
  const order = opts.names ? graph.withAncestors(opts.names) : graph.order;
  const root = opts.root ?? process.cwd();
  const snapshotsDir = opts.snapshotsDir ?? homePaths().snapshots;
  const modules = [...new Set(order.map((n) => graph.spec(n).module).filter((m): m is string => m !== null))];
  const digests = await digestModules(modules, root);
  const limit = Math.max(1, opts.concurrency ?? defaultConcurrency());
  const results = new Map<string, BuiltNode>();
  const pending = new Map<string, Promise<BuiltNode>>();
  let running = 0;
  const slots: Array<() => void> = [];
  const slot = async () => {
    if (running >= limit) await new Promise<void>((r) => slots.push(r));
    running++;
  };
  const release = () => {
    running--;
    slots.shift()?.();
  };

  const run = (name: string): Promise<BuiltNode> => {
    let p = pending.get(name);
    if (p) return p;
    p = (async () => {
      const spec = graph.spec(name);
      const parent = spec.parent === null ? undefined : await run(spec.parent);
      if (parent && (parent.status === "failed" || parent.status === "skipped")) {
        return finish(skipped(spec, parent));
      }
      await slot();
      const t0 = performance.now();
      opts.onEvent?.({ type: "start", name });
      try {
        const node = await buildNode(spec, parent, digests.get(spec.module ?? "") ?? null, { ...opts, root, snapshotsDir });
        return finish({ ...node, ms: Math.round(performance.now() - t0) });
      } catch (err) {
        log("%s: %s", name, (err as Error).message);
        return finish({ ...failed(spec, err as Error), ms: Math.round(performance.now() - t0) });
      } finally {
        release();
      }
    })();
    pending.set(name, p);
    return p;
  };
  const finish = (node: BuiltNode): BuiltNode => {
    results.set(node.name, node);
    opts.onEvent?.({ type: "done", name: node.name, node });
    return node;
  };
  await Promise.all(order.map(run));
  const ordered = new Map(order.map((n) => [n, results.get(n)!]));
  if (opts.frozen) {
    const missing = [...ordered.values()].filter((n) => n.status === "would-bake");
    if (missing.length) {
      const damaged = missing.filter((n) => n.damaged);
      const what = (n: BuiltNode) => `${n.name} (key ${n.key.slice(0, 16)}${n.damaged ? `; its snapshot was damaged: ${n.damaged.reason}${n.damaged.quarantine ? `, and was moved to ${n.damaged.quarantine}` : ""}` : ""})`;
      throw new BuildError(damaged.length ? "BUILD_FROZEN_DAMAGED" : "BUILD_FROZEN_MISSING", `frozen build: ${missing.length} image${missing.length > 1 ? "s are" : " is"} not baked: ${missing.map(what).join(", ")}`, {
        hint: damaged.length
          ? "a frozen build does not rebake a damaged snapshot: bake it again (supermachine build) or import it from a cache"
          : "bake them (supermachine build), or import them from a cache, before a frozen build",
      });
    }
  }
  return ordered;
}

/** A node that produced no snapshot: failed itself (`error`), or skipped because its parent did. */
function unbuilt(spec: NodeSpec, status: "failed" | "skipped", error: Error): BuiltNode {
  return {
    name: spec.name,
    key: "",
    status,
    parent: spec.parent,
    ms: 0,
    dir: "",
    inputs: {} as SnapshotInputs,
    sources: { name: spec.name, ref: spec.ref, module: null, files: {} },
    error,
  };
}

function skipped(spec: NodeSpec, parent: BuiltNode): BuiltNode {
  return unbuilt(spec, "skipped", new BuildError("BUILD_PARENT_FAILED", `${spec.name}: not built, because its parent ${parent.name} failed`, { cause: parent.error }));
}

function failed(spec: NodeSpec, error: Error): BuiltNode {
  return unbuilt(spec, "failed", error);
}

/** The first failure of a build, to throw from APIs that build and then use the images. */
export function firstFailure(nodes: Map<string, BuiltNode>): Error | undefined {
  const bad = [...nodes.values()].find((n) => n.status === "failed");
  return bad?.error;
}

async function buildNode(spec: NodeSpec, parent: BuiltNode | undefined, module: ModuleDigest | null, opts: BuildOptions & { root: string; snapshotsDir: string }): Promise<BuiltNode> {
  const onProgress = (progress: BuildProgress) => opts.onEvent?.({ type: "progress", name: spec.name, progress });
  // What the image is: a root's reference resolved (pulled if needed), a child's parent snapshot.
  let image: SnapshotMeta["image"];
  let workload: WorkloadSpec | null;
  let parentSnapshot: LoadedSnapshot | undefined;
  if (!parent) {
    const resolved = await resolveImage(spec.ref, {
      pullPolicy: spec.pullPolicy,
      ...(spec.platform ? { platform: parsePlatform(spec.platform) } : {}),
      ...(spec.insecureRegistries ? { insecureRegistries: spec.insecureRegistries } : {}),
      onProgress,
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
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
  }
  const extraFiles = await planExtraFiles(spec.extraFiles);
  const sources: SnapshotSources = {
    name: spec.name,
    ref: spec.ref,
    module: spec.module === null ? null : relative(opts.root, spec.module),
    files: module?.files ?? {},
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
    const dir = join(opts.snapshotsDir, dirName(spec, key));
    const base = { name: spec.name, key, parent: spec.parent, ms: 0, dir, inputs, sources, image, workload };
    let damaged: BuiltNode["damaged"];
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
      if (opts.fetch && !opts.dryRun && (await opts.fetch({ name: spec.name, key, dir, inputs, sources }))) {
        const imported = await loadSnapshot(dir, key);
        if (imported) return { ...base, status: "imported", snapshot: imported };
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
        handoff: typeof opts.handoff === "function" ? opts.handoff(spec.name) : (opts.handoff ?? true),
        onProgress,
        signal: opts.signal,
      });
      return { ...base, status: r.baked ? "baked" : "cached", snapshot: r.snapshot, ...(r.handoff ? { handoff: r.handoff } : {}), ...(damaged ? { damaged } : {}) };
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

function parsePlatform(v: string): { os: string; architecture: string; variant?: string } {
  const [os, architecture, variant] = v.split("/") as [string, string, string | undefined];
  return variant ? { os, architecture, variant } : { os, architecture };
}
