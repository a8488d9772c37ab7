/**
 * Where snapshot artifacts are kept: a directory (an OCI image layout) or a repository of an OCI
 * registry. Both store content-addressed blobs and one manifest per snapshot key (found also by
 * its recipe key: the same image made on another host); the exporter and importer only speak
 * this interface.
 */
import type { RegistryOptions } from "../registry/client.js";
import { CacheError } from "./errors.js";
import type { ArtifactManifest } from "./format.js";

export interface CacheBackend {
  readonly kind: "dir" | "registry";
  /** For messages: the directory, or `host/repository`. */
  readonly location: string;
  /** Bytes the blob takes there, or undefined when it is not there. */
  blobSize(digest: string): Promise<number | undefined>;
  /** Stores a blob (the caller knows it is missing and that `data` hashes to `digest`). */
  writeBlob(digest: string, data: Buffer): Promise<void>;
  /** A blob's bytes (at most `limit`, else CACHE_TOO_LARGE), unverified; undefined when absent. */
  readBlob(digest: string, limit: number, what: string): Promise<Buffer | undefined>;
  /**
   * Bytes `start`..`end` (inclusive) of a blob, unverified; undefined when absent. A cache that
   * cannot serve a range gives the whole blob (at most `limit` bytes) with `start` 0.
   */
  readRange(digest: string, start: number, end: number, limit: number, what: string): Promise<{ bytes: Buffer; start: number } | undefined>;
  /** The manifest of snapshot `key` (unverified), or undefined. */
  readManifest(key: string): Promise<Buffer | undefined>;
  /**
   * Records the manifest of snapshot `key` (its blobs are all there already); `tagImage`: also
   * mark it as carrying its image's root filesystem unless another snapshot does already;
   * `recipeKey`: also record it under its recipe key (src/schema/host.ts), replacing the
   * snapshot of the same recipe made on another host.
   */
  writeManifest(key: string, bytes: Buffer, manifest: ArtifactManifest, opts: { tagImage: boolean; recipeKey?: string | undefined }): Promise<void>;
  /** The manifest of the snapshot last recorded under recipe key `recipeKey` (unverified), or undefined. */
  readRecipeManifest(recipeKey: string): Promise<Buffer | undefined>;
  /** A manifest of some snapshot that carries the root filesystem of image `digest`, if any. */
  readImageManifest(imageDigest: string): Promise<Buffer | undefined>;
  /** Blob operations at once that suit it (a registry gains from parallel requests). */
  readonly parallelism: number;
  /** Begins `n` uploads ahead of the blobs that will use them (a registry: their round trips overlap packing). */
  prepareUploads?(n: number): void;
  /** Ends what `prepareUploads` began and no blob used. */
  finish?(): Promise<void>;
  /** Requests sent so far (a registry), for reports. */
  readonly requests: number | undefined;
  close(): void;
}

export { parseCacheLocation, type CacheLocation } from "../oci/cache-location.js";
import { parseCacheLocation } from "../oci/cache-location.js";

/** Opens a cache for reading and writing. */
export async function openCache(loc: string, opts: RegistryOptions & { cwd?: string } = {}): Promise<CacheBackend> {
  const parsed = parseCacheLocation(loc, opts.cwd);
  if (parsed.kind === "dir") {
    const { DirBackend } = await import("./dir.js");
    return new DirBackend(parsed.path);
  }
  const { RegistryBackend } = await import("./registry.js");
  return new RegistryBackend(parsed.registry, parsed.repository, opts);
}
