/**
 * Key primitives: what a snapshot's key is made of (`SnapshotInputs`) and how it is computed
 * (`keyOf`: the sha256 of the inputs' stable JSON). Below both the graph (which assembles a node's
 * inputs from its options, src/graph/keys.ts) and the store (which keeps the inputs beside each
 * snapshot and checks a loaded one against its key), so that neither imports the other.
 */
import { createHash } from "node:crypto";
import type { HostIdentity } from "./host.js";
import type { KeyedOptions } from "./options.js";

/** The accelerator a VM runs under. */
export type Accel = "kvm" | "tcg";

/** The accelerator VMs will use, and why (`Image.accel()`, `supermachine info`). */
export interface AccelChoice {
  accel: Accel;
  /** Why this accelerator was picked, for `supermachine info` and logs. */
  reason: string;
  /** True when the user forced it through SUPERMACHINE_ACCEL. */
  forced: boolean;
}

/**
 * What the engine is made of: a snapshot restores only into the QEMU, machine type, CPU model,
 * guest kernel and agent that made it, under the accelerator it ran on. The host's part
 * (`HostIdentity`: qemu, machine, accel, cpu, cpuFlags) is compared field by field by
 * `hostDifferences` (./host.ts).
 */
export interface EngineFingerprint extends HostIdentity {
  kernelKey: string;
  agentKey: string;
  agentVersion: string;
}

/** A staged extra file as the key holds it: where it goes, its mode and the sha256 of its contents. */
export interface ExtraFileKey {
  guestPath: string;
  mode: number;
  sha256: string;
}

/**
 * Everything a snapshot depends on (its key is their hash). Changing any of it makes a different
 * snapshot. Nothing here depends on the machine, the checkout's path or mtimes, except what the
 * engine is (the accelerator among it). Besides the four below, the inputs are the keyed build
 * options, each under its own name (the option table's `key`, src/schema/options.ts): memoryMib,
 * vcpus, env (salted hashes of the values), cmd (the workload resolved), guestPort,
 * listenerRequired, warmup (whether one runs) and warmupTag, extraFiles (by content),
 * execLimits and network (when set).
 */
export type SnapshotInputs = {
  /** The parent snapshot's key (an image built `from` another), or null for a root image. */
  parent: string | null;
  /** A root image's manifest digest (never its tag); null for a child (it is in the parent's key). */
  manifestDigest: string | null;
  /** The declaring module bundled and minified (config projects), or null (the API). */
  module: { sha256: string; packages: Record<string, string> } | null;
  engine: EngineFingerprint;
} & KeyedOptions;

/**
 * What explains a key but is not part of it: the reference as written (the key has its digest),
 * and the files of the module with their digests (the key has the bundle's). `why` reports from it.
 */
export interface SnapshotSources {
  name: string;
  ref: string;
  /** The declaring module, relative to the project root. */
  module: string | null;
  files: Record<string, string>;
  /**
   * The lockfile's pin the root image's tag resolved by (or was pinned to by this build), for a
   * project image whose root `ref` is a registry tag: `why` names a moved pin `lock:<ref>`.
   */
  pin?: { platform: string; digest: string };
}

/** What the inputs keep of an env value: a sha256, salted with the variable's name. */
export function hashEnvValue(name: string, value: string): string {
  return "sha256:" + createHash("sha256").update(`supermachine-env-v1\0${name}\0${value}`).digest("hex");
}

export function hashEnv(env: Record<string, string>): Record<string, string> {
  return Object.fromEntries(Object.entries(env).map(([k, v]) => [k, hashEnvValue(k, v)]));
}

/** A snapshot's key: the sha256 of its inputs' stable JSON. */
export function keyOf(inputs: SnapshotInputs): string {
  return createHash("sha256").update(stableJson(inputs)).digest("hex");
}

/** JSON with sorted keys, so that the hash does not depend on property order. */
export function stableJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(stableJson).join(",")}]`;
  if (v && typeof v === "object") {
    return `{${Object.keys(v)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${stableJson((v as Record<string, unknown>)[k])}`)
      .join(",")}}`;
  }
  return JSON.stringify(v);
}

/** Which inputs differ (for logs: why a cached snapshot was not used). */
export function explainDiff(a: SnapshotInputs | undefined, b: SnapshotInputs | undefined): string {
  if (!a || !b) return "inputs changed";
  const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])] as (keyof SnapshotInputs)[];
  const changed = keys.filter((k) => stableJson(a[k]) !== stableJson(b[k]));
  return changed.length ? `changed: ${changed.join(", ")}` : "no input changed";
}
