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
import { GraphError, PoolError } from "../errors.js";
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
  /**
   * Open each pool on its first acquire instead of now (a node of a fleet that serves many
   * images): that acquire imports the image's snapshot from `cacheFrom` when this machine lacks
   * it. It never bakes unless `bakeOnDemand` is set too (a bake in a request takes minutes).
   * Not with `watch`.
   */
  lazy?: boolean;
  /** With `lazy`: an image neither here nor in the cache is baked by the acquire that needs it. */
  bakeOnDemand?: boolean;
}

/** What a node reports of one of its pools. */
export interface PoolState {
  image: string;
  /** Its snapshot's key, once known (a lazy pool learns it when it opens). */
  key: string | null;
  /**
   * `open`: serving VMs. `closed`: a lazy pool not opened yet. `loading`: opening (importing its
   * snapshot, or baking it). `failed`: its last opening failed (`error`; the next acquire tries
   * again).
   */
  state: "open" | "closed" | "loading" | "failed";
  /** Where an open pool's snapshot came from when it opened: found here, imported from the cache, or baked. */
  origin?: "cached" | "imported" | "baked";
  error?: { code?: string; message: string };
}

/** What a project's pool offers (a Pool; with `watch`, one that follows rebakes). */
export interface ProjectPool {
  acquire(): Promise<Vm>;
  stats(): PoolStats;
  /** Its image, key and whether it is open (for a node's report, `GET /v1/node`). */
  describe?(): PoolState;
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
    private readonly imageName: string,
  ) {}

  get snapshotKey(): string {
    return this.key;
  }

  /** @internal How its snapshot was found when the pool opened. */
  origin: PoolState["origin"];

  describe(): PoolState {
    return { image: this.imageName, key: this.key, state: "open", ...(this.origin ? { origin: this.origin } : {}) };
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
  if (options.lazy) return lazyPools(options, projectOpts);
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
  const pools = await openPools(project.pools, nodes, wanted, rebuilder(graph, buildOpts));
  return withClose(pools, async () => {
    await Promise.all(Object.values(pools).map((p) => p.shutdown()));
  });
}

/**
 * How a pool's image is built again when its snapshot turns out damaged (a restore fails and its
 * RAM does not match its checksums; the image quarantines it): fetched from the cache, or baked
 * unless frozen. One whose restores QEMU keeps refusing is baked (`fresh`), never fetched again
 * from the cache it likely came from.
 */
