/**
 * Where snapshot artifacts are kept: a directory (an OCI image layout) or a repository of an OCI
 * registry. Both store content-addressed blobs and one manifest per snapshot key; the exporter
 * and importer only speak this interface.
 */
import { resolve } from "node:path";
import { parseDockerRef } from "../oci/docker-ref.js";
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
  /** Whether the cache has the manifest of snapshot `key`. */
  hasSnapshot(key: string): Promise<boolean>;
  /** The manifest of snapshot `key` (unverified), or undefined. */
  readManifest(key: string): Promise<Buffer | undefined>;
  /** Records the manifest of snapshot `key` (its blobs are all there already). */
  writeManifest(key: string, bytes: Buffer, manifest: ArtifactManifest): Promise<void>;
  /** A manifest of some snapshot that carries the root filesystem of image `digest`, if any. */
  readImageManifest(imageDigest: string): Promise<Buffer | undefined>;
  /** Blob operations at once that suit it (a registry gains from parallel requests). */
  readonly parallelism: number;
  close(): void;
}

export type CacheLocation = { kind: "dir"; path: string } | { kind: "registry"; registry: string; repository: string };

/**
 * A cache location: a directory (absolute, `./`-relative, or any string that is not a registry
 * reference) or a registry repository `host[:port]/repo` (`docker://` may prefix it). A bare
 * name's first component is a host when it has a `.` or a `:` or is `localhost`, as in Docker.
 */
export function parseCacheLocation(loc: string, cwd: string = process.cwd()): CacheLocation {
  if (loc.trim() === "") throw new CacheError("CACHE_LOCATION_INVALID", "the cache location is empty", { hint: "give a directory or a registry repository host[:port]/repo" });
  const forced = loc.startsWith("docker://");
  const bare = forced ? loc.slice("docker://".length) : loc;
  const first = bare.split("/")[0]!;
  const hostLike = bare.includes("/") && (first.includes(".") || first.includes(":") || first === "localhost") && !/^\.{1,2}$/.test(first);
  if (!forced && (loc.startsWith("/") || loc.startsWith(".") || loc.startsWith("~") || !hostLike)) {
    return { kind: "dir", path: resolve(cwd, loc.startsWith("~/") ? `${process.env.HOME ?? "~"}/${loc.slice(2)}` : loc) };
  }
  let ref;
  try {
    ref = parseDockerRef(bare);
  } catch (cause) {
    throw new CacheError("CACHE_LOCATION_INVALID", `cache location ${JSON.stringify(loc)} is not a registry repository: ${(cause as Error).message}`, {
      cause,
      hint: "a registry cache is host[:port]/repository (no tag: each snapshot gets its own tag); a directory starts with / or ./",
    });
  }
  const lastPart = bare.slice(bare.lastIndexOf("/") + 1);
  if (ref.digest !== undefined || lastPart.includes(":")) {
    throw new CacheError("CACHE_LOCATION_INVALID", `cache location ${JSON.stringify(loc)} names a tag or digest`, {
      hint: `give the repository alone (${ref.registry}/${ref.repository}): each snapshot is tagged sm-<key>`,
    });
  }
  return { kind: "registry", registry: ref.registry, repository: ref.repository };
}

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
