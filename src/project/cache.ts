/**
 * A project's side of the snapshot cache (src/transfer/ moves snapshots by key and knows nothing
 * of graphs or engines): imports checked against this machine's engine, the `fetch` hook a build
 * uses to import a node before baking it, and the root filesystems a graph's root images need.
 */
import { dirname } from "node:path";
import { logger } from "../debug.js";
import { chooseAccel } from "../engine/accel.js";
import { engineFingerprint } from "../engine/fingerprint.js";
import type { ImageGraph } from "../graph/graph.js";
import { pinnableRef, platformOf, type RefPins } from "../image/pins.js";
import { localImageDigest } from "../image/resolve.js";
import type { FetchRequest } from "../schema/events.js";
import { exportSnapshots as exportFrom, importImage, importSnapshots as importInto, openCache } from "../transfer/index.js";
import type { ImportOptions, LocalEngine, TransferOptions, TransferReport } from "../transfer/report.js";
import { readSigningKey, type CacheTrust, type SigningKey } from "../transfer/sign.js";

const log = logger("transfer");

/** @internal This machine's engine, which every imported snapshot must match. */
export const localEngine: LocalEngine = { fingerprint: engineFingerprint, accelNow: () => chooseAccel().accel };

/**
 * Exports baked snapshots (each given by its directory: `image.snapshotPath`, a build's node
 * `dir`), with the snapshots they were baked on, into `dest` (a directory or a registry
 * repository `host[:port]/repo`). A snapshot the cache has already (by key) is not read.
 */
export function exportSnapshots(dest: string, snapshots: Array<{ dir: string }>, opts: TransferOptions = {}): Promise<TransferReport> {
  return exportFrom(dest, snapshots, opts);
}

/**
 * Imports the snapshots `keys` (and the ancestors they were baked on, parents first) from `src`
 * (a directory or a registry repository), checked against this machine's engine. Each is
 * `imported`, `present` (this machine has it: nothing moved) or `missing` (the cache lacks it).
 */
export function importSnapshots(src: string, keys: string[], opts: Omit<ImportOptions, "engine"> = {}): Promise<TransferReport> {
  return importInto(src, keys, { ...opts, engine: localEngine });
}

/**
 * A `BuildOptions.fetch` hook: a node that is not baked here is imported from `src` (a
 * directory or a registry repository) into the build's directory for it, if a key in `trust`
 * signed it (or any, with `"unsigned"`) and it runs exactly what the build computed for the
 * node. Resolves false when the cache does not have it, throws SNAPSHOT_HOST_MISMATCH when it
 * has the image only as made on another host (another QEMU, machine type, accelerator or CPU:
 * found by its recipe key), and the CacheError or RegistryError when it cannot be imported; a build then bakes the node (reporting the error as
 * its `cacheError`), or, frozen, fails it with that error.
 */
export function fetchFromCache(src: string, snapshotsDir?: string, opts: TransferOptions & { trust?: CacheTrust | undefined } = {}): (req: FetchRequest) => Promise<boolean> {
  return async (req) => {
    const { trust, ...rest } = opts;
    const report = await importSnapshots(src, [req.key], {
      ...rest,
      ...(trust !== undefined ? { trust } : {}),
      snapshotsDir: snapshotsDir ?? dirname(req.dir),
      dirs: new Map([[req.key, req.dir]]),
      recipes: new Map([[req.key, req.recipeKey]]),
      expect: new Map([[req.key, req.expect]]),
    });
    const entry = report.snapshots.find((s) => s.key === req.key);
    log("fetch %s (%s) from %s: %s", req.name, req.key.slice(0, 16), src, entry?.status ?? "?");
    return entry?.status === "imported" || entry?.status === "present";
  };
}

/**
 * @internal Before a build that may import from `src`: the root filesystems of the graph's root images
 * that this machine lacks are published from the cache (when a snapshot there was made on them),
 * so that resolving a root image finds it built and byte for byte the one its snapshots were
 * made on. Only images whose manifest digest is known locally (builtin:, oci:, registry
 * references pulled before, and tags the project's lockfile pins) can be matched; the rest
 * resolve as usual.
 */
export async function seedImages(src: string, graph: ImageGraph, names?: string[], opts: TransferOptions & { pins?: RefPins | undefined; trust?: CacheTrust | undefined } = {}): Promise<number> {
  const order = names?.length ? graph.withAncestors(names) : graph.order;
  const roots = order.map((n) => graph.spec(n)).filter((s) => s.parent === null);
  const digests = new Set<string>();
  for (const spec of roots) {
    // A pinned tag is known without the network, also in a fresh home that never pulled it.
    const pinned = pinnableRef(spec.ref) !== undefined ? opts.pins?.get(spec.ref, platformOf(spec.platform)) : undefined;
    const d = pinned ?? (await localImageDigest(spec.ref));
    if (d) digests.add(d);
  }
  if (digests.size === 0) return 0;
  const backend = await openCache(src, opts.registry ?? {});
  let n = 0;
  try {
    for (const d of digests) {
      try {
        if (await importImage(backend, d, opts.trust ?? [])) n++;
      } catch (err) {
        // The image then resolves as usual (built or pulled); the cache's snapshots of it are
        // still tried, node by node.
        const code = (err as { code?: unknown }).code;
        if (typeof code !== "string" || !/^(CACHE|REGISTRY)_/.test(code)) throw err;
        log("root filesystem %s not taken from %s: %s", d, src, (err as Error).message);
      }
    }
  } finally {
    backend.close();
  }
  if (n) log("published %d root filesystem(s) from %s", n, src);
  return n;
}

/** The environment variable that gives the cache signing key (a path, or the PEM itself): CI secrets come this way. */
export const SIGNING_KEY_ENV = "SUPERMACHINE_CACHE_SIGNING_KEY";

/**
 * The key exports are signed with: `SUPERMACHINE_CACHE_SIGNING_KEY` when set, else the config's
 * `cache.signingKey` (a file), else none (exports are unsigned).
 */
export function cacheSigningKey(configured: string | undefined): SigningKey | undefined {
  const env = process.env[SIGNING_KEY_ENV];
  if (env) return readSigningKey(env, `$${SIGNING_KEY_ENV}`);
  return configured ? readSigningKey(configured, `cache.signingKey (${configured})`) : undefined;
}
