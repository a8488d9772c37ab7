/**
 * Where a front places a create: power of K choices (K = 3). It samples K of the nodes that take
 * creates and have the pool, scores them, and tries them best first; the rest follow, best
 * first, for when all K refuse. A score is lower for a better node:
 * - load: sandboxes held, being created, and creates this front has in flight to the node (which
 *   its last report cannot count yet), against its capacity; plus a share of its CPU load;
 * - snapshot-cache affinity: a node with the pool open already (its snapshot is there, its VMs
 *   warm) is worth a quarter of its capacity; a node of the same host identity as one that has it
 *   open is worth a little (its key is the same, so it can import rather than bake);
 * - a node whose pool failed to open (last time) comes after all others, as does a full one.
 * Sampling K rather than taking the global best keeps fronts that share no state from all
 * piling onto the same node between two reports.
 */
import type { NodeReport } from "../node.js";

export const K = 3;
export const AFFINITY = 0.25;
export const IDENTITY_AFFINITY = 0.05;
export const CPU_WEIGHT = 0.25;

export interface NodeView {
  url: string;
  report: NodeReport;
  /** Creates this front sent to the node and has no answer for yet. */
  inflight: number;
}

export interface Scored {
  view: NodeView;
  score: number;
  /** Why it is last (full, the pool failed there). */
  last?: string;
}

const identityOf = (r: NodeReport): string => JSON.stringify(r.identity);

export function score(view: NodeView, pool: string, holders: Set<string>): Scored {
  const r = view.report;
  const p = r.pools.find((x) => x.name === pool)!;
  const held = r.load.sandboxes + r.load.creating + view.inflight;
  let s = held / Math.max(1, r.load.capacity) + CPU_WEIGHT * Math.min(2, r.load.cpu);
  if (p.state === "open") s -= AFFINITY;
  else if (holders.has(identityOf(r))) s -= IDENTITY_AFFINITY;
  const last = p.state === "failed" ? `its pool failed to open: ${p.error?.message ?? "?"}` : held >= r.load.capacity ? "full" : undefined;
  return { view, score: s, ...(last ? { last } : {}) };
}

/** The order to try nodes in for a create from `pool`; empty when no node can take it. */
export function placementOrder(views: NodeView[], pool: string, random: () => number = Math.random): Scored[] {
  const able = views.filter((v) => v.report.state === "ready" && v.report.pools.some((p) => p.name === pool));
  const holders = new Set(able.filter((v) => v.report.pools.some((p) => p.name === pool && p.state === "open")).map((v) => identityOf(v.report)));
  const scored = able.map((v) => score(v, pool, holders));
  // K distinct at random (a partial Fisher-Yates), then the others.
  for (let i = 0; i < Math.min(K, scored.length); i++) {
    const j = i + Math.floor(random() * (scored.length - i));
    [scored[i], scored[j]] = [scored[j]!, scored[i]!];
  }
  const byScore = (a: Scored, b: Scored) => (a.last ? 1 : 0) - (b.last ? 1 : 0) || a.score - b.score;
  const sample = scored.slice(0, K).sort(byScore);
  const rest = scored.slice(K).sort(byScore);
  // A node the sample ranks last (full, failed) goes behind every usable one.
  return [...sample.filter((s) => !s.last), ...rest.filter((s) => !s.last), ...sample.filter((s) => s.last), ...rest.filter((s) => s.last)];
}
