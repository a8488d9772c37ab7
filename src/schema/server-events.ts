/**
 * What `GET /v1/events` of `supermachine serve` sends, as types (pure: the serve page checks
 * against them too). Each message's `data` is one `ServerEvent`.
 */

import type { NodeStatus } from "./events.js";

/** What happened: a bake and its steps, a watch round, a sandbox's start or end, an error. */
export type ServerEventBody =
  | { kind: "bake"; type: "start"; image: string }
  | { kind: "bake"; type: "progress"; image: string; step: string }
  | { kind: "bake"; type: "done"; image: string; status: NodeStatus; ms: number; key: string; error: string | null }
  | { kind: "watch"; type: "change"; files: string[] }
  | { kind: "watch"; type: "round-start"; round: number; files: string[] }
  | { kind: "watch"; type: "round-done"; round: number; rekeyed: string[]; ms: number }
  | { kind: "watch"; type: "round-failed"; round: number; error: string }
  | { kind: "sandbox"; type: "created" | "killed" | "timed-out" | "vm-exited"; sandbox: string; pool: string }
  | { kind: "error"; type: "request" | "create"; message: string; code: string | null };

/** An event as sent: numbered in its feed, and timed. */
export type ServerEvent = ServerEventBody & { id: number; at: string };
