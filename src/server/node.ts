/**
 * What a node of a fleet tells fronts about itself, `GET /v1/node`: who it is (name, the tag its
 * ids carry, version), whether it takes creates, its host identity (what a snapshot must match to
 * restore here), its load against its capacity, and each pool's image, snapshot key and state.
 * A front places creates from it (src/server/front/placement.ts). It is an open path, as
 * `/metrics` is: it holds counts and content keys, no secret.
 */
import { readFileSync } from "node:fs";
import { availableParallelism, freemem, hostname, loadavg, totalmem } from "node:os";
import { join } from "node:path";
import { packageRoot } from "../engine/artifacts.js";
import { engineFingerprint } from "../engine/fingerprint.js";
import type { EngineFingerprint } from "../schema/key.js";
import type { PoolState } from "../project/pools.js";
import type { SandboxRegistry } from "./sandboxes.js";
import { poolEntries } from "./sandboxes.js";
import type { Pools } from "../project/pools.js";

const MIB = 2 ** 20;

/** A node's capacity when the operator gives none: guest RAM of 256 MiB per sandbox in 3/4 of the host's memory. */
export const defaultCapacity = (): number => Math.max(1, Math.floor((totalmem() / MIB) * 0.75 / 256));

export interface NodePoolReport extends PoolState {
  name: string;
  idle: number;
  inUse: number;
  max: number;
}

export interface NodeReport {
  node: { name: string; tag: string; version: string; startedAt: string };
  /** `ready` takes creates; `starting` and `draining` do not (`reason` says why). */
  state: "starting" | "ready" | "draining";
  reason?: string;
  /** What a snapshot must have been made with to restore here (null when the engine is not set up). */
  identity: EngineFingerprint | null;
  load: {
    sandboxes: number;
    creating: number;
    capacity: number;
    /** The 1-minute load average over the cores (1 = every core busy). */
    cpu: number;
    cores: number;
    memory: { totalMib: number; availableMib: number };
  };
  pools: NodePoolReport[];
  /** The snapshot keys of the pools that are open here (a front prefers a node that holds a pool's key). */
  keys: string[];
}

let version: string | undefined;
function packageVersion(): string {
  try {
    version ??= (JSON.parse(readFileSync(join(packageRoot(), "package.json"), "utf8")) as { version: string }).version;
  } catch {
    version = "unknown";
  }
  return version;
}

let identity: EngineFingerprint | null | undefined;
function hostIdentity(): EngineFingerprint | null {
  if (identity === undefined) {
    try {
      identity = engineFingerprint();
    } catch {
      identity = null;
    }
  }
  return identity;
}

export interface NodeFacts {
  name: string;
  tag: string;
  startedAt: Date;
  capacity: number;
  pools: () => Pools | undefined;
  registry: () => SandboxRegistry | undefined;
  notReady: () => string | undefined;
}

export function nodeReport(f: NodeFacts): NodeReport {
  const registry = f.registry();
  const why = f.notReady();
  const pools = f.pools();
  const entries = pools ? poolEntries(pools) : [];
  const poolReports: NodePoolReport[] = entries.map(([name, p]) => {
    const s = p.stats();
    const d = p.describe?.() ?? { image: name, key: null, state: "open" as const };
    return { name, ...d, idle: s.idle, inUse: s.inUse, max: s.max };
  });
  return {
    node: { name: f.name, tag: f.tag, version: packageVersion(), startedAt: f.startedAt.toISOString() },
    state: registry?.isDraining || why === "draining" ? "draining" : why || !registry ? "starting" : "ready",
    ...(why ? { reason: why } : {}),
    identity: hostIdentity(),
    load: {
      sandboxes: registry?.size ?? 0,
      creating: registry?.creatingTotal ?? 0,
      capacity: f.capacity,
      cpu: Math.round((loadavg()[0]! / availableParallelism()) * 100) / 100,
      cores: availableParallelism(),
      memory: { totalMib: Math.round(totalmem() / MIB), availableMib: Math.round(freemem() / MIB) },
    },
    pools: poolReports,
    keys: [...new Set(poolReports.filter((p) => p.state === "open" && p.key).map((p) => p.key!))],
  };
}

export const defaultNodeName = (): string => hostname();
