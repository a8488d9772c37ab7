/**
 * The sandboxes a server hands out: each is one VM acquired from a project pool, with an id
 * (20 lowercase letters and digits: DNS-safe, no `-`, as E2B's), an access token for its data
 * plane, the key that created it, metadata, an environment for its processes, and a life that
 * ends at `endAt` (then it is released to its pool). Sandboxes belong to the key that created
 * them: another key neither sees nor touches them.
 */
import { randomBytes } from "node:crypto";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import { supermachineHome } from "../paths.js";
import type { Pools, ProjectPool } from "../project/pools.js";
import type { Vm } from "../runtime/vm.js";
import type { Pool } from "../runtime/pool.js";
import { SupermachineError } from "../errors.js";
import { ServerError } from "./errors.js";
import type { KeyRecord } from "./keys.js";
import type { ServerMetrics } from "./metrics.js";
import type { ServerEvents } from "./events.js";
import type { PoolSeries } from "./pool-series.js";
import { ProcessTable } from "./processes.js";
import { parseNetwork } from "../schema/network.js";
import { newNodeTag, randomAlnum, TAG_LENGTH } from "./node-tag.js";

export const DEFAULT_SANDBOX_TIMEOUT_MS = 300_000;
export const MAX_SANDBOX_TIMEOUT_MS = 24 * 3_600_000;

/** 20 characters from [a-z0-9]: 14 from a CSPRNG, then the node's tag (src/server/node-tag.ts). */
export const newSandboxId = (tag: string): string => randomAlnum(20 - TAG_LENGTH) + tag;

/** A sandbox's data-plane credential: 48 hex digits from a CSPRNG, then the node's tag. */
export const newAccessToken = (tag: string): string => randomBytes(24).toString("hex") + tag;

/** A project's pools by name (what `loadPools` returns holds `close` beside them). */
export function poolEntries(pools: Pools): [string, ProjectPool][] {
  return Object.entries(pools).filter((e): e is [string, ProjectPool] => typeof (e[1] as Partial<ProjectPool>)?.acquire === "function");
}

export interface CreateSandbox {
  pool: string;
  key: KeyRecord;
  timeoutMs?: number | undefined;
  metadata?: Record<string, string> | undefined;
  env?: Record<string, string> | undefined;
  /** Acquire from this pool instead of the project's pool named `pool` (snapshots of the native API). */
  source?: ProjectPool | undefined;
  /**
   * Egress of this sandbox (the `network` option's forms), on a pool without its own: only when
   * the server lets clients ask for it (`allowSandboxNetwork`).
   */
  network?: unknown;
}

/** Where paused sandboxes' snapshots live (removed when the sandbox is killed or the server drains). */
export const pausedRoot = (): string => join(supermachineHome(), "server", "paused");

export class Sandbox {
  processes = new ProcessTable();
  state: "running" | "paused" = "running";
  /** A paused sandbox's snapshot, and after its resume the one-VM pool its VM came from. */
  paused: { dir: string; pool?: Pool } | undefined;
  readonly startedAt = new Date();
  endAt: Date;
  private timer: NodeJS.Timeout | undefined;
  /** Per-sandbox facts the profiles look up once (the shell, the user's home). */
  readonly facts = new Map<string, Promise<unknown>>();
  /** Run when the sandbox ends, before its VM goes back to the pool (tunnels into the guest close). */
  readonly cleanups = new Set<() => void>();
  /** Processes started in it through the server (execs and spawns, native and E2B). */
  execs = 0;

  constructor(
    readonly id: string,
    readonly pool: string,
    readonly keyId: string,
    public vm: Vm,
    readonly accessToken: string,
    readonly metadata: Record<string, string>,
    readonly env: Record<string, string>,
    readonly memoryMib: number,
    readonly vcpus: number,
    timeoutMs: number,
    private readonly expire: (s: Sandbox) => void,
  ) {
    this.endAt = new Date();
    this.setTimeout(timeoutMs);
  }

