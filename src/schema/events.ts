/**
 * What builds and watch rounds report, as public types (pure types, no code): each image's
 * outcome, the events of a build and of watch mode, and what a snapshot cache is asked for. The
 * project and bake layers report richer objects internally (with the snapshot and the baked VM);
 * what they hand users is these.
 */
import type { BuildProgress } from "./image.js";
import type { SnapshotInputs, SnapshotSources } from "./key.js";

export type NodeStatus = "baked" | "cached" | "imported" | "would-bake" | "failed" | "skipped";

/** One image of a build: its key, what happened to it, where its snapshot is. */
export interface BuiltImage {
  name: string;
  key: string;
  status: NodeStatus;
  parent: string | null;
  /** Time from this node's start to its end (resolve, key, bake). */
  ms: number;
  /** Where its snapshot is (or would be). */
  dir: string;
  /** Its snapshot was found damaged (why, and where it was moved), then rebaked or (frozen) not. */
  damaged?: { reason: string; quarantine: string | undefined };
  /** The cache's copy could not be imported (why: its error's code and message), so it was baked. */
  cacheError?: { code: string; message: string };
  error?: Error;
}

/** Progress of a build, per image. */
export type BuildEvent<N extends BuiltImage = BuiltImage> =
  | { type: "start"; name: string }
  | { type: "progress"; name: string; progress: BuildProgress }
  | { type: "done"; name: string; node: N };

/** What a cache lookup (`BuildOptions.fetch`, `fetchFromCache`) gets for a node that is not baked locally. */
export interface FetchRequest {
  name: string;
  key: string;
  /**
   * The key without the host's part (QEMU, machine type, accelerator, CPU): a cache that has
   * this but not `key` has the image for another host (`fetchFromCache` then says which).
   */
  recipeKey: string;
  /** Where the snapshot must appear (published atomically) if the cache has it. */
  dir: string;
  inputs: SnapshotInputs;
  sources: SnapshotSources;
  /** What the node runs, as this build computed it: an imported snapshot must run exactly this. */
  expect: { workload: unknown; image: { digest: string; config: unknown } };
}

/** One round of watch mode. */
export interface WatchRound<N extends BuiltImage = BuiltImage> {
  round: number;
  /** Files whose change started the round (empty for the first). */
  changed: string[];
  /** Every node of the round, with its status (`baked` for what this round rebaked). */
  nodes: Map<string, N>;
  /** Images whose key differs from the previous good round (new images included). */
  rekeyed: string[];
  ms: number;
}

/** What watch mode reports (`loadPools({ watch: true, onWatchEvent })`, `supermachine watch --json`). */
export type WatchEvent<N extends BuiltImage = BuiltImage> =
  | { type: "ready"; round: WatchRound<N>; files: number }
  | { type: "change"; files: string[] }
  | { type: "round-start"; round: number; files: string[] }
  | { type: "build"; event: BuildEvent<N> }
  | { type: "round-done"; round: WatchRound<N> }
  | { type: "round-failed"; round: number; error: Error };