function rebuilder(graph: ImageGraph, buildOpts: BuildOptions): (name: string) => Rebuild {
  return (name) => async (o = {}) => {
    const { fetch: _fetch, ...local } = buildOpts;
    const node = (await buildGraph(graph, { ...(o.fresh ? local : buildOpts), names: [name], handoff: false })).get(name)!;
    if (node.error) throw node.error;
    return node.snapshot!;
  };
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
      pools[name] = new FollowingPool(await img.pool(opts), img, nodes.get(image)!.key, opts, image);
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

/**
 * A pool that opens on its first acquire (`lazy`): concurrent acquires share one opening, and a
 * failed opening is reported (`describe`) and tried again by the next acquire.
 */
class LazyPool implements ProjectPool {
  private pool: FollowingPool | undefined;
  private opening: Promise<FollowingPool> | undefined;
  private failure: Error | undefined;
  private closed = false;

  constructor(
    private readonly decl: PoolDeclaration,
    private readonly open: () => Promise<FollowingPool>,
  ) {}

  describe(): PoolState {
    if (this.pool) return this.pool.describe();
    const e = this.failure;
    return {
      image: this.decl.image,
      key: null,
      state: this.opening ? "loading" : e ? "failed" : "closed",
      ...(e && !this.opening ? { error: { message: e.message, ...((e as { code?: string }).code ? { code: (e as { code?: string }).code! } : {}) } } : {}),
    };
  }

  async acquire(): Promise<Vm> {
    return (await this.ensure()).acquire();
  }

  /** Opens the pool (once). */
  ensure(): Promise<FollowingPool> {
    if (this.pool) return Promise.resolve(this.pool);
    if (this.closed) return Promise.reject(new PoolError("POOL_SHUT_DOWN", `pool.acquire: the pool of ${this.decl.image} has been shut down`));
    this.opening ??= this.open().then(
      async (p) => {
        this.opening = undefined;
        if (this.closed) {
          await p.shutdown();
          throw new PoolError("POOL_SHUT_DOWN", `the pool of ${this.decl.image} was shut down while it opened`);
        }
        this.failure = undefined;
        return (this.pool = p);
      },
      (err: Error) => {
        this.opening = undefined;
        this.failure = err;
        throw err;
      },
    );
    return this.opening;
  }

  stats(): PoolStats {
    return this.pool?.stats() ?? { alive: 0, inUse: 0, idle: 0, waiting: 0, min: this.decl.min ?? 0, max: this.decl.max ?? 0, memoryMib: this.decl.memoryMib ?? 0, vcpus: this.decl.vcpus ?? 0 };
  }

  async shutdown(): Promise<void> {
    this.closed = true;
    await this.opening?.catch(() => {});
    await this.pool?.shutdown();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.shutdown();
  }
}

async function lazyPools(options: LoadPoolsOptions, projectOpts: { cwd?: string; configFile?: string }): Promise<Pools> {
  const project = await loadProject({ ...projectOpts, command: "pools" });
  const graph = buildImageGraph(project.images);
  poolImages(project.configPath, project.pools, graph);
  const cacheFrom = options.cacheFrom ?? project.cache.from;
  const trust = options.cacheTrust ?? project.cache.trust;
  const lock = await openLock(project);
  const buildOpts: BuildOptions = {
    root: project.root,
    lock,
    // In a request: import, or fail naming what is missing; bake only when told to.
    ...(options.bakeOnDemand ? {} : { frozen: true }),
    ...(project.snapshotsDir ? { snapshotsDir: project.snapshotsDir } : {}),
    ...(options.onEvent ? { onEvent: options.onEvent } : {}),
    ...(cacheFrom ? { fetch: fetchFromCache(cacheFrom, undefined, { trust }) } : {}),
  };
  // One opening per image at a time, shared by the pools of that image.
  const rebuild = rebuilder(graph, buildOpts);
  const building = new Map<string, Promise<Map<string, BuiltNode>>>();
  const build = (image: string) => {
    let p = building.get(image);
    if (!p) {
      p = (async () => {
        if (cacheFrom) await seedImages(cacheFrom, graph, [image], { pins: lock, trust });
        return buildGraph(graph, { ...buildOpts, names: [image], handoff: (n) => n === image });
      })().finally(() => building.delete(image));
      building.set(image, p);
    }
    return p;
  };
  const pools: Record<string, LazyPool> = {};
  for (const [name, decl] of Object.entries(project.pools)) {
    const { image, ...opts } = decl;
    pools[name] = new LazyPool(decl, async () => {
      const nodes = await build(image);
      const node = nodes.get(image)!;
      for (const n of nodes.values()) if (n !== node) await n.handoff?.kill();
      const failure = firstFailure(nodes);
      if (failure || !node.snapshot) {
        await node.handoff?.kill();
        throw failure ?? new GraphError("GRAPH_UNKNOWN_IMAGE", `pool ${name}: image ${image} was not built`);
      }
      log("pool %s: opening on %s (key %s, %s)", name, image, node.key.slice(0, 16), node.status);
      const img = Image.create(node.snapshot, node.handoff, rebuild(image));
      try {
        const pool = new FollowingPool(await img.pool(opts), img, node.key, opts, image);
        if (node.status === "cached" || node.status === "imported" || node.status === "baked") pool.origin = node.status;
        return pool;
      } finally {
        await img.dropHandoff();
      }
    });
  }
  return withClose(pools, async () => {
    await Promise.all(Object.values(pools).map((p) => p.shutdown()));
  });
}
