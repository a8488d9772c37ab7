import type { RegistryOptions } from "../registry/client.js";

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
}

export function makeReport(location: string, snapshots: TransferEntry[], t0: number): TransferReport {
  return {
    location,
    snapshots,
    chunksMoved: snapshots.reduce((a, s) => a + s.chunksMoved, 0),
    bytesMoved: snapshots.reduce((a, s) => a + s.bytesMoved, 0),
    ms: Math.round(performance.now() - t0),
  };
}
