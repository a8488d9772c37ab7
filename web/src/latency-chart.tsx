/** A small chart of a pool's acquire latency, p50 and p99 per time bucket. */
import type { AcquireBucket } from "./api.ts";
import { formatDuration } from "./format.ts";

const W = 280;
const H = 96;
const PAD = { left: 4, right: 4, top: 24, bottom: 8 };

/** The chart's time window: what the server keeps (60 buckets). */
const WINDOW_BUCKETS = 60;

/** Points of one quantile, placed by their bucket's time in the window ending now (gaps stay gaps in time). */
function line(buckets: AcquireBucket[], pick: (b: AcquireBucket) => number | null, max: number, from: number, spanMs: number): string {
  const w = W - PAD.left - PAD.right;
  const h = H - PAD.top - PAD.bottom;
  return buckets
    .map((b) => [b.t, pick(b)] as const)
    .filter((p): p is readonly [number, number] => p[1] !== null && p[0] >= from)
    .map(([t, v]) => `${(PAD.left + ((t - from) / spanMs) * w).toFixed(1)},${(PAD.top + h - (v / max) * h).toFixed(1)}`)
    .join(" ");
}

const ms = (v: number | null | undefined): string => (v === null || v === undefined ? "none" : formatDuration(v));

export function LatencyChart({ pool, buckets, bucketSeconds }: { pool: string; buckets: AcquireBucket[]; bucketSeconds: number }) {
  const max = Math.max(1, ...buckets.flatMap((b) => [b.p50Ms ?? 0, b.p99Ms ?? 0]));
  const latest = [...buckets].reverse().find((b) => b.p50Ms !== null || b.p99Ms !== null);
  const summary = latest
    ? `Acquire latency of pool ${pool}: latest p50 ${ms(latest.p50Ms)}, p99 ${ms(latest.p99Ms)}`
    : `Acquire latency of pool ${pool}: no acquires yet`;
  const bucketMs = Math.max(1, bucketSeconds) * 1000;
  const spanMs = WINDOW_BUCKETS * bucketMs;
  // The window ends with the current bucket (the newest the server could have).
  const from = Math.floor(Date.now() / bucketMs) * bucketMs - spanMs + bucketMs;
  const span = Math.round(spanMs / 60_000);
  return (
    <figure class="chart">
      <figcaption>
        Acquire latency{span > 0 ? `, last ${span} min` : ""}
      </figcaption>
      <div class="plot">
        <span class="y-max" aria-hidden="true">
          {ms(max)}
        </span>
        <svg viewBox={`0 0 ${W} ${H}`} role="img" aria-label={summary} preserveAspectRatio="none">
          <line class="axis" x1={PAD.left} y1={H - PAD.bottom} x2={W - PAD.right} y2={H - PAD.bottom} />
          <line class="grid" x1={PAD.left} y1={PAD.top} x2={W - PAD.right} y2={PAD.top} />
          {(["p99", "p50"] as const).map((q) => {
            const points = line(buckets, (b) => (q === "p50" ? b.p50Ms : b.p99Ms), max, from, spanMs);
            return (
              <g class={q} key={q}>
                <polyline points={points} />
                {/* A bucket alone is a point, which a polyline does not draw. */}
                {points.split(" ").filter(Boolean).map((p) => {
                  const [x, y] = p.split(",");
                  return <circle key={p} cx={x} cy={y} r={1.8} />;
                })}
              </g>
            );
          })}
        </svg>
      </div>
      <ul class="legend" aria-hidden="true">
        <li class="p50">p50 {ms(latest?.p50Ms)}</li>
        <li class="p99">p99 {ms(latest?.p99Ms)}</li>
      </ul>
    </figure>
  );
}
