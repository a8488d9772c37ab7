/** A small chart of a pool's acquire latency, p50 and p99 per time bucket. */
import type { AcquireBucket } from "./api.ts";
import { formatDuration } from "./format.ts";

const W = 280;
const H = 96;
const PAD = { left: 4, right: 4, top: 24, bottom: 8 };

function line(buckets: AcquireBucket[], pick: (b: AcquireBucket) => number | null, max: number): string {
  const step = buckets.length > 1 ? (W - PAD.left - PAD.right) / (buckets.length - 1) : 0;
  const h = H - PAD.top - PAD.bottom;
  return buckets
    .map((b, i) => [i, pick(b)] as const)
    .filter((p): p is readonly [number, number] => p[1] !== null)
    .map(([i, v]) => `${(PAD.left + i * step).toFixed(1)},${(PAD.top + h - (v / max) * h).toFixed(1)}`)
    .join(" ");
}

const ms = (v: number | null | undefined): string => (v === null || v === undefined ? "none" : formatDuration(v));

export function LatencyChart({ pool, buckets, bucketSeconds }: { pool: string; buckets: AcquireBucket[]; bucketSeconds: number }) {
  const max = Math.max(1, ...buckets.flatMap((b) => [b.p50Ms ?? 0, b.p99Ms ?? 0]));
  const latest = [...buckets].reverse().find((b) => b.p50Ms !== null || b.p99Ms !== null);
  const summary = latest
    ? `Acquire latency of pool ${pool}: latest p50 ${ms(latest.p50Ms)}, p99 ${ms(latest.p99Ms)}`
    : `Acquire latency of pool ${pool}: no acquires yet`;
  const span = Math.round((buckets.length * bucketSeconds) / 60);
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
          <polyline class="p99" points={line(buckets, (b) => b.p99Ms, max)} />
          <polyline class="p50" points={line(buckets, (b) => b.p50Ms, max)} />
        </svg>
      </div>
      <ul class="legend" aria-hidden="true">
        <li class="p50">p50 {ms(latest?.p50Ms)}</li>
        <li class="p99">p99 {ms(latest?.p99Ms)}</li>
      </ul>
    </figure>
  );
}