  /** The sandbox now lives `ms` from now (not added to what was left, as E2B's setTimeout). */
  setTimeout(ms: number): void {
    clearTimeout(this.timer);
    this.endAt = new Date(Date.now() + ms);
    this.timer = setTimeout(() => this.expire(this), ms);
    this.timer.unref();
  }

  /** Bytes its egress moved both ways since it was created (0 while paused or without network). */
  egressBytes(): number {
    if (this.state !== "running") return 0;
    const net = this.vm.netStats();
    return net.bytesIn + net.bytesOut;
  }

  /** Paused sandboxes do not run out of time; a resume gives them a new life. */
  clearTimer(): void {
    clearTimeout(this.timer);
  }

  /** A fact computed once per sandbox. */
  fact<T>(name: string, compute: () => Promise<T>): Promise<T> {
    let p = this.facts.get(name) as Promise<T> | undefined;
    if (!p) {
      p = compute();
      this.facts.set(name, p);
      p.catch(() => this.facts.delete(name));
    }
    return p;
  }
}

export interface SandboxRegistryOptions {
  /** Creates may give a sandbox egress of its own (`network`): off unless the operator allows it. */
  allowSandboxNetwork?: boolean;
  defaultTimeoutMs?: number;
  maxTimeoutMs?: number;
  metrics?: ServerMetrics | undefined;
  log?: (msg: string, fields?: Record<string, unknown>) => void;
  /** This node's tag, which every id and token it hands out ends with (default: a new one). */
  nodeTag?: string;
  /** The most sandboxes this node holds at once (default: no limit); creates past it are refused (SERVER_FULL). */
  capacity?: number;
  /** The server's event feed: sandboxes created and ended, creates that failed. */
  events?: ServerEvents;
  /** Each pool's recent acquire latencies and cycles. */
  series?: PoolSeries;
}

/** Counts a process started in `sb`: its exec count and the server's metric. */
export function countProcess(sb: Sandbox, metrics: ServerMetrics | undefined, kind: "exec" | "spawn"): void {
  sb.execs++;
  metrics?.processes.inc({ pool: sb.pool, kind });
}

export class SandboxRegistry {
  readonly nodeTag: string;
  private readonly byId = new Map<string, Sandbox>();
  private readonly byToken = new Map<string, Sandbox>();
  /** Creates in flight per key, counted against its limit with the live ones. */
  private readonly creating = new Map<string, number>();
  /** Creates in flight, all keys. */
  creatingTotal = 0;
  private draining = false;
  readonly defaultTimeoutMs: number;
  readonly maxTimeoutMs: number;

  constructor(
    private readonly pools: Pools,
    private readonly options: SandboxRegistryOptions = {},
  ) {
    this.defaultTimeoutMs = options.defaultTimeoutMs ?? DEFAULT_SANDBOX_TIMEOUT_MS;
    this.maxTimeoutMs = options.maxTimeoutMs ?? MAX_SANDBOX_TIMEOUT_MS;
    this.nodeTag = options.nodeTag ?? newNodeTag();
    // A VM that dies (the guest crashed, QEMU was killed) ends its sandbox: it is gone for
    // clients as it is for the pool, which replaces the VM. Checked every second (a flag read per
    // sandbox), rather than a callback per sandbox on a VM that a pool may hand out many times.
    this.sweeper = setInterval(() => {
      for (const [id, sb] of this.byId) {
        if (sb.state === "running" && !this.pausing.has(id) && !sb.vm.machine.alive) {
          this.options.log?.("sandbox's VM exited", { sandbox: id, pool: sb.pool });
          void this.kill(id, undefined, "vm-exited").catch(() => {});
        }
      }
    }, 1_000);
    this.sweeper.unref();
  }

  private readonly sweeper: NodeJS.Timeout;

  get isDraining(): boolean {
    return this.draining;
  }

