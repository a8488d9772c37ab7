/**
 * Prebuilt guest artifacts: the platform package `supermachine-guest-<os>-<cpu>` (an optional
 * dependency of supermachine, selected by npm through its `os`/`cpu` fields) carries the guest
 * kernel and the agent initramfs, with `guest.json` recording the inputs they were built from.
 *
 * The kernel and the agent are pure functions of their inputs. The inputs that belong to this
 * version of supermachine are its `native/kernel` and `native/agent` trees (hashed here exactly as
 * src/setup/ hashes them); the toolchain (linux-source, rustc) is the packager's and is
 * part of the recorded key, so a prebuilt artifact matches when its source tree hash is this
 * package's, whatever toolchain this host has (or lacks).
 *
 * Lookup order, for each of the kernel and the agent (`guestLookup`, used by the engine through
 * `nativeArtifacts`, by `setup` and `setup --check`, and by `doctor`):
 *   1. an explicit path: `SUPERMACHINE_KERNEL` / `SUPERMACHINE_INITRAMFS`;
 *   2. the prebuilt package, when its `guest.json` matches this version's inputs
 *      (`SUPERMACHINE_NO_PREBUILT=1` skips it);
 *   3. the cache directory, through the install manifest setup writes there
 *      (`installManifestPath` in artifacts.ts);
 *   4. else `npx supermachine setup` builds it from source.
 */
import { createHash } from "node:crypto";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative } from "node:path";

/** The platform package's name on this host. */
export const GUEST_PACKAGE = `supermachine-guest-${process.platform}-${process.arch}`;

/** `guest.json` in the platform package. */
export interface GuestManifest {
  name: string;
  version: string;
  kernel: { key: string; tree: string; linuxSource: string; file: string };
  agent: { key: string; tree: string; rustc: string; version: string; protocol: number; initramfs: string; binary: string };
}

/** The inputs of this version of supermachine: hashes of its kernel and agent source trees. */
export interface SourceInputs {
  kernelTree: string;
  agentTree: string;
  agentVersion: string;
  protocol: number | null;
}

/** Hash of a file tree's paths and contents (.gitignore files left out: npm pack drops them, and an installed package must compute the keys of the checkout it was packed from). */
export function hashTree(dir: string, skip: (p: string) => boolean = () => false): string {
  const h = createHash("sha256");
  const walk = (d: string) => {
    for (const name of readdirSync(d).sort()) {
      const p = join(d, name);
      if (name === ".gitignore" || skip(p)) continue;
      const st = statSync(p);
      if (st.isDirectory()) walk(p);
      else h.update(relative(dir, p)).update("\0").update(readFileSync(p)).update("\0");
    }
  };
  walk(dir);
  return h.digest("hex");
}

const inputsCache = new Map<string, SourceInputs>();

export function sourceInputs(root: string): SourceInputs {
  const hit = inputsCache.get(root);
  if (hit) return hit;
  const agentDir = join(root, "native", "agent");
  const proto = /pub const VERSION: u16 = (\d+);/.exec(readFileSync(join(agentDir, "src", "proto.rs"), "utf8"))?.[1];
  const inputs: SourceInputs = {
    kernelTree: hashTree(join(root, "native", "kernel")),
    agentTree: hashTree(agentDir, (p) => p.endsWith("/target")),
    agentVersion: /^version\s*=\s*"([^"]+)"/m.exec(readFileSync(join(agentDir, "Cargo.toml"), "utf8"))?.[1] ?? "unknown",
    protocol: proto ? Number(proto) : null,
  };
  inputsCache.set(root, inputs);
  return inputs;
}

/** What the prebuilt package offers: per artifact, its path and key, or why it is not used. */
export interface PrebuiltState {
  package: string;
  /** The package's directory (null: not installed). */
  dir: string | null;
  version?: string;
  kernel: { path: string; key: string } | { reason: string };
  agent: { path: string; binary: string; key: string; version: string } | { reason: string };
}

/** Finds the platform package from `root` (supermachine's package directory) and checks it against this version's inputs. */
export function findPrebuilt(root: string, env: NodeJS.ProcessEnv = process.env): PrebuiltState {
  const none = (reason: string): PrebuiltState => ({ package: GUEST_PACKAGE, dir: null, kernel: { reason }, agent: { reason } });
  if (env.SUPERMACHINE_NO_PREBUILT === "1") return none("SUPERMACHINE_NO_PREBUILT=1");
  let dir: string;
  try {
    dir = dirname(createRequire(join(root, "package.json")).resolve(`${GUEST_PACKAGE}/package.json`));
  } catch {
    return none(`${GUEST_PACKAGE} is not installed`);
  }
  let m: GuestManifest;
  try {
    m = JSON.parse(readFileSync(join(dir, "guest.json"), "utf8")) as GuestManifest;
  } catch (err) {
    return { ...none(`${join(dir, "guest.json")} is unreadable: ${(err as Error).message}`), dir };
  }
  const mine = sourceInputs(root);
  const state: PrebuiltState = { package: GUEST_PACKAGE, dir, version: m.version, kernel: { reason: "" }, agent: { reason: "" } };
  const kernel = join(dir, m.kernel?.file ?? "vmlinux");
  if (m.kernel?.tree !== mine.kernelTree) state.kernel = { reason: `${GUEST_PACKAGE}@${m.version} was built from other kernel inputs (its key ${m.kernel?.key})` };
  else if (!existsSync(kernel)) state.kernel = { reason: `${kernel} is missing` };
  else state.kernel = { path: kernel, key: m.kernel.key };
  const initramfs = join(dir, m.agent?.initramfs ?? "initramfs.cpio");
  if (m.agent?.tree !== mine.agentTree || (mine.protocol !== null && m.agent.protocol !== mine.protocol)) {
    state.agent = { reason: `${GUEST_PACKAGE}@${m.version} was built from other agent inputs (its key ${m.agent?.key}, protocol ${m.agent?.protocol})` };
  } else if (!existsSync(initramfs)) state.agent = { reason: `${initramfs} is missing` };
  else state.agent = { path: initramfs, binary: join(dir, m.agent.binary ?? "supermachine-agent"), key: m.agent.key, version: m.agent.version };
  return state;
}

/** Where an artifact comes from. */
export type ArtifactSource = "env" | "prebuilt" | "cache";

export interface LookupHit {
  source: "env" | "prebuilt";
  path: string;
  /** The key snapshots are made under (null for an explicit path: the caller identifies it). */
  key: string | null;
}

/**
 * Steps 1 and 2 of the lookup order for both artifacts (the cache, step 3, is the caller's:
 * the engine reads the install manifest, setup computes the cache keys itself). null: not found
 * there, look in the cache.
 */
export function guestLookup(root: string, env: NodeJS.ProcessEnv = process.env): { kernel: LookupHit | null; agent: LookupHit | null; prebuilt: PrebuiltState } {
  const prebuilt = findPrebuilt(root, env);
  const pick = (explicit: string | undefined, p: { path: string; key: string } | { reason: string }): LookupHit | null => {
    if (explicit) return { source: "env", path: explicit, key: null };
    if ("path" in p) return { source: "prebuilt", path: p.path, key: p.key };
    return null;
  };
  return { kernel: pick(env.SUPERMACHINE_KERNEL, prebuilt.kernel), agent: pick(env.SUPERMACHINE_INITRAMFS, prebuilt.agent), prebuilt };
}
