/**
 * `loadPools`: the runtime side of a project. Loads `supermachine.config.ts`, resolves the image
 * graph, bakes what its pools need (or, `frozen`, fails naming what is not baked), and returns
 * the configured pools by name.
 *
 * @example
 * const pools = await loadPools();
 * {
 *   await using vm = await pools.agent.acquire();
 *   await vm.exec({ argv: ["python3", "-V"] });
 * }
 * await pools.close();
 */
import { buildGraph, firstFailure, type BuildEvent } from "../build/build.js";
import { loadProject } from "../config/loader.js";
import { GraphError } from "../errors.js";
import { buildImageGraph } from "../graph/graph.js";
import { fetchFromCache, seedImages } from "../transfer/index.js";
import { Image } from "./image.js";
import type { Pool } from "./pool.js";

export interface LoadPoolsOptions {
  /** Where to look for the config (upward from here). Default: the working directory. */
  cwd?: string;
  /** The config file, instead of looking for one. */
  config?: string;
  /** Bake nothing: fail, naming them, when images the pools need are not baked (CI). */
  frozen?: boolean;
  /** Bakes at once (default: the config's `concurrency`, else from cores and memory). */
  concurrency?: number;
  /** Progress of the build, per image. */
  onEvent?: (e: BuildEvent) => void;
  /**
   * A snapshot cache (a directory or a registry repository `host[:port]/repo`) to import the
   * images from before baking them, also with `frozen` (default: the config's `cache.from`).
   */
  cacheFrom?: string;
}

/** The pools of a project, by name, and `close()` that shuts them all down. */
export type Pools = { readonly [name: string]: Pool } & {
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
};

export async function loadPools(options: LoadPoolsOptions = {}): Promise<Pools> {
  const project = await loadProject({ ...(options.cwd ? { cwd: options.cwd } : {}), ...(options.config ? { configFile: options.config } : {}), command: "pools" });
  const graph = buildImageGraph(project.images);
  const entries = Object.entries(project.pools);
  for (const [pool, decl] of entries) {
    if (!graph.has(decl.image)) {
      throw new GraphError("GRAPH_UNKNOWN_IMAGE", `${project.configPath}: pool ${JSON.stringify(pool)} uses image ${JSON.stringify(decl.image)}, which the project does not declare`, {
        hint: `images: ${graph.names.join(", ") || "(none)"}`,
      });
    }
  }
  const wanted = [...new Set(entries.map(([, d]) => d.image))];
  const cacheFrom = options.cacheFrom ?? project.cache.from;
  // Root filesystems first: resolving a root image then finds the one its snapshots were made on.
  if (cacheFrom) await seedImages(cacheFrom, graph, wanted);
  const nodes = await buildGraph(graph, {
    names: wanted,
    root: project.root,
    handoff: (name) => wanted.includes(name),
    ...(options.frozen ? { frozen: true } : {}),
    ...(project.snapshotsDir ? { snapshotsDir: project.snapshotsDir } : {}),
    ...((options.concurrency ?? project.concurrency) ? { concurrency: options.concurrency ?? project.concurrency! } : {}),
    ...(options.onEvent ? { onEvent: options.onEvent } : {}),
    ...(cacheFrom ? { fetch: fetchFromCache(cacheFrom) } : {}),
  });
  const images = new Map<string, Image>();
  for (const node of nodes.values()) {
    if (wanted.includes(node.name) && node.snapshot) images.set(node.name, new Image(node.snapshot, node.handoff));
    else await node.handoff?.kill(); // an ancestor's baked VM: no pool of it
  }
  const failure = firstFailure(nodes);
  if (failure) {
    await Promise.all([...images.values()].map((i) => i.dropHandoff()));
    throw failure;
  }
  const pools: Record<string, Pool> = {};
  try {
    for (const [name, decl] of entries) {
      const { image, ...opts } = decl;
      pools[name] = await images.get(image)!.pool(opts);
    }
  } catch (err) {
    await Promise.all(Object.values(pools).map((p) => p.shutdown()));
    throw err;
  }
  const close = async () => {
    await Promise.all(Object.values(pools).map((p) => p.shutdown()));
  };
  Object.defineProperty(pools, "close", { value: close, enumerable: false });
  Object.defineProperty(pools, Symbol.asyncDispose, { value: close, enumerable: false });
  return pools as Pools;
}