  poolNames(): string[] {
    return poolEntries(this.pools).map(([name]) => name);
  }

  /** The project's pools by name. */
  poolList(): [string, ProjectPool][] {
    return poolEntries(this.pools);
  }

  /** A timeout a client asked for, checked and capped (SERVER_BAD_REQUEST past the maximum). */
  checkTimeout(ms: number | undefined, what: string): number {
    if (ms === undefined) return this.defaultTimeoutMs;
    if (!Number.isFinite(ms) || ms <= 0) throw new ServerError("SERVER_BAD_REQUEST", `${what} must be a positive number, not ${ms}`, { hint: "give the sandbox's life in seconds (E2B) or timeoutMs (native API)" });
    if (ms > this.maxTimeoutMs) {
      throw new ServerError("SERVER_BAD_REQUEST", `${what} ${ms / 1000} s is over this server's maximum of ${this.maxTimeoutMs / 1000} s`, { hint: "ask for less, or start the server with a higher --max-timeout" });
    }
    return ms;
  }

  async create(o: CreateSandbox): Promise<Sandbox> {
    if (this.draining) throw new ServerError("SERVER_DRAINING", "the server is shutting down and creates no new sandboxes", { hint: "retry against another server, or once it is back" });
    const pool = o.source ?? this.pools[o.pool];
    if (!pool || (!o.source && !this.poolNames().includes(o.pool))) {
      throw new ServerError("SERVER_POOL_UNKNOWN", `no pool named ${JSON.stringify(o.pool)} on this server (it has ${this.poolNames().map((n) => JSON.stringify(n)).join(", ") || "none"})`, {
        hint: "name one of the project's pools (its supermachine.config.ts `pools`) as the template",
      });
    }
    const timeoutMs = this.checkTimeout(o.timeoutMs, "timeout");
    const network = o.network === undefined ? "none" : parseNetwork(o.network, "network");
    if (network !== "none" && !this.options.allowSandboxNetwork) {
      throw new ServerError("SERVER_BAD_REQUEST", "this server does not let a create give its sandbox network", {
        hint: "declare `network` on the pool in the project, or start the server with --allow-sandbox-network",
      });
    }
    const capacity = this.options.capacity;
    if (capacity !== undefined && this.byId.size + this.creatingTotal >= capacity) {
      this.options.metrics?.sandboxCreates.inc({ pool: o.pool, result: "full" });
      throw new ServerError("SERVER_FULL", `this node holds ${this.byId.size} sandboxes and creates ${this.creatingTotal} more, its capacity is ${capacity}`, {
        hint: "a front places the create on another node; alone, kill sandboxes or start the server with a higher --capacity",
      });
    }
    const held = this.countFor(o.key.id) + (this.creating.get(o.key.id) ?? 0);
    if (o.key.maxSandboxes !== undefined && held >= o.key.maxSandboxes) {
      this.options.metrics?.sandboxCreates.inc({ pool: o.pool, result: "limit" });
      throw new ServerError("SERVER_LIMIT", `the key ${o.key.name} (${o.key.prefix}…) already has ${held} of its ${o.key.maxSandboxes} sandboxes`, {
        hint: "kill sandboxes it no longer needs, or create a key with a higher --max-sandboxes",
      });
    }
    this.creating.set(o.key.id, (this.creating.get(o.key.id) ?? 0) + 1);
    this.creatingTotal++;
    const t0 = performance.now();
    let vm: Vm;
    try {
      vm = await pool.acquire();
    } catch (err) {
      this.options.metrics?.sandboxCreates.inc({ pool: o.pool, result: "error" });
      this.options.events?.emit({ kind: "error", type: "create", message: `a sandbox of pool ${o.pool} could not be created: ${(err as Error).message}`, code: (err as { code?: string }).code ?? null }, o.key.id);
      throw err;
    } finally {
      this.creating.set(o.key.id, (this.creating.get(o.key.id) ?? 1) - 1);
      this.creatingTotal--;
    }
    if (network !== "none") {
      if (vm.hasEgress) {
        await vm.release().catch(() => {});
        throw new ServerError("SERVER_CONFLICT", `pool ${JSON.stringify(o.pool)} sets its own network; a sandbox of it cannot have another`, {
          hint: "leave network out of the create, or use a pool without network",
        });
      }
      try {
        await vm.startEgress(network);
      } catch (err) {
        await vm.release().catch(() => {});
        throw err;
      }
    }
    const acquireMs = performance.now() - t0;
    this.options.metrics?.acquireSeconds.observe({ pool: o.pool }, acquireMs / 1000);
    this.options.series?.acquired(o.pool, acquireMs);
    this.options.metrics?.sandboxCreates.inc({ pool: o.pool, result: "ok" });
    if (this.draining) {
      await vm.release().catch(() => {});
      throw new ServerError("SERVER_DRAINING", "the server began shutting down while this sandbox was being created", { hint: "retry against another server, or once it is back" });
    }
    const stats = pool.stats();
    let id = newSandboxId(this.nodeTag);
    while (this.byId.has(id)) id = newSandboxId(this.nodeTag);
    const sb = new Sandbox(id, o.pool, o.key.id, vm, newAccessToken(this.nodeTag), o.metadata ?? {}, o.env ?? {}, stats.memoryMib, stats.vcpus, timeoutMs, (s) => {
      this.options.log?.("sandbox timed out", { sandbox: s.id, pool: s.pool });
      void this.kill(s.id, undefined, "timed-out").catch(() => {});
    });
    this.byId.set(id, sb);
    this.byToken.set(sb.accessToken, sb);
    this.options.events?.emit({ kind: "sandbox", type: "created", sandbox: id, pool: o.pool }, o.key.id);
    return sb;
  }

