import { join } from "node:path";
import { homePaths } from "../paths.js";

/**
 * Built-in images are OCI layouts that `npx supermachine setup` builds offline under
 * `homePaths().builtin/<name>`; `scripts/build-busybox-image.mjs` writes the busybox one
 * (from the host's static busybox). Only their location is known here.
 */
export const BUILTIN_IMAGES = ["busybox"] as const;
export type BuiltinImageName = (typeof BUILTIN_IMAGES)[number];

export function isBuiltinImage(name: string): name is BuiltinImageName {
  return (BUILTIN_IMAGES as readonly string[]).includes(name);
}

/** Directory of the OCI image layout of a built-in image. */
export function builtinLayoutDir(name: BuiltinImageName, home?: string): string {
  return join(homePaths(home).builtin, name);
}

/** Script (relative to the package root) that builds the busybox layout: `node <script> OUT_DIR`. */
export const BUSYBOX_BUILD_SCRIPT = "scripts/build-busybox-image.mjs";
