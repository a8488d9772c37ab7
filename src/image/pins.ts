/**
 * Pins of image references: what a project's lockfile (src/project/lock.ts) records for a root
 * image whose `ref` names a registry tag, and the questions the build asks of it. Only a registry
 * reference with a tag (written, or the implied `latest`) is pinned: a reference written with
 * `@sha256:` names its manifest already, and local references (`builtin:`, `oci:`,
 * `docker-archive:`) are read from files on this machine, whose digest the key records anyway.
 * No I/O here: the lockfile is read and written by the project layer.
 */
import { TARGET_PLATFORM } from "../oci/oci-layout.js";
import { parseImageRef } from "./reference.js";

/** One pin: a tag as written, for one platform, resolved to an image manifest. */
export interface Pin {
  /** The reference as the image declares it (`python:3-bookworm`). */
  ref: string;
  /** `os/arch[/variant]`, as the image's `platform` option (default: linux/<host arch>). */
  platform: string;
  /** The image manifest (never an index) the tag resolved to for that platform. */
  digest: string;
  /** The canonical name the tag was resolved as (`docker.io/library/python:3-bookworm`). */
  resolved: string;
}

/** What a build asks of a project's pins (a ProjectLock; absent outside a project). */
export interface RefPins {
  /** The lockfile, for messages. */
  readonly file: string;
  /** The digest `ref` is pinned to for `platform`, if it is. */
  get(ref: string, platform: string): string | undefined;
  /** A tag resolved without a pin: the pin to write at the end of the build. */
  record(pin: Pin): void;
}

/** The platform an image's `platform` option selects (its default: linux and the host's architecture). */
export function platformOf(platform: string | undefined): string {
  return platform ?? `${TARGET_PLATFORM.os}/${TARGET_PLATFORM.architecture}`;
}

/** `os/arch[/variant]` as the registry client selects it. */
export function parsePlatform(v: string): { os: string; architecture: string; variant?: string } {
  const [os = "", architecture = "", variant] = v.split("/");
  return variant ? { os, architecture, variant } : { os, architecture };
}

/**
 * The canonical name of `ref` when it is a registry reference with a tag and no digest (what a
 * lockfile pins); undefined for anything else, an invalid reference included (resolving it
 * reports that).
 */
export function pinnableRef(ref: string): string | undefined {
  try {
    const parsed = parseImageRef(ref);
    return parsed.kind === "registry" && parsed.registry.digest === undefined ? parsed.registry.canonical : undefined;
  } catch {
    return undefined;
  }
}