  /** The sandbox `id` if `key` may see it. */
  get(id: string, key?: KeyRecord): Sandbox | undefined {
    const sb = this.byId.get(id);
    return sb && (key === undefined || sb.keyId === key.id) ? sb : undefined;
  }

  /** Like get, with SERVER_NOT_FOUND when there is none. */
  require(id: string, key: KeyRecord | undefined, what: string): Sandbox {
    const sb = this.get(id, key);
    if (!sb) throw new ServerError("SERVER_NOT_FOUND", `${what}: no sandbox ${JSON.stringify(id)} on this server`, { hint: "it may have timed out or been killed; list the sandboxes to see which are alive" });
    return sb;
  }

  withToken(token: string): Sandbox | undefined {
    return this.byToken.get(token);
  }

  list(key?: KeyRecord, metadata?: Record<string, string>, pool?: string): Sandbox[] {
    return [...this.byId.values()].filter(
      (s) => (key === undefined || s.keyId === key.id) && (pool === undefined || s.pool === pool) && Object.entries(metadata ?? {}).every(([k, v]) => s.metadata[k] === v),
    );
  }

  countFor(keyId: string): number {
    let n = 0;
    for (const s of this.byId.values()) if (s.keyId === keyId) n++;
    return n;
  }

  alivePerPool(): Record<string, number> {
    const out: Record<string, number> = Object.fromEntries(this.poolNames().map((n) => [n, 0]));
    for (const s of this.byId.values()) out[s.pool] = (out[s.pool] ?? 0) + 1;
    return out;
  }

  /**
   * Pauses a running sandbox: its VM (memory, processes, files) is captured into a snapshot of its
   * own, then released; SERVER_CONFLICT when it is paused already. Its processes' streams end.
   */
  async pause(id: string, key: KeyRecord | undefined): Promise<void> {
    const sb = this.require(id, key, `pause ${id}`);
    if (sb.state === "paused" || this.pausing.has(id)) throw new ServerError("SERVER_CONFLICT", `sandbox ${id} is already paused`, { hint: "resume it with connect" });
    this.pausing.add(id);
    try {
      const dir = join(pausedRoot(), id);
      await rm(dir, { recursive: true, force: true });
      await sb.vm.snapshot(dir);
      const old = { vm: sb.vm, pool: sb.paused?.pool };
      sb.state = "paused";
      sb.paused = { dir };
      sb.clearTimer();
      sb.processes = new ProcessTable();
      await old.vm.release().catch(() => {});
      await old.pool?.shutdown();
    } finally {
      this.pausing.delete(id);
    }
  }

