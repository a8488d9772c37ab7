/**
 * What a build's progress events mean, in a few words: the CLI's build lines and the serve page's
 * live bake steps say the same thing.
 */
import { hostname } from "node:os";
import type { BuildProgress, LockHolder } from "../schema/image.js";

/** Who holds a lock we wait for, and since when. */
export function describeWait(what: string, holder: LockHolder | undefined): string {
  if (!holder) return `waiting for ${what} (locked by another process)`;
  const t = Date.parse(holder.since);
  const since = Number.isNaN(t) ? holder.since : `${new Date(t).toLocaleTimeString()} (${Math.max(0, Math.round((Date.now() - t) / 1000))} s ago)`;
  const host = holder.host && holder.host !== hostname() ? ` on ${holder.host}` : "";
  return `waiting for ${what}, held by pid ${holder.pid}${host} since ${since}`;
}

/** What a progress event means, in a few words (undefined: nothing worth showing). */
export function describeProgress(p: BuildProgress): string | undefined {
  switch (p.phase) {
    case "pull":
      if (p.event.type === "layer") return `pulling layer ${p.event.index + 1}/${p.event.count} (${(p.event.bytes / 1e6).toFixed(1)} MB)`;
      if (p.event.type === "manifest") return "resolving";
      return undefined;
    case "import":
      return "importing";
    // `layer` counts from 0.
    case "scan-layer":
      return `reading layer ${p.layer + 1}/${p.layers}`;
    case "copy-layer":
      return `unpacking layer ${p.layer + 1}/${p.layers}`;
    case "squashfs":
      return "building the root filesystem";
    case "waiting-for-lock":
      return describeWait(p.what, p.holder);
    case "bake-waiting-for-lock":
      return describeWait("its snapshot", p.holder);
    case "bake-damaged":
      return `damaged snapshot (${p.reason}) quarantined; rebaking`;
    case "cache-refused":
      return `not imported from the cache (${p.code}); baking`;
    case "bake":
      return { boot: "booting", "extra-files": "staging extraFiles", warmup: "running the warmup", listener: "waiting for the listener", capture: "capturing", handoff: "capturing" }[p.step];
    default:
      return undefined;
  }
}
