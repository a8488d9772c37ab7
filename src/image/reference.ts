import { statSync } from "node:fs";
import { resolve } from "node:path";
import { ImageError, RefError, listAccepted } from "../errors.js";
import { BUILTIN_IMAGES, builtinLayoutDir, isBuiltinImage, type BuiltinImageName } from "./builtin-busybox.js";
import { parseDockerRef, type RegistryRef } from "../oci/docker-ref.js";

/** The reference forms this version understands, as shown in error messages. */
export const ACCEPTED_REF_FORMS = [
  "[registry[:port]/]name[:tag][@sha256:<digest>]",
  "oci:<dir>[:<tag>]",
  "docker-archive:<file.tar>[:<name:tag>]",
  "builtin:<name>",
] as const;

/** A parsed image reference. */
export type ImageRef =
  | { kind: "oci"; ref: string; dir: string; tag?: string }
  | { kind: "builtin"; ref: string; name: BuiltinImageName }
  | { kind: "registry"; ref: string; registry: RegistryRef }
  | { kind: "docker-archive"; ref: string; file: string; name?: string };



/** A reference pointing at an OCI image layout on disk, plus the tag to select (if any). */
export interface LayoutLocation {
  ref: string;
  /** Absolute path of the OCI image layout directory. */
  layoutDir: string;
  tag?: string;
}

/** Tag syntax of the OCI distribution spec; anything else after the last ":" belongs to the dir. */
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;

/**
 * Parses `oci:<dir>[:<tag>]` or `builtin:<name>`. A trailing `:<tag>` is recognised only when it
 * is a valid tag without a slash, so `oci:/a:b` means dir `/a`, tag `b`. Relative dirs resolve
 * against `cwd`.
 */
export function parseImageRef(ref: string, cwd: string = process.cwd()): ImageRef {
  if (ref.startsWith("oci:")) {
    const rest = ref.slice("oci:".length);
    let dir = rest;
    let tag: string | undefined;
    const colon = rest.lastIndexOf(":");
    if (colon > 0) {
      const candidate = rest.slice(colon + 1);
      if (TAG_RE.test(candidate)) {
        dir = rest.slice(0, colon);
        tag = candidate;
      }
    }
    if (dir === "") {
      throw new RefError("REF_INVALID", `image reference ${JSON.stringify(ref)} has no directory after "oci:"`, {
        hint: 'write it as "oci:<dir>" or "oci:<dir>:<tag>", e.g. oci:./alpine:latest',
      });
    }
    const parsed: ImageRef = { kind: "oci", ref, dir: resolve(cwd, dir) };
    if (tag !== undefined) parsed.tag = tag;
    return parsed;
  }
  if (ref.startsWith("builtin:")) {
    const name = ref.slice("builtin:".length);
    if (!isBuiltinImage(name)) {
      throw new RefError("REF_UNKNOWN_BUILTIN", `unknown built-in image ${JSON.stringify(name)} in reference ${JSON.stringify(ref)}`, {
        hint: `built-in images: ${listAccepted(BUILTIN_IMAGES.map((n) => `builtin:${n}`))}`,
      });
    }
    return { kind: "builtin", ref, name };
  }
  if (ref.startsWith("docker-archive:")) {
    const rest = ref.slice("docker-archive:".length);
    // The file ends at the first ":" after ".tar" when a name follows (`file.tar:busybox:latest`).
    const m = /^(.*?\.tar)(?::(.+))?$/.exec(rest);
    const file = m ? m[1]! : rest;
    const name = m?.[2];
    if (file === "") {
      throw new RefError("REF_INVALID", `image reference ${JSON.stringify(ref)} has no file after "docker-archive:"`, {
        hint: 'write it as "docker-archive:<file.tar>" or "docker-archive:<file.tar>:<name:tag>"',
      });
    }
    if (name !== undefined) parseDockerRef(name); // a malformed name fails here, naming itself
    const parsed: ImageRef = { kind: "docker-archive", ref, file: resolve(cwd, file) };
    if (name !== undefined) parsed.name = name;
    return parsed;
  }
  // `name:tag` looks like `scheme:rest`; only the URL form `scheme://` is taken as a transport.
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//.exec(ref)?.[1];
  if (scheme !== undefined && scheme !== "docker") {
    throw new RefError("REF_UNSUPPORTED", `unsupported image reference ${JSON.stringify(ref)}: unknown transport ${JSON.stringify(scheme)}`, {
      hint: `accepted forms: ${listAccepted(ACCEPTED_REF_FORMS)}`,
    });
  }
  const bare = ref.startsWith("docker://") ? ref.slice("docker://".length) : ref;
  return { kind: "registry", ref, registry: parseDockerRef(bare) };
}

/** Parses `ref` and checks that the layout directory it names exists. */
export function locateImage(ref: string, home?: string): LayoutLocation {
  return locateLayout(parseImageRef(ref), home);
}

/** The OCI layout directory of a local (`oci:` or `builtin:`) reference; it must exist. */
export function locateLayout(parsed: ImageRef, home?: string): LayoutLocation {
  const ref = parsed.ref;
  if (parsed.kind === "registry" || parsed.kind === "docker-archive") {
    throw new RefError("REF_NOT_LOCAL", `image reference ${JSON.stringify(ref)} does not name a local OCI layout`);
  }
  if (parsed.kind === "builtin") {
    const layoutDir = builtinLayoutDir(parsed.name, home);
    if (!isDirectory(layoutDir)) {
      throw new ImageError("IMAGE_BUILTIN_MISSING", `built-in image ${JSON.stringify(ref)} is not installed: ${layoutDir} does not exist`, {
        hint: 'run "npx supermachine setup" (it builds the built-in images; in the supermachine repository: npm run setup)',
      });
    }
    return { ref, layoutDir };
  }
  if (!isDirectory(parsed.dir)) {
    throw new ImageError("IMAGE_LAYOUT_NOT_FOUND", `OCI image layout for ${JSON.stringify(ref)} not found: ${parsed.dir} is not a directory`, {
      hint: "point oci:<dir> at a directory holding oci-layout, index.json and blobs/ (e.g. made by `skopeo copy ... oci:<dir>`)",
    });
  }
  const loc: LayoutLocation = { ref, layoutDir: parsed.dir };
  if (parsed.tag !== undefined) loc.tag = parsed.tag;
  return loc;
}

function isDirectory(path: string): boolean {
  try {
    return statSync(path).isDirectory();
  } catch {
    return false;
  }
}
