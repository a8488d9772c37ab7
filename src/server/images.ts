/**
 * The project's images as the serve page shows them (`GET /v1/images`, `.../why`, `.../log`):
 * the graph with each image's key, whether it is baked, its snapshot's size, the pools that use
 * it and its build's last status; why an image would rebake (or did, in watch mode); its last
 * bake log. Computed by a dry run (what `supermachine ls` does), kept until a bake or a watch
 * round may have changed it, and shared by the requests that come meanwhile.
 */
import { readdir, readFile } from "node:fs/promises";
import { join, relative } from "node:path";
import { loadProject } from "../config/loader.js";
import { buildImageGraph, type ImageGraph } from "../graph/graph.js";
import { diffInputs, type InputChange } from "../graph/keys.js";
import { homePaths } from "../paths.js";
import { inspectProjectImages, whyImage, type WhyReport } from "../project/inspect.js";
import { openLock, type ProjectLock } from "../project/lock.js";
import type { BuiltNode } from "../project/build.js";
import type { LoadedProject } from "../schema/project.js";
import { SNAPSHOT_FILES, snapshotsOf } from "../store/snapshots.js";
import { ServerError } from "./errors.js";
import type { BuildLog, BuildStatus } from "./native/state.js";
import type { ServerEvents } from "./events.js";

export interface ImageView {
  name: string;
  parent: string | null;
  children: string[];
  ref: string | null;
  module: string | null;
  key: string | null;
  cached: boolean;
  sizeBytes: number | null;
  pools: string[];
  build: (Omit<BuildStatus, "name" | "key"> & { step: string | null }) | null;
}

export interface ImagesReport {
  project: { config: string; root: string } | null;
  images: ImageView[];
  updatedAt: string;
}

/** An image's key changed between two dry runs of this server (a watch round rebaked it). */
export interface Rebake {
  at: string;
  from: string;
  to: string;
  changes: InputChange[];
}

interface Opened {
  project: LoadedProject;
  graph: ImageGraph;
  lock: ProjectLock;
  snapshotsDir: string;
}

interface Listing {
  report: Omit<ImagesReport, "images"> & { images: Omit<ImageView, "build">[] };
  nodes: Map<string, BuiltNode>;
}

export class ProjectImages {
  private current: Promise<Listing> | undefined;
  /** The last listing that succeeded, to tell which keys changed. */
  private last: Listing | undefined;
  private readonly rebakes = new Map<string, Rebake>();

  /**
   * `source` says where the project is (undefined: the server was given its pools, and has no
   * project to show). The view is recomputed after each build's end and watch round.
   */
  constructor(
    private readonly source: { cwd?: string; config?: string } | undefined,
    private readonly builds: BuildLog,
    private readonly events: ServerEvents,
  ) {}

  /** Forget the listing: the next request computes it again. */
  invalidate(): void {
    this.current = undefined;
  }

  private async open(): Promise<Opened> {
    const project = await loadProject({ ...(this.source?.cwd ? { cwd: this.source.cwd } : {}), ...(this.source?.config ? { configFile: this.source.config } : {}), command: "serve" });
    // Root images resolve from what is here: showing the graph never pulls an image (a node of a
    // fleet serves few of them; a pool's images are here once it is open). The key depends on the
    // digest, not on the policy.
    const images = project.images.map((i) => (i.from === null ? { ...i, definition: { ...i.definition, pullPolicy: "never" as const } } : i));
    return { project, graph: buildImageGraph(images), lock: await openLock(project), snapshotsDir: project.snapshotsDir ?? homePaths().snapshots };
  }

  private listing(): Promise<Listing> {
    if (!this.current) {
      const p = this.compute();
      this.current = p;
      // A failed computation is not kept: the next request tries again.
      p.catch(() => {
        if (this.current === p) this.current = undefined;
      });
    }
    return this.current;
  }

  private async compute(): Promise<Listing> {
    const { project, graph, lock, snapshotsDir } = await this.open();
    const inspected = await inspectProjectImages(graph, { root: project.root, snapshotsDir, lock });
    const poolsOf = new Map<string, string[]>();
    for (const [pool, decl] of Object.entries(project.pools)) poolsOf.set(decl.image, [...(poolsOf.get(decl.image) ?? []), pool]);
    const nodes = new Map(inspected.map((i) => [i.listing.name, i.node]));
    const previous = this.last?.nodes;
    for (const [name, node] of nodes) {
      const before = previous?.get(name);
      if (before?.key && node.key && before.key !== node.key) {
        this.rebakes.set(name, { at: new Date().toISOString(), from: before.key, to: node.key, changes: diffInputs(before, node) });
      }
    }
    const listing: Listing = {
      report: {
        project: { config: project.configPath, root: project.root },
        updatedAt: new Date().toISOString(),
        images: inspected.map(({ listing: l }) => {
          const spec = graph.spec(l.name);
          return {
            name: l.name,
            parent: l.parent,
            children: graph.children(l.name),
            ref: spec.ref ?? null,
            // Relative to the project's root, as people name the files.
            module: spec.module ? relative(project.root, spec.module) || spec.module : null,
            // An image that cannot be keyed here (its root image is not local) has none.
            key: l.key || null,
            cached: l.cached,
            sizeBytes: l.sizeBytes,
            pools: poolsOf.get(l.name) ?? [],
          };
        }),
      },
      nodes,
    };
    this.last = listing;
    return listing;
  }

