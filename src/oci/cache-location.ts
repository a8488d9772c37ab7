/**
 * Where a snapshot cache is (src/transfer): a directory or a registry repository. Parsing only,
 * here with the reference grammar, so that the config loader can check `cache.from`/`cache.to`
 * (naming the file) without depending on the transfer code.
 */
import { resolve } from "node:path";
import { CacheError } from "../errors.js";
import { parseDockerRef } from "./docker-ref.js";

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

