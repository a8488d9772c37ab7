/** The pools: a card each with its numbers and its acquire latency, polled every 2 s. */
import type { PoolInfo } from "./api.ts";
import { ErrorNote } from "./error-note.tsx";
import { usePoll } from "./hooks.ts";
import { LatencyChart } from "./latency-chart.tsx";

export function PoolsView() {
  const { data, error } = usePoll<{ pools: PoolInfo[] }>("/v1/pools", 2000);
  return (
    <section class="view" aria-labelledby="pools-title">
      <h2 id="pools-title">Pools</h2>
      <ErrorNote error={error} />
      {data && data.pools.length === 0 && <p>No pools configured.</p>}
      <div class="cards">
        {data?.pools.map((p) => <PoolCard key={p.name} pool={p} />)}
      </div>
    </section>
  );
}

function PoolCard({ pool }: { pool: PoolInfo }) {
  const s = pool.stats;
  const numbers: [string, number | string][] = [
    ["Min", s.min],
    ["Max", s.max],
    ["Alive", s.alive],
    ["Idle", s.idle],
    ["In use", s.inUse],
    ["Waiting", s.waiting],
    ["Cycles/s", pool.cyclesPerSecond.toFixed(1)],
  ];
  return (
    <article class="card" data-pool={pool.name} aria-labelledby={`pool-${pool.name}`}>
      <h3 id={`pool-${pool.name}`}>{pool.name}</h3>
      <p class="muted">
        Image {pool.image ? <code>{pool.image}</code> : "none"} · {s.memoryMib} MiB · {s.vcpus} vCPU
      </p>
      <dl class="numbers">
        {numbers.map(([label, value]) => (
          <div key={label}>
            <dt>{label}</dt>
            <dd>{value}</dd>
          </div>
        ))}
      </dl>
      <LatencyChart pool={pool.name} buckets={pool.acquire.buckets} bucketSeconds={pool.acquire.bucketSeconds} />
    </article>
  );
}
