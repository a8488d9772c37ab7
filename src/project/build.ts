/**
 * The build step: walks an image graph parents first and makes every node ready (src/bake/node.ts:
 * keyed by content, then found, fetched or baked: a root image from its reference, a child on its
 * parent's snapshot). Independent images bake in parallel up to a limit; one node is never baked
 * twice at once (the store's per-snapshot lock serves two processes too). Root images resolve
 * their tags through the project's lockfile when there is one (src/project/lock.ts).
 */
import { availableParallelism, totalmem } from "node:os";
import { buildNode, type BuiltNode } from "../bake/node.js";
import { logger } from "../debug.js";
import { BuildError } from "../errors.js";
import { digestModules } from "../graph/bundle.js";
import type { ImageGraph, NodeSpec } from "../graph/graph.js";
import { homePaths } from "../paths.js";
import type { BuildEvent as PublicBuildEvent, FetchRequest, NodeStatus } from "../schema/events.js";
import type { SnapshotInputs } from "../schema/key.js";
import { requirePins, type ProjectLock } from "./lock.js";

export { defaultDirName } from "../bake/node.js";
export type { BuiltNode, FetchRequest, NodeStatus };
/** A build's events, with the library's own node (snapshot, baked VM); users get the public BuildEvent. */
export type BuildEvent = PublicBuildEvent<BuiltNode>;

const log = logger("build");


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
  /**
   * The project's lockfile (src/project/lock.ts): root images whose `ref` is a registry tag
   * resolve by their pins, and tags resolved without one are pinned when the build ends (not in
   * a dry run). A frozen build needs a pin for every such tag.
   */
  lock?: ProjectLock;
}

/** Bakes at once by default: one per core, and no more than memory for about 2 GiB each. */
export function defaultConcurrency(): number {
  return Math.max(1, Math.min(availableParallelism(), Math.floor(totalmem() / 2 ** 31)));
}

/**
 * Builds the graph (or `names` and their ancestors). Resolves with every node's result; a node
 * that failed has `status: "failed"` and its `error`, its descendants `"skipped"`. With
 * `frozen`, nothing is baked and a BuildError names every image that is not.
 */
export async function buildGraph(graph: ImageGraph, opts: BuildOptions = {}): Promise<Map<string, BuiltNode>> {
  const order = opts.names ? graph.withAncestors(opts.names) : graph.order;
  if (opts.frozen && opts.lock) requirePins(opts.lock, graph, order);
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
        const node = await buildNode(spec, parent, digests.get(spec.module ?? "") ?? null, {
          ...opts,
          root,
          snapshotsDir,
          handoff: typeof opts.handoff === "function" ? opts.handoff(spec.name) : opts.handoff,
          pins: opts.lock,
          onProgress: (progress) => opts.onEvent?.({ type: "progress", name, progress }),
        });
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
  // Pins of the tags this build resolved, also when some of its bakes failed.
  if (opts.lock && !opts.dryRun) await opts.lock.save();
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
    recipeKey: "",
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
