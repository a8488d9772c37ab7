/**
 * `loadPools`: the runtime side of a project. Loads `supermachine.config.ts`, resolves the image
 * graph, bakes what its pools need (or, `frozen`, fails naming what is not baked), and returns
 * the configured pools by name. With `watch: true` the project stays watched: an edit that
 * changes an image's key rebakes it, and its pool switches to the new snapshot for later
 * acquires while VMs already handed out finish on the old one.
 *
 * @example
 * const pools = await loadPools();
 * {
 *   await using vm = await pools.agent.acquire();
 *   await vm.exec({ argv: ["python3", "-V"] });
 * }
 * await pools.close();
 */
import { rm } from "node:fs/promises";
import { buildGraph, firstFailure, type BuildOptions, type BuiltNode } from "./build.js";
import { ProjectWatcher, type WatchEvent } from "./watch.js";
import { loadProject } from "../config/loader.js";
import type { BuildEvent as PublicBuildEvent, WatchEvent as PublicWatchEvent } from "../schema/events.js";
import { GraphError } from "../errors.js";
import { buildImageGraph, type ImageGraph } from "../graph/graph.js";
import { logger } from "../debug.js";
import type { PoolDeclaration } from "../schema/project.js";
import { snapshotInUse } from "../store/leases.js";
import { fetchFromCache, seedImages } from "./cache.js";
import type { CacheTrust } from "../transfer/sign.js";
import { openLock } from "./lock.js";
import { Image, type Rebuild } from "../runtime/image.js";
import type { Pool, PoolStats } from "../runtime/pool.js";
import type { Vm } from "../runtime/vm.js";

const log = logger("pools");

export interface LoadPoolsOptions {
  /** Where to look for the config (upward from here). Default: the working directory. */
  cwd?: string;
  /** The config file, instead of looking for one. */
  config?: string;
  /**
   * Bake nothing: fail, naming them, when images the pools need are not baked, or when their
   * registry tags are not pinned in supermachine.lock (CI).
   */
  frozen?: boolean;
  /** Bakes at once (default: the config's `concurrency`, else from cores and memory). */
  concurrency?: number;
  /** Keep watching the project and switch pools to rebaked snapshots. */
  watch?: boolean;
  /** Progress of the build, per image. */
  onEvent?: (e: PublicBuildEvent) => void;
  /** With `watch`: what the watcher does (changes, rounds, failures). */
  onWatchEvent?: (e: PublicWatchEvent) => void;
  /**
   * A snapshot cache (a directory or a registry repository `host[:port]/repo`) to import the
   * images from before baking them, also with `frozen` (default: the config's `cache.from`).
   */
  /**
   * Which cache entries `cacheFrom` may import: those signed by one of these public keys, or any
   * (`"unsigned"`). Default: the config's `cache.trust`, else none.
   */
  cacheTrust?: CacheTrust;
  cacheFrom?: string;
}