  async list(): Promise<ImagesReport> {
    if (!this.source) return { project: null, images: [], updatedAt: new Date().toISOString() };
    const { report } = await this.listing();
    const builds = new Map(this.builds.list().map((b) => [b.name, b]));
    return {
      ...report,
      images: report.images.map((img) => {
        const b = builds.get(img.name);
        return { ...img, build: b ? { status: b.status, step: b.status === "building" ? (this.events.stepOf(img.name) ?? null) : null, updatedAt: b.updatedAt, ms: b.ms, error: b.error } : null };
      }),
    };
  }

  private async require(name: string, what: string): Promise<Opened> {
    if (!this.source) throw new ServerError("SERVER_NOT_FOUND", `${what}: this server was given its pools and has no project`, { hint: "start it on a project (supermachine serve in the project's directory)" });
    const opened = await this.open();
    if (!opened.graph.order.includes(name)) {
      throw new ServerError("SERVER_NOT_FOUND", `${what}: the project has no image ${JSON.stringify(name)} (it has ${opened.graph.order.map((n) => JSON.stringify(n)).join(", ") || "none"})`, {
        hint: "GET /v1/images lists the project's images",
      });
    }
    return opened;
  }

  /** `why` for one image, and what changed the last time this server saw its key change. */
  async why(name: string, what: string): Promise<WhyReport & { lastRebake: Rebake | null }> {
    const { project, graph, lock, snapshotsDir } = await this.require(name, what);
    let report: WhyReport;
    try {
      report = await whyImage(graph, name, { root: project.root, snapshotsDir, lock });
    } catch (err) {
      // Its key cannot be computed here (the listing never pulls: its root image is not local).
      throw new ServerError("SERVER_CONFLICT", `${what}: ${JSON.stringify(name)} cannot be keyed on this server: ${(err as Error).message}`, {
        hint: "its root image is not on this host: build the project here (supermachine build) or import it from the cache",
        cause: err,
      });
    }
    return { ...report, lastRebake: this.rebakes.get(name) ?? null };
  }

  /**
   * The log of the bake the image runs from: of its snapshot when it is baked with its current
   * key; otherwise of its last bake, a failed one (kept under `<home>/logs`) or the newest
   * snapshot of that name. Undefined when there is none.
   */
  async log(name: string, what: string): Promise<string | undefined> {
    const { snapshotsDir } = await this.require(name, what);
    const node = (await this.listing()).nodes.get(name);
    if (node?.status === "cached") {
      const text = await readFile(join(node.dir, SNAPSHOT_FILES.log), "utf8").catch(() => undefined);
      if (text !== undefined) return text;
    }
    const newest = (await snapshotsOf(snapshotsDir, name))[0];
    const failed = await newestFailedBakeLog(name);
    if (failed && (!newest || failed.at > newest.meta.created)) return readFile(failed.path, "utf8");
    if (!newest) return undefined;
    return readFile(join(newest.dir, SNAPSHOT_FILES.log), "utf8").catch(() => undefined);
  }
}

/** The newest `bake-<name>-<stamp>-<rand>.log` under `<home>/logs`, with its time as ISO text. */
async function newestFailedBakeLog(name: string): Promise<{ path: string; at: string } | undefined> {
  const prefix = `bake-${name.replace(/[^A-Za-z0-9_.-]/g, "_")}-`;
  const dir = homePaths().logs;
  const names = await readdir(dir).catch(() => [] as string[]);
  // The stamp is an ISO time with ':' and '.' made '-': 2026-12-06T08-30-00-000Z.
  const stamped = names
    .filter((n) => n.startsWith(prefix) && n.endsWith(".log"))
    .map((n) => ({ n, m: /^(\d{4}-\d{2}-\d{2})T(\d{2})-(\d{2})-(\d{2})-(\d{3})Z-[0-9a-f]+\.log$/.exec(n.slice(prefix.length)) }))
    .filter((x) => x.m !== null)
    .map(({ n, m }) => ({ path: join(dir, n), at: `${m![1]}T${m![2]}:${m![3]}:${m![4]}.${m![5]}Z` }))
    .sort((a, b) => b.at.localeCompare(a.at));
  return stamped[0];
}
