/**
 * Where the guest kernel and the agent initramfs live, in the lookup order of `prebuilt.ts`:
 * `SUPERMACHINE_KERNEL` / `SUPERMACHINE_INITRAMFS`, the prebuilt platform package when it matches
 * this version's inputs, then the cache directory, where `npx supermachine setup` (in the
 * repository: `npm run setup`) builds them, keyed by a hash of their inputs, recording the paths
 * in an install manifest in the cache directory (`installManifestPath`).
 *
 * The manifest lives in the cache, never in the installed package: a package installed by root
 * (globally, or into a shared tree) is read-only to the users who run it, and each of them sets
 * up a cache of their own. It is named by this package's guest inputs, so two checkouts or two
 * installed versions sharing one cache directory each find the artifacts built from their own
 * sources.
 */
import { createHash } from "node:crypto";
import { existsSync, readFileSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { SetupError } from "../errors.js";
import { supermachineHome } from "../paths.js";
import { type ArtifactSource, guestLookup, sourceInputs } from "./prebuilt.js";

export interface NativeArtifacts {
  kernel: string;
  initramfs: string;
  kernelKey: string;
  agentKey: string;
  agentVersion: string;
  /** Where each came from: an explicit path, the prebuilt package, or the cache (setup's build). */
  kernelSource: ArtifactSource;
  agentSource: ArtifactSource;
}

const SETUP_HINT = 'run "npx supermachine setup" (it builds the guest kernel and agent; in the supermachine repository: npm run setup)';

/** The directory holding supermachine's package.json, found from this module's location. */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pj = join(dir, "package.json");
    if (existsSync(pj)) {
      try {
        if ((JSON.parse(readFileSync(pj, "utf8")) as { name?: string }).name === "supermachine") return dir;
      } catch {
        /* keep looking */
      }
    }
    const up = dirname(dir);
    if (up === dir) throw new SetupError("SETUP_PACKAGE_ROOT", "cannot find supermachine's package.json above " + fileURLToPath(import.meta.url));
    dir = up;
  }
}

/**
 * Where setup records the kernel and agent it built or found for the package at `root`:
 * `<home>/installs/<inputs>.json`, `<inputs>` a hash of the package's kernel and agent source
 * trees (`sourceInputs`, hashed as setup hashes them). src/setup/manifest.ts writes it.
 */
export function installManifestPath(root: string = packageRoot(), env: NodeJS.ProcessEnv = process.env): string {
  const { kernelTree, agentTree } = sourceInputs(root);
  const id = createHash("sha256").update(`kernel:${kernelTree}\0agent:${agentTree}`).digest("hex").slice(0, 16);
  return join(supermachineHome(env), "installs", `${id}.json`);
}

/** The list of homes setup ran in, recorded in the default home (`installs/<inputs>.homes.json`). */
export function installHomesPath(root: string = packageRoot(), env: NodeJS.ProcessEnv = process.env): string {
  return installManifestPath(root, env).replace(/\.json$/, ".homes.json");
}

/** The homes listed at `path` (none when it is missing or unreadable). */
export function readInstallHomes(path: string): string[] {
  try {
    const v = JSON.parse(readFileSync(path, "utf8")) as unknown;
    return Array.isArray(v) ? v.filter((h): h is string => typeof h === "string" && h.startsWith("/")) : [];
  } catch {
    return [];
  }
}

/**
 * The install manifest this process uses: its home's; with SUPERMACHINE_HOME pointing at a home
 * setup never ran in (a scratch cache for images and snapshots), the default home's, else the
 * manifest of a home setup ran in, as the default home lists them (most recent first). Returns
 * the home's own path when none exists (for messages).
 */
export function findInstallManifest(root: string = packageRoot(), env: NodeJS.ProcessEnv = process.env): string {
  const own = installManifestPath(root, env);
  if (existsSync(own) || !env.SUPERMACHINE_HOME) return own;
  const defaults = { ...env, SUPERMACHINE_HOME: undefined };
  const candidates = [installManifestPath(root, defaults), ...readInstallHomes(installHomesPath(root, defaults)).map((h) => installManifestPath(root, { ...env, SUPERMACHINE_HOME: h }))];
  return candidates.find((m) => existsSync(m)) ?? own;
}

let cached: NativeArtifacts | undefined;

export function nativeArtifacts(env: NodeJS.ProcessEnv = process.env): NativeArtifacts {
  if (cached && !env.SUPERMACHINE_KERNEL && !env.SUPERMACHINE_INITRAMFS) return cached;
  const root = packageRoot();
  const manifest = findInstallManifest(root, env);
  // The manifest may be absent when the prebuilt package provides both.
  let recorded: Partial<NativeArtifacts> = {};
  if (existsSync(manifest)) {
    try {
      recorded = JSON.parse(readFileSync(manifest, "utf8")) as Partial<NativeArtifacts>;
    } catch (err) {
      throw new SetupError("SETUP_MANIFEST_CORRUPT", `${manifest} is not valid JSON`, { hint: SETUP_HINT, cause: err });
    }
  }
  const found = guestLookup(root, env);
  const kernel = found.kernel?.path || recorded.kernel;
  const initramfs = found.agent?.path || recorded.initramfs;
  if (!kernel || !existsSync(kernel)) {
    throw new SetupError(
      "SETUP_KERNEL_MISSING",
      kernel ? `guest kernel not found at ${kernel}` : `no guest kernel has been built (${manifest} is missing; prebuilt: ${"reason" in found.prebuilt.kernel ? found.prebuilt.kernel.reason : "unused"})`,
      { hint: SETUP_HINT },
    );
  }
  if (!initramfs || !existsSync(initramfs)) {
    throw new SetupError(
      "SETUP_AGENT_MISSING",
      initramfs ? `guest agent initramfs not found at ${initramfs}` : `no guest agent has been built (${manifest} is missing; prebuilt: ${"reason" in found.prebuilt.agent ? found.prebuilt.agent.reason : "unused"})`,
      { hint: SETUP_HINT },
    );
  }
  // An override is identified by its path, size and mtime (snapshots made with it must not be
  // mistaken for ones made with the built artifacts).
  const custom = (p: string) => {
    const st = statSync(p);
    return `custom:${p}:${st.size}:${Math.round(st.mtimeMs)}`;
  };
  const key = (hit: typeof found.kernel, path: string, recordedKey: string | undefined) =>
    hit ? (hit.key ?? custom(path)) : (recordedKey ?? custom(path));
  const pa = found.prebuilt.agent;
  const result: NativeArtifacts = {
    kernel,
    initramfs,
    kernelKey: key(found.kernel, kernel, recorded.kernelKey),
    agentKey: key(found.agent, initramfs, recorded.agentKey),
    agentVersion: found.agent?.source === "prebuilt" && "version" in pa ? pa.version : (recorded.agentVersion ?? "unknown"),
    kernelSource: found.kernel?.source ?? "cache",
    agentSource: found.agent?.source ?? "cache",
  };
  if (!env.SUPERMACHINE_KERNEL && !env.SUPERMACHINE_INITRAMFS) cached = result;
  return result;
}
