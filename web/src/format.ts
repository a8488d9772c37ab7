/** How the page writes times, durations and values. */

/** A duration as people read it: "850 ms", "14.2 s", "3 min 12 s", "2 h 5 min". */
export function formatDuration(ms: number): string {
  if (ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.floor(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** Whole seconds, for clocks that tick: "12 s", "3 min 12 s". */
export const formatSeconds = (ms: number): string => (ms < 60_000 ? `${Math.max(0, Math.floor(ms / 1000))} s` : formatDuration(ms));

/** "5 s ago", "3 min ago", "2 h ago", "4 days ago". */
export function timeAgo(iso: string, now: number): string {
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86_400) return `${Math.floor(s / 3600)} h ago`;
  const d = Math.floor(s / 86_400);
  return `${d} day${d === 1 ? "" : "s"} ago`;
}

/** The wall-clock time of an ISO timestamp, "14:03:07". */
export const clockTime = (iso: string): string => new Date(iso).toLocaleTimeString([], { hour12: false });

/** A long identifier cut to `n` characters and an ellipsis. */
export const shortId = (id: string, n = 8): string => (id.length > n + 2 ? `${id.slice(0, n)}…` : id);

const DIGEST = /\b(?:sha256:)?([0-9a-f]{64})\b/g;

/** A value of a key input, short: digests as 12 hex digits, at most 60 characters. */
export function shortValue(v: unknown): string {
  if (v === undefined || v === null) return "none";
  const text = (typeof v === "string" ? v : JSON.stringify(v)).replace(DIGEST, (_, hex: string) => hex.slice(0, 12));
  return text.length > 60 ? `${text.slice(0, 59)}…` : text;
}