/** What a project's pool offers (a Pool; with `watch`, one that follows rebakes). */
export interface ProjectPool {
  acquire(): Promise<Vm>;
  stats(): PoolStats;
  shutdown(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** The pools of a project, by name, and `close()` that shuts them all down. */
export type Pools = { readonly [name: string]: ProjectPool } & {
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
};

/**
 * A pool that can move to a newer snapshot: later acquires get VMs of the new one; the old pool
 * is retired (what it handed out finishes on it), then its snapshot is removed unless something
 * else still uses it.
 */
class FollowingPool implements ProjectPool {
  private readonly retiring = new Set<Pool>();

  constructor(
    private pool: Pool,
    private image: Image,
    private key: string,
    private readonly opts: Omit<PoolDeclaration, "image">,
  ) {}

  get snapshotKey(): string {
    return this.key;
  }

  acquire(): Promise<Vm> {
    return this.pool.acquire();
  }

  stats(): PoolStats {
    return this.pool.stats();
  }

  /** @internal */
  async switchTo(image: Image, key: string, keep: (dir: string) => boolean): Promise<void> {
    const next = await image.pool(this.opts);
    const old = this.pool;
    const oldDir = this.image.snapshotPath;
    this.pool = next;
    this.image = image;
    this.key = key;
    this.retiring.add(old);
    void old
      .retire()
      .then(async () => {
        this.retiring.delete(old);
        if (!keep(oldDir) && !snapshotInUse(oldDir)) {
          log("removing superseded snapshot %s", oldDir);
          await rm(oldDir, { recursive: true, force: true });
        }
      })
      .catch((err: Error) => log("retiring the pool on %s: %s", oldDir, err.message));
  }

  async shutdown(): Promise<void> {
    await Promise.all([this.pool, ...this.retiring].map((p) => p.shutdown()));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.shutdown();
  }
}

export async function loadPools(options: LoadPoolsOptions = {}): Promise<Pools> {
  const projectOpts = { ...(options.cwd ? { cwd: options.cwd } : {}), ...(options.config ? { configFile: options.config } : {}) };
  if (options.watch) return watchPools(options, projectOpts);
  const project = await loadProject({ ...projectOpts, command: "pools" });
  const graph = buildImageGraph(project.images);
  const wanted = poolImages(project.configPath, project.pools, graph);
  const cacheFrom = options.cacheFrom ?? project.cache.from;
  const lock = await openLock(project);
  // Root filesystems first: resolving a root image then finds the one its snapshots were made on.
  const trust = options.cacheTrust ?? project.cache.trust;
  if (cacheFrom) await seedImages(cacheFrom, graph, wanted, { pins: lock, trust });
  const buildOpts: BuildOptions = {
    root: project.root,
    lock,
    ...(options.frozen ? { frozen: true } : {}),
    ...(project.snapshotsDir ? { snapshotsDir: project.snapshotsDir } : {}),
    ...((options.concurrency ?? project.concurrency) ? { concurrency: options.concurrency ?? project.concurrency! } : {}),
    ...(options.onEvent ? { onEvent: options.onEvent } : {}),
    ...(cacheFrom ? { fetch: fetchFromCache(cacheFrom, undefined, { trust }) } : {}),
  };
  const nodes = await buildGraph(graph, { ...buildOpts, names: wanted, handoff: (name) => wanted.includes(name) });
  // A pool whose snapshot turns out damaged (a restore fails and its RAM does not match its
  // checksums) has it quarantined and built again the same way: fetched from the cache, or baked
  // unless frozen. One whose restores QEMU keeps refusing is baked (`fresh`), never fetched again
  // from the cache it likely came from.
  const rebuild = (name: string): Rebuild => async (o = {}) => {
    const { fetch: _fetch, ...local } = buildOpts;
    const node = (await buildGraph(graph, { ...(o.fresh ? local : buildOpts), names: [name], handoff: false })).get(name)!;
    if (node.error) throw node.error;
    return node.snapshot!;
  };
  const pools = await openPools(project.pools, nodes, wanted, rebuild);
  return withClose(pools, async () => {
    await Promise.all(Object.values(pools).map((p) => p.shutdown()));
  });
}

function poolImages(configPath: string, pools: Record<string, PoolDeclaration>, graph: ImageGraph): string[] {
  for (const [pool, decl] of Object.entries(pools)) {
    if (!graph.has(decl.image)) {
      throw new GraphError("GRAPH_UNKNOWN_IMAGE", `${configPath}: pool ${JSON.stringify(pool)} uses image ${JSON.stringify(decl.image)}, which the project does not declare`, {
        hint: `images: ${graph.names.join(", ") || "(none)"}`,
      });
    }
  }
  return [...new Set(Object.values(pools).map((d) => d.image))];
}

/** Pools on the baked nodes (their handoff VMs go to the first pool of their image). */
async function openPools(decls: Record<string, PoolDeclaration>, nodes: Map<string, BuiltNode>, wanted: string[], rebuild?: (name: string) => Rebuild): Promise<Record<string, FollowingPool>> {
  const images = new Map<string, Image>();
  for (const node of nodes.values()) {
    if (wanted.includes(node.name) && node.snapshot) images.set(node.name, Image.create(node.snapshot, node.handoff, rebuild?.(node.name)));
    else await node.handoff?.kill(); // an ancestor's baked VM: no pool of it
  }
  const failure = firstFailure(nodes);
  if (failure) {
    await Promise.all([...images.values()].map((i) => i.dropHandoff()));
    throw failure;
  }
  const pools: Record<string, FollowingPool> = {};
  try {
    for (const [name, decl] of Object.entries(decls)) {
      const { image, ...opts } = decl;
      const img = images.get(image)!;
      pools[name] = new FollowingPool(await img.pool(opts), img, nodes.get(image)!.key, opts);
    }
  } catch (err) {
    await Promise.all(Object.values(pools).map((p) => p.shutdown()));
    throw err;
  }
  return pools;
}

function withClose<T extends object>(pools: T, close: () => Promise<void>): Pools {
  Object.defineProperty(pools, "close", { value: close, enumerable: false });
  Object.defineProperty(pools, Symbol.asyncDispose, { value: close, enumerable: false });
  return pools as unknown as Pools;
}

async function watchPools(options: LoadPoolsOptions, projectOpts: { cwd?: string; config?: string }): Promise<Pools> {
  // The pools' images are not known before the config is read: every image is watched and kept
  // baked, and baked VMs are kept for the pools' images only.
  let wanted: string[] = [];
  const watcher = new ProjectWatcher({
    ...projectOpts,
    command: "pools",
    handoff: (name) => wanted.includes(name),
    ...(options.concurrency ? { concurrency: options.concurrency } : {}),
  });
  let pools: Record<string, FollowingPool> | undefined;
  let switching = Promise.resolve();
  watcher.on("event", (e: WatchEvent) => {
    options.onWatchEvent?.(e);
    if (e.type === "build") options.onEvent?.(e.event);
    if (e.type !== "round-done" || !pools) return;
    const current = watcher.current!;
    wanted = poolImages(current.project.configPath, current.project.pools, current.graph);
    const live = new Set([...e.round.nodes.values()].map((n) => n.dir));
    switching = switching.then(async () => {
      // One Image per rebaked node: its baked VM goes to the first pool that switches to it.
      const images = new Map<string, Image>();
      for (const [name, pool] of Object.entries(pools!)) {
        const decl = current.project.pools[name];
        const node = decl ? e.round.nodes.get(decl.image) : undefined;
        if (!node?.snapshot || node.key === pool.snapshotKey) continue;
        let image = images.get(node.name);
        if (!image) images.set(node.name, (image = Image.create(node.snapshot, node.handoff)));
        log("pool %s: switching to %s (key %s)", name, node.name, node.key.slice(0, 16));
        await pool.switchTo(image, node.key, (dir) => live.has(dir)).catch((err: Error) => log("pool %s: %s", name, err.message));
      }
      // Baked VMs no pool took.
      for (const node of e.round.nodes.values()) if (!images.has(node.name)) await node.handoff?.kill();
      for (const image of images.values()) await image.dropHandoff();
    });
  });
  // The first round: the config decides which images the pools need.
  const project = await loadProject({ ...(projectOpts.cwd ? { cwd: projectOpts.cwd } : {}), ...(projectOpts.config ? { configFile: projectOpts.config } : {}), command: "pools" });
  wanted = poolImages(project.configPath, project.pools, buildImageGraph(project.images));
  const first = await watcher.start();
  try {
    pools = await openPools(watcher.current!.project.pools, first.nodes, wanted);
  } catch (err) {
    await watcher.close();
    throw err;
  }
  return withClose(pools, async () => {
    await watcher.close();
    await switching;
    await Promise.all(Object.values(pools!).map((p) => p.shutdown()));
  });
}
