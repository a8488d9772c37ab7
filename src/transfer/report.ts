import type { RegistryOptions } from "../registry/options.js";
import type { Accel, EngineFingerprint } from "../schema/key.js";
import type { CacheTrust, SigningKey } from "./sign.js";

export type TransferStatus = "exported" | "present" | "imported" | "missing";

export interface TransferEntry {
  name: string;
  key: string;
  status: TransferStatus;
  /** Distinct chunk blobs the snapshot is made of (guest RAM and root filesystem). */
  chunks: number;
  /** Chunk blobs that actually moved (the rest were there already, or copied locally). */
  chunksMoved: number;
  /** Every byte that moved: chunks, state, indexes, metadata, manifest. */
  bytesMoved: number;
}

export interface TransferReport {
  /** The cache: a directory, or `host/repository`. */
  location: string;
  snapshots: TransferEntry[];
  chunksMoved: number;
  bytesMoved: number;
  /** HTTP requests sent to a registry cache (absent for a directory). */
  requests?: number;
  ms: number;
}

export type TransferProgress =
  | { type: "start"; name: string; key: string }
  | { type: "chunks"; name: string; key: string; done: number; moved: number }
  | { type: "done"; entry: TransferEntry };

export interface TransferOptions {
  onProgress?: (p: TransferProgress) => void;
  signal?: AbortSignal;
  /** Registry settings (insecure registries, CA, credentials), as for pulls. */
  registry?: RegistryOptions;
  /** Export: sign every manifest written with this key (see ./sign.ts). */
  signingKey?: SigningKey;
}

/**
 * This machine's engine, which an imported snapshot must match: its fingerprint under an
 * accelerator, and the accelerator VMs would use now. Given by the caller (src/project/cache.ts
 * passes the engine's), so that the transfer code never probes the host itself.
 */
export interface LocalEngine {
  fingerprint(accel: Accel): EngineFingerprint;
  accelNow(): Accel;
}

export interface ImportOptions extends TransferOptions {
  /**
   * Which snapshots are accepted: those signed by one of these public keys (`ed25519:<base64>`),
   * or any with `"unsigned"`. Default: none (every snapshot is refused until a key is trusted).
   */
  trust?: CacheTrust;
  /** The engine snapshots must have been made by. */
  engine: LocalEngine;
  /** Where snapshots go (default `$SUPERMACHINE_HOME/snapshots`), as `<name>-<key[0:16]>`. */
  snapshotsDir?: string;
  /**
   * @internal The recipe key of a key (src/schema/host.ts): when the cache lacks the key but has
   * its recipe, made on another host, the import fails with SNAPSHOT_HOST_MISMATCH naming how
   * that host differs, instead of reporting the snapshot `missing`.
   */
  recipes?: Map<string, string>;
  /** @internal Where a given key must be published (a build's directory for it). */
  dirs?: Map<string, string>;
  /**
   * @internal What the importer computed itself for a key (a build's node): the snapshot's
   * workload and image must be these, not only its key.
   */
  expect?: Map<string, ExpectedSnapshot>;
}

/** What a snapshot must run, as the importing project computes it. */
export interface ExpectedSnapshot {
  /** The workload spec (argv, env, cwd, user) or null. */
  workload: unknown;
  image: { digest: string; config: unknown };
}

export function makeReport(cache: { location: string; requests: number | undefined }, snapshots: TransferEntry[], t0: number): TransferReport {
  return {
    location: cache.location,
    snapshots,
    chunksMoved: snapshots.reduce((a, s) => a + s.chunksMoved, 0),
    bytesMoved: snapshots.reduce((a, s) => a + s.bytesMoved, 0),
    ...(cache.requests !== undefined ? { requests: cache.requests } : {}),
    ms: Math.round(performance.now() - t0),
  };
}
