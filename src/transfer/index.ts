/**
 * Snapshot transfer by key: baked snapshots exported to, and imported from, a directory (an OCI
 * image layout) or an OCI registry, as chunked artifacts (docs/cache-format.md), so that a child
 * costs only the chunks it changed. `DEBUG=supermachine:transfer` logs each step.
 */
import { dirname } from "node:path";
import type { FetchRequest } from "../project/build.js";
import type { ImageGraph } from "../graph/graph.js";
import { parseImageRef, locateLayout } from "../image/reference.js";
import { readRef } from "../image/local-names.js";
import { logger } from "../debug.js";
import { selectManifest } from "../oci/oci-layout.js";
import { openCache } from "./backend.js";
import { importImage, importSnapshots } from "./import.js";
import type { TransferOptions } from "./report.js";

export { exportSnapshots, snapshotName } from "./export.js";
export { importSnapshots, type ImportOptions } from "./import.js";
export { openCache, parseCacheLocation, type CacheBackend, type CacheLocation } from "./backend.js";
export { CacheError } from "./errors.js";
export type { TransferEntry, TransferOptions, TransferProgress, TransferReport, TransferStatus } from "./report.js";

const log = logger("transfer");

/**
 * A `BuildOptions.fetch` hook: a node that is not baked here is imported from `src` (a
 * directory or a registry repository) into the build's directory for it. Resolves false when
 * the cache does not have it; a cache entry that fails verification fails the node.
 */
export function fetchFromCache(src: string, snapshotsDir?: string, opts: TransferOptions = {}): (req: FetchRequest) => Promise<boolean> {
  return async (req) => {
    const report = await importSnapshots(src, [req.key], { ...opts, snapshotsDir: snapshotsDir ?? dirname(req.dir), dirs: new Map([[req.key, req.dir]]) });
    const entry = report.snapshots.find((s) => s.key === req.key);
    log("fetch %s (%s) from %s: %s", req.name, req.key.slice(0, 16), src, entry?.status ?? "?");
    return entry?.status === "imported" || entry?.status === "present";
  };
}

/**
 * Before a build that may import from `src`: the root filesystems of the graph's root images
 * that this machine lacks are published from the cache (when a snapshot there was made on them),
 * so that resolving a root image finds it built and byte for byte the one its snapshots were
 * made on. Only images whose manifest digest is known locally (builtin:, oci:, and registry
 * references pulled before) can be matched; the rest resolve as usual.
 */
export async function seedImages(src: string, graph: ImageGraph, names?: string[], opts: TransferOptions = {}): Promise<number> {
  const order = names?.length ? graph.withAncestors(names) : graph.order;
  const refs = [...new Set(order.filter((n) => graph.spec(n).parent === null).map((n) => graph.spec(n).ref))];
  const digests = new Set<string>();
  for (const ref of refs) {
    const d = await localImageDigest(ref);
    if (d) digests.add(d);
  }
  if (digests.size === 0) return 0;
  const backend = await openCache(src, opts.registry ?? {});
  let n = 0;
  try {
    for (const d of digests) if (await importImage(backend, d)) n++;
  } finally {
    backend.close();
  }
  if (n) log("published %d root filesystem(s) from %s", n, src);
  return n;
}

/** The manifest digest `ref` resolves to, when that is known without the network. */
async function localImageDigest(ref: string): Promise<string | undefined> {
  try {
    const parsed = parseImageRef(ref);
    if (parsed.kind === "oci" || parsed.kind === "builtin") {
      const loc = locateLayout(parsed);
      return (await selectManifest(loc.layoutDir, ref, loc.tag)).digest;
    }
    if (parsed.kind === "registry" && parsed.registry.digest === undefined) return (await readRef(parsed.registry.canonical))?.manifestDigest;
  } catch (err) {
    log("%s: no local manifest digest (%s)", ref, (err as Error).message);
  }
  return undefined;
}
