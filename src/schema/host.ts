/**
 * The host part of an engine fingerprint: what of the machine a snapshot's device state depends
 * on (the QEMU build, the machine type, the accelerator, the guest CPU model and, for `-cpu host`
 * under KVM, the host CPU's flags). One comparison names every field in which a snapshot's
 * recorded host differs from this one, for the three places that refuse such a snapshot (an
 * import, a restore, a cache miss explained by the recipe key), and the recipe key: a snapshot's
 * key with the host fields left out, under which an export also records it.
 */
import { ImageError } from "../errors.js";
import type { Accel, EngineFingerprint, SnapshotInputs } from "./key.js";
import { createHash } from "node:crypto";
import { stableJson } from "./key.js";

/** What of the host a snapshot restores only onto (built by `hostIdentity()`, src/engine/identity.ts). */
export interface HostIdentity {
  /** What the QEMU binary says of itself (`QEMU emulator version 7.2.19 (Debian ...)`). */
  qemu: string;
  /** The machine type, without per-VM properties (`microvm`). */
  machine: string;
  /** The accelerator VMs run under. */
  accel: Accel;
  /** The `-cpu` argument QEMU gets (`max`, `Nehalem-v1,enforce`, `host`). */
  cpu: string;
  /**
   * The host CPU's flags (/proc/cpuinfo, sorted), only where the guest sees them: under KVM with
   * `-cpu host` (or `max`). A named model is the same CPU on every host that can run it.
   */
  cpuFlags?: string[];
}

/** The fields of a fingerprint that are the host's, in the order messages name them. */
export const HOST_FIELDS = ["qemu", "machine", "accel", "cpu", "cpuFlags"] as const;
export type HostField = (typeof HOST_FIELDS)[number];

/** One field in which a snapshot's host differs from this one (undefined: not recorded). */
export interface HostDifference {
  field: HostField;
  snapshot: unknown;
  host: unknown;
}

/**
 * The host fields in which `snapshot` (a fingerprint read from a snapshot or a cache, maybe of an
 * older version without some fields) differs from `host`. Empty when it restores here.
 */
export function hostDifferences(snapshot: unknown, host: HostIdentity): HostDifference[] {
  const s = (snapshot && typeof snapshot === "object" ? snapshot : {}) as Record<string, unknown>;
  const h = host as unknown as Record<string, unknown>;
  const out: HostDifference[] = [];
  for (const field of HOST_FIELDS) {
    if (stableJson(s[field] ?? null) !== stableJson(h[field] ?? null)) out.push({ field, snapshot: s[field], host: h[field] });
  }
  return out;
}

const shown = (v: unknown): string => (v === undefined || v === null ? "(not recorded)" : JSON.stringify(v));

/** One difference in words; CPU flags by what only one side has (both lists are long). */
export function describeDifference(d: HostDifference): string {
  if (d.field === "cpuFlags" && Array.isArray(d.snapshot) && Array.isArray(d.host)) {
    const here = new Set(d.host as string[]);
    const there = new Set(d.snapshot as string[]);
    const lacking = [...there].filter((f) => !here.has(f));
    const extra = [...here].filter((f) => !there.has(f));
    const list = (l: string[]) => (l.length > 12 ? `${l.slice(0, 12).join(" ")} and ${l.length - 12} more` : l.join(" "));
    return `cpuFlags: the snapshot's host has ${lacking.length ? list(lacking) : "no flag"} that this host lacks, this host has ${extra.length ? list(extra) : "no flag"} that it lacked`;
  }
  if (d.field === "cpuFlags") return `cpuFlags: the snapshot's is ${d.snapshot === undefined ? "(none: a named CPU model)" : `${(d.snapshot as unknown[]).length} host flags`}, this host's is ${d.host === undefined ? "(none: a named CPU model)" : `${(d.host as unknown[]).length} host flags`}`;
  return `${d.field}: the snapshot's is ${shown(d.snapshot)}, this host's is ${shown(d.host)}`;
}

export const HOST_MISMATCH_HINT =
  "a snapshot restores only on the QEMU build, machine type, accelerator and CPU model it was made with: bake it on this host (supermachine build), " +
  "or run every node with the same QEMU package and SUPERMACHINE_CPU (docs/design.md, Host identity), or let a front place it on a node that matches";

/** The refusal of a snapshot made on another host (`what` names the snapshot). */
export function hostMismatch(what: string, diffs: HostDifference[], cause?: unknown): ImageError {
  return new ImageError("SNAPSHOT_HOST_MISMATCH", `${what} was made on another host: ${diffs.map(describeDifference).join("; ")}`, {
    hint: HOST_MISMATCH_HINT,
    ...(cause !== undefined ? { cause } : {}),
  });
}

/** The engine fields that are not the host's (kernel, agent), as a fingerprint keeps them. */
export function withoutHost(engine: EngineFingerprint): Record<string, unknown> {
  const rest: Record<string, unknown> = { ...engine };
  for (const f of HOST_FIELDS) delete rest[f];
  return rest;
}

/**
 * The recipe key of a snapshot: the hash of its inputs with the engine's host fields left out,
 * and its parent named by the parent's recipe key (`parentRecipe`; null for a root). The same
 * image declared alike has the same recipe key on every host, where its key differs: a cache
 * that has the recipe key but not the key has the image for another host.
 */
export function recipeKeyOf(inputs: SnapshotInputs, parentRecipe: string | null): string {
  const recipe = { ...inputs, parent: parentRecipe, engine: withoutHost(inputs.engine) };
  return createHash("sha256").update("supermachine-recipe-v1\0").update(stableJson(recipe)).digest("hex");
}
