/**
 * Each pool's recent history, for the serve page: acquire latency (p50 and p99) and cycles (a
 * sandbox created and ended) in 10-second buckets over the last 10 minutes. Prometheus's
 * histogram (`/metrics`) keeps the totals; this keeps the shape of the last minutes without a
 * scraper. A bucket holds at most `SAMPLES` latencies (a uniform sample past that), so memory
 * stays bounded under any load.
 */

export const BUCKET_SECONDS = 10;
const BUCKETS = 60;
const SAMPLES = 1024;

interface Bucket {
  /** Epoch ms of the bucket's start. */
  t: number;
  count: number;
  samples: number[];
  cycles: number;
}

export interface PoolSeriesReport {
  bucketSeconds: number;
  buckets: { t: number; count: number; p50Ms: number | null; p99Ms: number | null }[];
}

/** The value at quantile q of sorted values (nearest rank). */
export function quantile(sorted: number[], q: number): number | null {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}

class Series {
  private readonly buckets: Bucket[] = [];

  constructor(private readonly now: () => number) {}

  private current(): Bucket {
    const t = Math.floor(this.now() / (BUCKET_SECONDS * 1000)) * BUCKET_SECONDS * 1000;
    let b = this.buckets[this.buckets.length - 1];
    if (!b || b.t !== t) {
      b = { t, count: 0, samples: [], cycles: 0 };
      this.buckets.push(b);
      this.prune();
    }
    return b;
  }

  private prune(): void {
    const oldest = this.now() - BUCKETS * BUCKET_SECONDS * 1000;
    while (this.buckets.length && this.buckets[0]!.t < oldest) this.buckets.shift();
  }

  acquire(ms: number): void {
    const b = this.current();
    b.count++;
    if (b.samples.length < SAMPLES) b.samples.push(ms);
    else {
      // Reservoir sampling: every acquire of the bucket has the same chance to be kept.
      const i = Math.floor(Math.random() * b.count);
      if (i < SAMPLES) b.samples[i] = ms;
    }
  }

  cycle(): void {
    this.current().cycles++;
  }

  report(): PoolSeriesReport {
    this.prune();
    return {
      bucketSeconds: BUCKET_SECONDS,
      buckets: this.buckets.map((b) => {
        const sorted = [...b.samples].sort((x, y) => x - y);
        return { t: b.t, count: b.count, p50Ms: quantile(sorted, 0.5), p99Ms: quantile(sorted, 0.99) };
      }),
    };
  }

  /** Cycles per second over the last minute (or since the first bucket, when younger). */
  cyclesPerSecond(): number {
    this.prune();
    const now = this.now();
    const from = now - 60_000;
    let cycles = 0;
    let first = now;
    for (const b of this.buckets) {
      if (b.t + BUCKET_SECONDS * 1000 <= from) continue;
      cycles += b.cycles;
      first = Math.min(first, Math.max(b.t, from));
    }
    const seconds = Math.max(1, (now - first) / 1000);
    return cycles / seconds;
  }
}

export class PoolSeries {
  private readonly pools = new Map<string, Series>();

  constructor(private readonly now: () => number = Date.now) {}

  private of(pool: string): Series {
    let s = this.pools.get(pool);
    if (!s) this.pools.set(pool, (s = new Series(this.now)));
    return s;
  }

  /** A sandbox got a VM of `pool` in `ms`. */
  acquired(pool: string, ms: number): void {
    this.of(pool).acquire(ms);
  }

  /** A sandbox of `pool` ended (its VM went back): one cycle. */
  ended(pool: string): void {
    this.of(pool).cycle();
  }

  report(pool: string): PoolSeriesReport & { cyclesPerSecond: number } {
    const s = this.pools.get(pool);
    if (!s) return { bucketSeconds: BUCKET_SECONDS, buckets: [], cyclesPerSecond: 0 };
    return { ...s.report(), cyclesPerSecond: s.cyclesPerSecond() };
  }
}
