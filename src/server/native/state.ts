/**
 * What the native API keeps beside the sandbox registry: the project's build status (each image's
 * last event, and a feed for `GET /v1/builds/events`), and the snapshots clients took of their
 * sandboxes. A snapshot is a directory under `<snapshots dir>/serve-<server id>/`, opened as an
 * Image whose pool (min 0: VMs are restored when a sandbox asks) serves `POST /v1/sandboxes
 * { snapshot }`. Snapshots belong to the key that took them and last until they are deleted or
 * the server drains; then their pools shut down and their directory is removed.
 */
import { EventEmitter } from "node:events";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import { homePaths } from "../../paths.js";
import type { BuildEvent, WatchEvent } from "../../schema/events.js";
import { ServerEvents } from "../events.js";
import { PoolSeries } from "../pool-series.js";
import { ProjectImages } from "../images.js";
import type { Image } from "../../runtime/image.js";
import type { Pool } from "../../runtime/pool.js";
import { ServerError } from "../errors.js";
import type { KeyRecord } from "../keys.js";
import { newSandboxId, type Sandbox } from "../sandboxes.js";
import { randomAlnum, tagOf } from "../node-tag.js";

export interface BuildStatus {
  name: string;
  status: string;
  key: string | null;
  ms: number | null;
  error: string | null;
  updatedAt: string;
}

/** Each image's last build status, and the events as they come. */
export class BuildLog {
  private readonly images = new Map<string, BuildStatus>();
  private readonly feed = new EventEmitter();

  constructor() {
    this.feed.setMaxListeners(0);
  }

  record(e: BuildEvent): void {
    const now = new Date().toISOString();
    const prev = this.images.get(e.name);
    if (e.type === "done") {
      this.images.set(e.name, { name: e.name, status: e.node.status, key: e.node.key, ms: e.node.ms, error: e.node.error ? e.node.error.message : null, updatedAt: now });
    } else if (e.type === "start" || !prev || prev.status !== "building") {
      this.images.set(e.name, { name: e.name, status: "building", key: null, ms: null, error: null, updatedAt: now });
    }
    this.feed.emit("event", wireEvent(e));
  }

  list(): BuildStatus[] {
    return [...this.images.values()];
  }

  /** Calls `fn` with every later event (as JSON-ready objects) until the returned function is called. */
  subscribe(fn: (e: Record<string, unknown>) => void): () => void {
    this.feed.on("event", fn);
    return () => this.feed.off("event", fn);
  }
}

/** A build event without the internal objects (errors become their message and code). */
function wireEvent(e: BuildEvent): Record<string, unknown> {
  if (e.type !== "done") return { ...e };
  const { error, ...node } = e.node;
  return { type: "done", name: e.name, node: { ...node, error: error ? { message: error.message, code: (error as { code?: string }).code ?? null } : null } };
}

export interface SnapshotRecord {
  id: string;
  keyId: string;
  /** The pool of the sandbox it was taken from. */
  pool: string;
  createdAt: Date;
  image: Image;
  dir: string;
  /** Who processes run as by default in the VM it was taken of (its pool's user). */
  user: string | undefined;
  /** Opened on the first sandbox created from it. */
  vms?: Promise<Pool>;
}

/** Most VMs a snapshot's pool runs at once. */
const SNAPSHOT_POOL_MAX = 4;

export class SnapshotStore {
  private readonly byId = new Map<string, SnapshotRecord>();
  /** Where this server's snapshots go (one directory per server instance). */
  readonly dir: string;
  private closed = false;

  constructor(dir?: string) {
    this.dir = dir ?? join(homePaths().snapshots, `serve-${process.pid}-${randomAlnum(8)}`);
  }

  /** Captures the sandbox's VM. */
  async take(sb: Sandbox, key: KeyRecord, timeoutMs: number | undefined): Promise<SnapshotRecord> {
    if (this.closed) throw new ServerError("SERVER_DRAINING", "the server is shutting down and takes no snapshots", { hint: "retry against another server" });
    // A snapshot lives on the node of the sandbox it was taken from: its id carries that node's tag.
    const tag = tagOf(sb.id) ?? randomAlnum(6);
    let id = newSandboxId(tag);
    while (this.byId.has(id)) id = newSandboxId(tag);
    const dir = join(this.dir, id);
    const image = await sb.vm.snapshot(dir, timeoutMs === undefined ? {} : { timeoutMs });
    const rec: SnapshotRecord = { id, keyId: key.id, pool: sb.pool, createdAt: new Date(), image, dir, user: sb.vm.processDefaults.user };
    this.byId.set(id, rec);
    return rec;
  }

  list(key: KeyRecord): SnapshotRecord[] {
    return [...this.byId.values()].filter((r) => r.keyId === key.id);
  }

  require(id: string, key: KeyRecord, what: string): SnapshotRecord {
    const rec = this.byId.get(id);
    if (!rec || rec.keyId !== key.id) {
      throw new ServerError("SERVER_NOT_FOUND", `${what}: no snapshot ${JSON.stringify(id)} on this server`, { hint: "GET /v1/snapshots lists the key's snapshots; they last until deleted or the server stops" });
    }
    return rec;
  }

  /** The pool sandboxes of this snapshot come from (opened once). */
  pool(rec: SnapshotRecord): Promise<Pool> {
    rec.vms ??= rec.image.pool({ min: 0, max: SNAPSHOT_POOL_MAX, ...(rec.user ? { user: rec.user } : {}) });
    rec.vms.catch(() => (rec.vms = undefined));
    return rec.vms;
  }

  /**
   * Forgets the snapshot at once; its pool winds down in the background (sandboxes already made
   * from it run to their end), then its files are removed.
   */
  remove(rec: SnapshotRecord): Promise<void> {
    this.byId.delete(rec.id);
    const vms = rec.vms;
    rec.vms = undefined;
    return (async () => {
      await (await vms?.catch(() => undefined))?.retire();
      await rm(rec.dir, { recursive: true, force: true });
    })();
  }

  /** Every snapshot removed (the server drains: no sandbox is left to use them). */
  async close(): Promise<void> {
    this.closed = true;
    const all = [...this.byId.values()];
    this.byId.clear();
    await Promise.all(all.map(async (r) => (await r.vms?.catch(() => undefined))?.shutdown()));
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** The native API's state, made by startServer. */
export class NativeState {
  readonly builds = new BuildLog();
  readonly snapshots: SnapshotStore;
  /** The server's event feed (GET /v1/events). */
  readonly events = new ServerEvents();
  /** Each pool's recent acquire latency and cycles. */
  readonly series = new PoolSeries();
  /** The project's images for the page (GET /v1/images). */
  readonly images: ProjectImages;

  /** `project`: where the served project is (none when the server was handed its pools). */
  constructor(options: { snapshotsDir?: string; project?: { cwd?: string; config?: string } } = {}) {
    this.snapshots = new SnapshotStore(options.snapshotsDir);
    this.images = new ProjectImages(options.project, this.builds, this.events);
  }

  /** A build event of the project: its status, the feed, and the images' listing. */
  onBuild(e: BuildEvent): void {
    this.builds.record(e);
    this.events.build(e);
    if (e.type === "done") this.images.invalidate();
  }

  /** A watch-mode event: the feed, and the listing (files changed, keys may have). */
  onWatch(e: WatchEvent): void {
    this.events.watch(e);
    if (e.type === "change" || e.type === "round-done" || e.type === "round-failed") this.images.invalidate();
  }

  close(): Promise<void> {
    return this.snapshots.close();
  }
}
