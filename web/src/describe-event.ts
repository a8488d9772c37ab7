/** One line of text per server event, for the events view. */
import type { ServerEvent } from "./api.ts";
import { formatDuration, shortId } from "./format.ts";

const list = (names: string[], max = 3): string =>
  names.length <= max ? names.join(", ") : `${names.slice(0, max).join(", ")} and ${names.length - max} more`;

export function describeEvent(e: ServerEvent): string {
  switch (e.kind) {
    case "bake":
      if (e.type === "start") return `${e.image} · bake started`;
      if (e.type === "progress") return `${e.image} · ${e.step}`;
      if (e.error) return `${e.image} · ${e.status}: ${e.error}`;
      return `${e.image} · ${e.status} in ${formatDuration(e.ms)}`;
    case "watch":
      if (e.type === "change") return `changed: ${list(e.files)}`;
      if (e.type === "round-start") return `round ${e.round} started: ${e.files.length} file${e.files.length === 1 ? "" : "s"} changed`;
      if (e.type === "round-done") return `round ${e.round} done in ${formatDuration(e.ms)}: ${e.rekeyed.length ? `rekeyed ${list(e.rekeyed)}` : "nothing rekeyed"}`;
      return `round ${e.round} failed: ${e.error}`;
    case "sandbox": {
      const id = shortId(e.sandbox, 4);
      if (e.type === "created") return `sandbox ${id} created in pool ${e.pool}`;
      if (e.type === "killed") return `sandbox ${id} killed in pool ${e.pool}`;
      if (e.type === "timed-out") return `sandbox ${id} timed out in pool ${e.pool}`;
      return `sandbox ${id}: its VM exited in pool ${e.pool}`;
    }
    case "error":
      return `${e.type === "create" ? "create failed" : "request failed"}: ${e.message}${e.code ? ` (${e.code})` : ""}`;
    default:
      return JSON.stringify(e);
  }
}

/** Whether the event reports a failure (shown in the error colour). */
export const isFailure = (e: ServerEvent): boolean =>
  e.kind === "error" || (e.kind === "bake" && e.type === "done" && (e.status === "failed" || e.error !== null)) || (e.kind === "watch" && e.type === "round-failed");
