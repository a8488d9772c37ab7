/**
 * What `/metrics` reports, in Prometheus's text format (prom-client): the pools (VMs idle, in use,
 * waiters), sandboxes (created, alive, lifetimes), acquire latency, processes and execs started,
 * bakes, egress bytes, and HTTP requests; plus the Node process's own (CPU, memory, event loop).
 * One registry per server, so two servers in a process (tests) do not mix their counts.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import type { PoolStats } from "../runtime/pool.js";

export class ServerMetrics {
  readonly registry = new Registry();
  readonly acquireSeconds: Histogram<"pool">;
  readonly sandboxCreates: Counter<"pool" | "result">;
  readonly sandboxLifetime: Histogram<"pool">;
  readonly processes: Counter<"pool" | "kind">;
  readonly bakes: Counter<"status">;
  readonly egressBytes: Counter<"direction">;
  readonly egressRefused: Counter<"reason">;
  readonly egressDns: Counter<"answer">;
  readonly requests: Counter<"method" | "route" | "status">;

  constructor(pools: () => Record<string, PoolStats>, alive: () => Record<string, number>) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry, prefix: "supermachine_process_" });
    const gauge = (name: string, help: string, labels: string[], collect: (g: Gauge<string>) => void) =>
      new Gauge({ name, help, labelNames: labels, registers, collect(this: Gauge<string>) {
        this.reset();
        collect(this);
      } });
    gauge("supermachine_pool_vms", "VMs of a pool, by state (idle: ready to hand out; in_use: checked out)", ["pool", "state"], (g) => {
      for (const [pool, s] of Object.entries(pools())) {
        g.set({ pool, state: "idle" }, s.idle);
        g.set({ pool, state: "in_use" }, s.inUse);
      }
    });
    gauge("supermachine_pool_waiting", "acquire() callers waiting for a VM of the pool", ["pool"], (g) => {
      for (const [pool, s] of Object.entries(pools())) g.set({ pool }, s.waiting);
    });
    gauge("supermachine_pool_max", "VMs a pool keeps alive at most", ["pool"], (g) => {
      for (const [pool, s] of Object.entries(pools())) g.set({ pool }, s.max);
    });
    gauge("supermachine_sandboxes_alive", "Sandboxes alive, by pool", ["pool"], (g) => {
      for (const [pool, n] of Object.entries(alive())) g.set({ pool }, n);
    });
    this.acquireSeconds = new Histogram({
      name: "supermachine_acquire_seconds",
      help: "Time to get a VM from a pool for a new sandbox",
      labelNames: ["pool"],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    });
    this.sandboxCreates = new Counter({ name: "supermachine_sandbox_creates_total", help: "Sandbox creates, by result (ok, limit, error)", labelNames: ["pool", "result"], registers });
    this.sandboxLifetime = new Histogram({
      name: "supermachine_sandbox_lifetime_seconds",
      help: "How long sandboxes lived, from create to release",
      labelNames: ["pool"],
      buckets: [0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400],
      registers,
    });
    this.processes = new Counter({ name: "supermachine_processes_total", help: "Processes started in sandboxes, by kind (exec: run to completion; spawn: streamed)", labelNames: ["pool", "kind"], registers });
    this.bakes = new Counter({ name: "supermachine_bakes_total", help: "Images the server's project built, by outcome (baked, cached, imported, failed, ...)", labelNames: ["status"], registers });
    this.egressBytes = new Counter({ name: "supermachine_egress_bytes_total", help: "Bytes sandboxes moved through egress, by direction (in: to the guest)", labelNames: ["direction"], registers });
    this.egressRefused = new Counter({
      name: "supermachine_egress_refused_total",
      help: "Sandbox connections egress refused, by reason (not-allowed, private-address, limit, name-mismatch, stale-address)",
      labelNames: ["reason"],
      registers,
    });
    this.egressDns = new Counter({ name: "supermachine_egress_dns_queries_total", help: "DNS queries of sandboxes (transparent egress), by answer (address, none)", labelNames: ["answer"], registers });
    this.requests = new Counter({ name: "supermachine_http_requests_total", help: "HTTP requests, by method, route and status", labelNames: ["method", "route", "status"], registers });
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