  /** Resumes a paused sandbox from its snapshot (true), or leaves a running one as it is (false). */
  async resume(id: string, key: KeyRecord | undefined, timeoutMs: number): Promise<boolean> {
    const sb = this.require(id, key, `resume ${id}`);
    if (sb.state === "running") return false;
    const { Image } = await import("../runtime/image.js");
    const image = await Image.fromSnapshot(sb.paused!.dir);
    const user = sb.vm.processDefaults.user;
    const pool = await image.pool({ min: 1, max: 1, ...(user ? { user } : {}) });
    try {
      sb.vm = await pool.acquire();
    } catch (err) {
      await pool.shutdown();
      throw err;
    }
    sb.paused = { dir: sb.paused!.dir, pool };
    sb.state = "running";
    sb.setTimeout(timeoutMs);
    return true;
  }

  private readonly pausing = new Set<string>();

  /** Releases the sandbox's VM to its pool; false when there was none. `why` goes to the event feed. */
  async kill(id: string, key?: KeyRecord, why: "killed" | "timed-out" | "vm-exited" = "killed"): Promise<boolean> {
    const sb = this.get(id, key);
    if (!sb) return false;
    this.byId.delete(id);
    this.byToken.delete(sb.accessToken);
    this.options.events?.emit({ kind: "sandbox", type: why, sandbox: id, pool: sb.pool }, sb.keyId);
    this.options.series?.ended(sb.pool);
    sb.clearTimer();
    for (const cleanup of sb.cleanups) cleanup();
    sb.cleanups.clear();
    const m = this.options.metrics;
    if (m) {
      m.sandboxLifetime.observe({ pool: sb.pool }, (Date.now() - sb.startedAt.getTime()) / 1000);
      const net = sb.state === "running" ? sb.vm.netStats() : { bytesIn: 0, bytesOut: 0, refusedBy: {}, dnsQueries: 0, dnsRefused: 0 };
      if (net.bytesIn) m.egressBytes.inc({ direction: "in" }, net.bytesIn);
      if (net.bytesOut) m.egressBytes.inc({ direction: "out" }, net.bytesOut);
      for (const [reason, n] of Object.entries(net.refusedBy)) m.egressRefused.inc({ reason }, n);
      if (net.dnsQueries > net.dnsRefused) m.egressDns.inc({ answer: "address" }, net.dnsQueries - net.dnsRefused);
      if (net.dnsRefused) m.egressDns.inc({ answer: "none" }, net.dnsRefused);
    }
    if (sb.paused) {
      // Paused, or resumed into a pool of its own: that pool and the snapshot go with it.
      if (sb.state === "running") await sb.vm.release().catch(() => {});
      await sb.paused.pool?.shutdown();
      await rm(sb.paused.dir, { recursive: true, force: true });
      return true;
    }
    await sb.vm.release().catch((err: unknown) => {
      if (!(err instanceof SupermachineError)) throw err;
    });
    return true;
  }

  get size(): number {
    return this.byId.size;
  }

  /**
   * Stops creating; lets live sandboxes run for up to `graceMs` (or until they are all killed or
   * time out), then releases what is left.
   */
  async drain(graceMs: number): Promise<void> {
    this.draining = true;
    clearInterval(this.sweeper);
    const deadline = Date.now() + graceMs;
    while (this.byId.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, Math.min(100, Math.max(1, deadline - Date.now()))));
    await Promise.all([...this.byId.keys()].map((id) => this.kill(id)));
  }
}
