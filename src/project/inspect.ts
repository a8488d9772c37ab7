/**
 * Reports on a project's images without baking anything: `ls` (key, parent, cached, size) and
 * `why` (what changed since the last bake of an image, input by input).
 */
import type { ImageGraph } from "../graph/graph.js";
import { diffInputs, type InputChange } from "../graph/keys.js";
import { diskUsage, snapshotsOf } from "../store/snapshots.js";
import { buildGraph, type BuildOptions, type BuiltNode } from "./build.js";

export interface ImageListing {
  name: string;
  key: string;
  parent: string | null;
  cached: boolean;
  /** Bytes on disk of its snapshot, when cached. */
  sizeBytes: number | null;
  snapshot: string | null;
}

/**
 * With `lock`, root images resolve their tags by the project's pins (read only: a dry run writes
 * none). `onEvent` sees the dry run's events: a `done` event with a failed node says why an image
 * has no key.
 */
type InspectOptions = Pick<BuildOptions, "snapshotsDir" | "root" | "dirName" | "concurrency" | "lock" | "onEvent">;

/** Every image (or `names` and their ancestors) with its current key and whether it is baked. */
export async function listProjectImages(graph: ImageGraph, opts: InspectOptions & { names?: string[] } = {}): Promise<ImageListing[]> {
  return (await inspectProjectImages(graph, opts)).map((i) => i.listing);
}

/** As listProjectImages, with each image's node of the dry run (its key's inputs and sources). */
export async function inspectProjectImages(graph: ImageGraph, opts: InspectOptions & { names?: string[] } = {}): Promise<{ listing: ImageListing; node: BuiltNode }[]> {
  const nodes = await buildGraph(graph, { ...opts, dryRun: true });
  const out: { listing: ImageListing; node: BuiltNode }[] = [];
  for (const n of nodes.values()) {
    const cached = n.status === "cached";
    out.push({ listing: { name: n.name, key: n.key, parent: n.parent, cached, sizeBytes: cached ? await diskUsage(n.dir) : null, snapshot: cached ? n.dir : null }, node: n });
  }
  return out;
}

export interface WhyReport {
  name: string;
  key: string;
  /** Baked with the current key: nothing to explain. */
  cached: boolean;
  /** The last bake compared with (null: the image was never baked here). */
  lastBake: { key: string; dir: string; created: string } | null;
  changes: InputChange[];
}

/** Compares an image's key inputs now with those of its last bake and names each change. */
export async function whyImage(graph: ImageGraph, name: string, opts: InspectOptions & { snapshotsDir: string }): Promise<WhyReport> {
  const nodes = await buildGraph(graph, { ...opts, names: [name], dryRun: true });
  const node = nodes.get(name) as BuiltNode;
  if (node.error) throw node.error;
  const base = { name, key: node.key, cached: node.status === "cached" };
  const last = (await snapshotsOf(opts.snapshotsDir, name)).find((s) => s.meta.hash !== node.key);
  if (base.cached) {
    return { ...base, lastBake: { key: node.key, dir: node.dir, created: node.snapshot?.meta.created ?? "" }, changes: [] };
  }
  if (!last) return { ...base, lastBake: null, changes: [] };
  return {
    ...base,
    lastBake: { key: last.meta.hash, dir: last.dir, created: last.meta.created },
    changes: diffInputs({ inputs: last.meta.inputs, sources: last.meta.sources }, { inputs: node.inputs, sources: node.sources }),
  };
}
