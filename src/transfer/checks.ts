/**
 * What an importer checks of a snapshot's config beyond its key: the engine must be this
 * machine's (its host part compared by src/schema/host.ts), and everything that decides what its VMs do must agree with its key's inputs (and,
 * when the importer computed them itself, with its own values): the memory and vCPUs QEMU is
 * given, the RAM size that follows from them, the workload's command and environment, the image.
 * A cache that changes any of them under an honest key is refused by name.
 */
import { hostDifferences, hostMismatch, withoutHost } from "../schema/host.js";
import { hashEnvValue, stableJson, type EngineFingerprint } from "../schema/key.js";
import type { SnapshotMeta } from "../store/snapshots.js";
import { CacheError } from "./errors.js";
import type { SnapshotConfig } from "./format.js";
import type { ExpectedSnapshot, LocalEngine } from "./report.js";

const MIB = 1024 * 1024;
const HINT = "the cache entry was tampered with or made by an incompatible version: nothing was imported";

/** Plain JSON (undefined members dropped), in a stable order: for comparing values. */
const canon = (v: unknown): string => stableJson(v === undefined ? null : JSON.parse(JSON.stringify(v)));

function refuse(what: string, why: string): CacheError {
  return new CacheError("CACHE_KEY_MISMATCH", `${what}: ${why}`, { hint: HINT });
}

const isStrings = (v: unknown, max: number): v is string[] => Array.isArray(v) && v.length <= max && v.every((s) => typeof s === "string" && s.length <= 65536);

/** The snapshot's config against its own key inputs, and against what the importer expects. */
export function checkBehaviour(s: SnapshotConfig, what: string, expected?: ExpectedSnapshot): void {
  const inputs = s.inputs;
  if (s.memoryMib !== inputs.memoryMib || s.vcpus !== inputs.vcpus) throw refuse(what, `it boots with ${s.memoryMib} MiB and ${s.vcpus} vCPUs, but its key says ${inputs.memoryMib} MiB and ${inputs.vcpus}`);
  if (s.files.ram.size !== s.memoryMib * MIB) throw refuse(what, `its RAM is ${s.files.ram.size} bytes, but ${s.memoryMib} MiB of memory make ${s.memoryMib * MIB}`);
  if (Number.isNaN(Date.parse(s.created))) throw new CacheError("CACHE_CONFIG_INVALID", `${what}: its creation time ${JSON.stringify(String(s.created).slice(0, 40))} is not a date`, { hint: HINT });
  const w = s.workload as unknown;
  if (w !== null) {
    const o = w as Record<string, unknown>;
    if (typeof w !== "object" || Array.isArray(w) || !isStrings(o.argv, 4096) || o.argv.length === 0 || !isStrings(o.env, 4096) || typeof o.cwd !== "string" || (o.user !== undefined && typeof o.user !== "string")) {
      throw new CacheError("CACHE_CONFIG_INVALID", `${what}: its workload is not { argv, env, cwd, user? }`, { hint: HINT });
    }
  } else if (s.workloadRunning) throw new CacheError("CACHE_CONFIG_INVALID", `${what}: it says a workload runs but has none`, { hint: HINT });
  const cmd = (inputs as { cmd?: unknown }).cmd ?? null;
  if (canon(s.workload?.argv ?? null) !== canon(cmd)) throw refuse(what, `its workload runs ${JSON.stringify(s.workload?.argv ?? null)}, but its key says ${JSON.stringify(cmd)}`);
  if (inputs.parent === null) {
    if (s.image.digest !== inputs.manifestDigest) throw refuse(what, `it was made on image ${s.image.digest}, but its key says ${inputs.manifestDigest}`);
    // A root's workload environment holds the build env's values, which the key has salted hashes of.
    const hashes = ((inputs as { env?: Record<string, string> }).env ?? {}) as Record<string, string>;
    for (const entry of s.workload?.env ?? []) {
      const eq = entry.indexOf("=");
      const name = eq < 0 ? entry : entry.slice(0, eq);
      if (hashes[name] !== undefined && hashEnvValue(name, entry.slice(eq + 1)) !== hashes[name]) throw refuse(what, `its workload's ${name} is not the value its key was made with`);
    }
  }
  if (expected) {
    if (canon(s.workload) !== canon(expected.workload)) throw refuse(what, "its workload (command, environment, directory or user) is not the one this project declares");
    if (s.image.digest !== expected.image.digest || canon(s.image.config) !== canon(expected.image.config)) throw refuse(what, "its image is not the one this project resolves");
  }
}

/** A child runs on its parent's image, with its parent's workload. */
export function checkChild(s: SnapshotConfig, parent: SnapshotMeta, what: string): void {
  if (s.image.digest !== parent.image.digest || canon(s.image.config) !== canon(parent.image.config)) throw refuse(what, `its image is not its parent's (${parent.image.digest})`);
  if (canon(s.workload) !== canon(parent.workload)) throw refuse(what, "its workload is not its parent's");
}

const FIELD_NAMES: Record<string, string> = { kernelKey: "kernel", agentKey: "agent", agentVersion: "agent" };

/**
 * The snapshot's engine must be this machine's, field by field: the host's part (QEMU, machine
 * type, accelerator, CPU model and flags) under the accelerator VMs use now, refused as
 * SNAPSHOT_HOST_MISMATCH naming every field that differs; then the guest kernel and agent
 * (CACHE_ENGINE_MISMATCH).
 */
export function checkEngine(theirs: EngineFingerprint, engine: LocalEngine, what: string): void {
  const here = engine.fingerprint(engine.accelNow());
  const diffs = hostDifferences(theirs, here);
  if (diffs.length) throw hostMismatch(what, diffs);
  const t = withoutHost(theirs);
  const h = withoutHost(here);
  for (const k of [...new Set([...Object.keys(h), ...Object.keys(t)])]) {
    if (canon(t[k]) !== canon(h[k])) {
      throw new CacheError("CACHE_ENGINE_MISMATCH", `${what} was made by another engine: its ${FIELD_NAMES[k] ?? k} is ${JSON.stringify(t[k])}, this machine's is ${JSON.stringify(h[k])}`, {
        hint: "a snapshot restores only into the kernel and agent that made it: bake it here (supermachine build), or share caches between machines set up alike",
      });
    }
  }
}

