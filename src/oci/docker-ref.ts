/**
 * Registry references with Docker's grammar and defaults (the distribution/reference rules):
 *
 *   alpine                       → docker.io/library/alpine:latest
 *   ghcr.io/owner/img:tag        → registry ghcr.io, repository owner/img, tag
 *   localhost:5000/ns/name@sha256:<hex>
 *   name:tag@sha256:<hex>        → the digest decides what is pulled; the tag is kept for display
 *
 * A malformed reference is an error that shows the reference and names the part at fault.
 */
import { RefError } from "../errors.js";

export const DOCKER_HUB = "docker.io";
/** Where Docker Hub's registry API actually lives. */
export const DOCKER_HUB_API = "registry-1.docker.io";

export interface RegistryRef {
  /** Registry host, with port when given (`docker.io`, `localhost:5000`, `[::1]:5000`). */
  registry: string;
  /** Repository path inside the registry (`library/alpine`). */
  repository: string;
  tag: string | undefined;
  digest: string | undefined;
  /** Fully normalised form: `registry/repository[:tag][@digest]`. */
  canonical: string;
  /** What was written. */
  original: string;
}

const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const DOMAIN_LABEL = "(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])";
const DOMAIN = new RegExp(`^(?:${DOMAIN_LABEL}(?:\\.${DOMAIN_LABEL})*|\\[[0-9A-Fa-f:.]+\\])(?::[0-9]{1,5})?$`);
const TAG = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const DIGEST = /^sha256:[a-f0-9]{64}$/;
const ANY_DIGEST = /^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+$/;
const MAX_NAME = 255;

function bad(ref: string, what: string, hint?: string): RefError {
  return new RefError("REF_INVALID", `invalid image reference ${JSON.stringify(ref)}: ${what}`, {
    hint: hint ?? 'references look like "alpine", "alpine:3.20", "ghcr.io/owner/image:tag" or "name@sha256:<64 hex digits>"',
  });
}

/** True when the first path component names a registry rather than a namespace. */
function isDomain(first: string): boolean {
  return first.includes(".") || first.includes(":") || first === "localhost" || first !== first.toLowerCase();
}

export function parseDockerRef(ref: string): RegistryRef {
  if (ref.length === 0) throw bad(ref, "it is empty");
  if (/\s/.test(ref)) throw bad(ref, "it contains white space");

  let rest = ref;
  let digest: string | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!ANY_DIGEST.test(digest)) throw bad(ref, `the digest ${JSON.stringify(digest)} is malformed`, "a digest is sha256: followed by 64 lowercase hex digits");
    if (!DIGEST.test(digest)) {
      throw bad(ref, `the digest ${JSON.stringify(digest)} is not a sha256 digest of 64 lowercase hex digits`, "only sha256 digests are supported");
    }
  }

  // A tag follows the last ":" that comes after the last "/" (a ":" before it is a port).
  let tag: string | undefined;
  const slash = rest.lastIndexOf("/");
  const colon = rest.lastIndexOf(":");
  if (colon > slash) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG.test(tag)) {
      throw bad(ref, `the tag ${JSON.stringify(tag)} is not valid`, "a tag is up to 128 characters of letters, digits, _, . and -, not starting with . or -");
    }
  }
  if (rest === "") throw bad(ref, "the repository name is missing");

  const parts = rest.split("/");
  let registry = DOCKER_HUB;
  if (parts.length > 1 && isDomain(parts[0]!)) {
    registry = parts.shift()!;
    if (!DOMAIN.test(registry)) throw bad(ref, `the registry host ${JSON.stringify(registry)} is not a valid host[:port]`);
    const port = /:(\d+)$/.exec(registry)?.[1];
    if (port !== undefined && Number(port) > 65535) throw bad(ref, `the registry port ${port} is out of range`);
  }
  if (registry === "index.docker.io") registry = DOCKER_HUB;
  for (const c of parts) {
    if (c === "") throw bad(ref, "the repository path has an empty component");
    if (c !== c.toLowerCase() && COMPONENT.test(c.toLowerCase())) {
      throw bad(ref, `the repository name component ${JSON.stringify(c)} has upper-case letters`, "repository names must be lowercase");
    }
    if (!COMPONENT.test(c)) {
      throw bad(ref, `the repository name component ${JSON.stringify(c)} is not valid`, "name components are lowercase letters and digits, separated by ., _, __ or -");
    }
  }
  if (registry === DOCKER_HUB && parts.length === 1) parts.unshift("library");
  const repository = parts.join("/");
  if (registry.length + 1 + repository.length > MAX_NAME) throw bad(ref, `the name is longer than ${MAX_NAME} characters`);
  if (tag === undefined && digest === undefined) tag = "latest";

  const canonical = `${registry}/${repository}${tag !== undefined ? `:${tag}` : ""}${digest !== undefined ? `@${digest}` : ""}`;
  return { registry, repository, tag, digest, canonical, original: ref };
}

/** The host to send API requests to. */
export function apiHost(registry: string): string {
  return registry === DOCKER_HUB ? DOCKER_HUB_API : registry;
}

/** `registry/repository` without tag or digest, e.g. for listing. */
export function repoName(r: RegistryRef): string {
  return `${r.registry}/${r.repository}`;
}
