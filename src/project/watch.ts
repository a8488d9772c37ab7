/**
 * Watch mode: keeps a project's images baked while its files change. Watches the config, every
 * file each image's key was computed from (its module and what the module imports) and every
 * extra file. A batch of changes (debounced) starts a round: reload the config, rebuild the
 * graph, key every node, bake what changed (only nodes whose key changed, and so their
 * descendants, parents first). Rounds never overlap, so a node is never baked twice at once; a
 * change during a round queues one more round. A config that stops loading keeps the last good
 * graph: the error is reported and the next change tries again.
 */
import { EventEmitter } from "node:events";
import { dirname, resolve } from "node:path";
import { watch, type FSWatcher } from "chokidar";
import { loadProject } from "../config/loader.js";
import { buildImageGraph, type ImageGraph } from "../graph/graph.js";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";
import type { LoadedProject } from "../schema/project.js";
import { buildGraph, type BuiltNode } from "./build.js";
import { openLock } from "./lock.js";
import type { WatchEvent as PublicWatchEvent, WatchRound as PublicWatchRound } from "../schema/events.js";

const log = logger("watch");

/** Watch mode's rounds and events, with the library's own nodes; users get the public types (src/schema/events.ts). */
export type WatchRound = PublicWatchRound<BuiltNode>;
export type WatchEvent = PublicWatchEvent<BuiltNode>;

export interface ProjectWatchOptions {
  cwd?: string;
  config?: string;
  /** Images to keep baked (with their ancestors); default all. */
  names?: string[];
  concurrency?: number;
  /** Quiet time after the last change before a round starts (default 150 ms). */
  debounceMs?: number;
  /** Keep each baked VM running for a pool of its image (loadPools({ watch: true })). */
  handoff?: boolean | ((name: string) => boolean);
  /** The command function-form configs are given (default "watch"). */
  command?: string;
}

/** A project under watch. Events: `event` (WatchEvent). */
export class ProjectWatcher extends EventEmitter {
  private watcher: FSWatcher | undefined;
  private watched = new Set<string>();
  private pending = new Set<string>();
  private timer: NodeJS.Timeout | undefined;
  private scheduled = false;
  private running: Promise<void> | undefined;
  private closed = false;
  private rounds = 0;
  private last: { project: LoadedProject; graph: ImageGraph; nodes: Map<string, BuiltNode> } | undefined;

  constructor(private readonly opts: ProjectWatchOptions = {}) {
    super();
  }

  /** The last good round's project, graph and nodes. */
  get current(): { project: LoadedProject; graph: ImageGraph; nodes: Map<string, BuiltNode> } | undefined {
    return this.last;
  }

  private emitEvent(e: WatchEvent): void {
    this.emit("event", e);
  }

  /** Runs the first round (which must succeed) and starts watching. */
  async start(): Promise<WatchRound> {
    const round = await this.round([]);
    if (!round) throw this.lastError ?? new Error("the first round failed");
    this.watcher = watch([...this.watched], { ignoreInitial: true, depth: 0, awaitWriteFinish: { stabilityThreshold: 50, pollInterval: 20 } });
    this.watcher.on("all", (_event, path) => this.onChange(resolve(path)));
    this.watcher.on("error", (err) => log("watcher: %s", (err as Error).message));
    await new Promise<void>((r) => this.watcher!.once("ready", () => r()));
    this.emitEvent({ type: "ready", round, files: this.watched.size });
    return round;
  }

  private lastError: Error | undefined;

  private onChange(path: string): void {
    if (this.closed) return;
    this.pending.add(path);
    clearTimeout(this.timer);
    this.scheduled = true;
    this.timer = setTimeout(() => {
      this.scheduled = false;
      this.kick();
    }, this.opts.debounceMs ?? 150);
  }

  /** Starts a round for the pending changes, or queues one after the round that runs. */
  private kick(): void {
    if (this.running || this.closed || this.pending.size === 0) return;
    const files = [...this.pending].sort();
    this.pending.clear();
    this.emitEvent({ type: "change", files });
    this.running = this.round(files)
      .then(() => undefined)
      .finally(() => {
        this.running = undefined;
        // Changes made during the round: one more round for them.
        if (this.pending.size) this.kick();
      });
  }

  /** Waits until no round runs and none is pending (tests). */
  async idle(): Promise<void> {
    for (;;) {
      if (this.running) await this.running;
      else if (this.pending.size || this.scheduled) await new Promise((r) => setTimeout(r, (this.opts.debounceMs ?? 150) + 20));
      else return;
    }
  }

  private async round(files: string[]): Promise<WatchRound | undefined> {
    const n = ++this.rounds;
    const t0 = performance.now();
    this.emitEvent({ type: "round-start", round: n, files });
    try {
      const project = await loadProject({
        ...(this.opts.cwd ? { cwd: this.opts.cwd } : {}),
        ...(this.opts.config ? { configFile: this.opts.config } : {}),
        command: this.opts.command ?? "watch",
      });
      const graph = buildImageGraph(project.images);
      const nodes = await buildGraph(graph, {
        ...(this.opts.names ? { names: this.opts.names } : {}),
        root: project.root,
        snapshotsDir: project.snapshotsDir ?? homePaths().snapshots,
        lock: await openLock(project), // read each round: the file may have changed (a pull, build --update)
        handoff: this.opts.handoff ?? false,
        ...((this.opts.concurrency ?? project.concurrency) ? { concurrency: this.opts.concurrency ?? project.concurrency! } : {}),
        onEvent: (event) => this.emitEvent({ type: "build", event }),
      });
      const before = this.last?.nodes;
      const rekeyed = [...nodes.values()].filter((node) => before?.get(node.name)?.key !== node.key).map((node) => node.name);
      this.watchFiles(project, graph, nodes);
      // A round whose bakes failed is still the graph the files describe: the failed nodes are
      // reported and retried on the next change; images that did bake are used.
      this.last = { project, graph, nodes };
      const round: WatchRound = { round: n, changed: files, nodes, rekeyed, ms: Math.round(performance.now() - t0) };
      this.emitEvent({ type: "round-done", round });
      return round;
    } catch (err) {
      this.lastError = err as Error;
      log("round %d failed: %s", n, (err as Error).message);
      this.emitEvent({ type: "round-failed", round: n, error: err as Error });
      return undefined;
    }
  }

  /** Watches exactly what the keys were computed from, plus the config. */
  private watchFiles(project: LoadedProject, graph: ImageGraph, nodes: Map<string, BuiltNode>): void {
    const want = new Set<string>([project.configPath, ...project.dependencies]);
    // The directories image modules live in: a module added there (a glob may match it) or
    // removed changes the graph.
    for (const img of project.images) want.add(dirname(img.module));
    for (const node of nodes.values()) {
      for (const f of Object.keys(node.sources.files)) want.add(resolve(project.root, f));
      for (const x of graph.spec(node.name).extraFiles) want.add(resolve(x.hostPath));
    }
    const add = [...want].filter((f) => !this.watched.has(f));
    const drop = [...this.watched].filter((f) => !want.has(f));
    this.watched = want;
    if (this.watcher) {
      if (add.length) this.watcher.add(add);
      if (drop.length) this.watcher.unwatch(drop);
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    await this.watcher?.close();
    await this.running;
  }
}
