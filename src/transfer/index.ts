/**
 * Snapshot transfer by key: baked snapshots exported to, and imported from, a directory (an OCI
 * image layout) or an OCI registry, as artifacts of packed chunks (docs/cache-format.md), so that a child
 * costs only the chunks it changed. `DEBUG=supermachine:transfer` logs each step. What a project
 * adds (its graph, this machine's engine) is in src/project/cache.ts.
 */
export { exportSnapshots, snapshotName } from "./export.js";
export { importImage, importSnapshots, type ImportOptions, type LocalEngine } from "./import.js";
export { openCache, parseCacheLocation, type CacheBackend, type CacheLocation } from "./backend.js";
export { CacheError } from "./errors.js";
export type { TransferEntry, TransferOptions, TransferProgress, TransferReport, TransferStatus } from "./report.js";
