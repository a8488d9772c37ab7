/**
 * `connect(url, { apiKey })`: the pools of a `supermachine serve` server, shaped like what
 * `loadPools()` returns: pools by name with `acquire`, `stats` and `shutdown`, plus `close()`
 * and `await using`. A program written for loadPools() runs against a server by changing the
 * line that gets the pools.
 *
 * @example
 * const pools = await connect("http://127.0.0.1:8080", { apiKey: process.env.SUPERMACHINE_API_KEY });
 * {
 *   await using vm = await pools.agent.acquire();
 *   await vm.exec({ argv: ["python3", "-V"] });
 * }
 * await pools.close();
 */
import { OptionError, PoolError } from "../errors.js";
import { requestJson, type Endpoint } from "./http.js";
import { RemoteVm, type SandboxInfo } from "./vm.js";

export interface ConnectOptions {
  /** A key from `supermachine keys create` (default: $SUPERMACHINE_API_KEY). */
  apiKey?: string | undefined;
  /** Aborts every request and socket of this client. */
  signal?: AbortSignal | undefined;
  /** The life each sandbox is given on the server, renewed while held (default 300 000 ms). */
  sandboxTimeoutMs?: number | undefined;
}

/** What the local PoolStats holds. */
export interface RemotePoolStats {
  alive: number;
  inUse: number;
  idle: number;
  waiting: number;
  min: number;
  max: number;
  memoryMib: number;
  vcpus: number;
}

export interface AcquireOptions {
  /** Metadata of the sandbox on the server (listed and filtered by). */
  metadata?: Record<string, string>;
  /** Environment of every process started in the sandbox. */
  env?: Record<string, string>;
}

/**
 * A pool of the server (or of a snapshot taken on it). `stats()` is synchronous, as locally: it
 * returns what the server said at the last acquire, release or `refreshStats()`.
 */
export class RemotePool {
  private closed = false;
  private readonly held = new Set<RemoteVm>();
  private last: RemotePoolStats;

  /** @internal */
  constructor(
    private readonly ep: Endpoint,
    /** The pool's name on the server (for a snapshot's pool, `snapshot:<id>`). */
    readonly name: string,
    stats: RemotePoolStats | undefined,
    private readonly lifeMs: number,
    private readonly snapshot?: string,
  ) {
    this.last = stats ?? { alive: 0, inUse: 0, idle: 0, waiting: 0, min: 0, max: 0, memoryMib: 0, vcpus: 0 };
  }

  /** A sandbox of this pool on the server, as a VM. */
  async acquire(options: AcquireOptions = {}): Promise<RemoteVm> {
    if (this.closed) throw new PoolError("POOL_SHUT_DOWN", "pool.acquire: the pool has been shut down");
    const info = await requestJson<SandboxInfo>(this.ep, "/v1/sandboxes", `pool.acquire (${this.name})`, {
      method: "POST",
      json: { ...(this.snapshot ? { snapshot: this.snapshot } : { pool: this.name }), timeoutMs: this.lifeMs, ...options },
    });
    const vm = new RemoteVm(this.ep, info, this.lifeMs, async (v) => {
      this.held.delete(v);
      await this.refreshStats().catch(() => {});
    });
    if (this.closed) {
      await vm.release();
      throw new PoolError("POOL_SHUT_DOWN", "pool.acquire: the pool was shut down while waiting");
    }
    this.held.add(vm);
    await this.refreshStats().catch(() => {});
    return vm;
  }

  stats(): RemotePoolStats {
    return { ...this.last };
  }

  /** Asks the server for the pool's stats now. */
  async refreshStats(): Promise<RemotePoolStats> {
    if (this.snapshot) return this.stats();
    const r = await requestJson<{ stats: RemotePoolStats }>(this.ep, `/v1/pools/${encodeURIComponent(this.name)}`, `pool.stats (${this.name})`);
    this.last = r.stats;
    return this.stats();
  }

  /** Releases the VMs this client holds from the pool and refuses later acquires (the server's pool goes on). */
  async shutdown(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.held].map((vm) => vm.release().catch(() => {})));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.shutdown();
  }
}

/** The server's pools by name, `close()`, and the pools of snapshots taken there. */
export type RemotePools = { readonly [name: string]: RemotePool } & {
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
  /** A pool of VMs restored from a snapshot `vm.snapshot()` took on this server. */
  fromSnapshot(id: string): RemotePool;
  /** The server's URL. */
  readonly url: string;
};

export async function connect(url: string, options: ConnectOptions = {}): Promise<RemotePools> {
  let base: URL;
  try {
    base = new URL(url);
  } catch {
    throw new OptionError("OPTION_INVALID", `connect: url ${JSON.stringify(url)} is not a URL`, { hint: "for example http://127.0.0.1:8080" });
  }
  if (base.protocol !== "http:" && base.protocol !== "https:") throw new OptionError("OPTION_INVALID", `connect: url ${JSON.stringify(url)} is not http(s)`, { hint: "for example http://127.0.0.1:8080" });
  const apiKey = options.apiKey ?? process.env.SUPERMACHINE_API_KEY;
  if (!apiKey) throw new OptionError("OPTION_MISSING", "connect: no apiKey (and no SUPERMACHINE_API_KEY)", { hint: "make one with `supermachine keys create` on the server's host" });
  const lifeMs = options.sandboxTimeoutMs ?? 300_000;
  if (!Number.isInteger(lifeMs) || lifeMs < 3_000) throw new OptionError("OPTION_INVALID", `connect: sandboxTimeoutMs must be an integer of at least 3000, got ${String(lifeMs)}`);
  const ep: Endpoint = { url: base.origin + base.pathname.replace(/\/+$/, ""), apiKey, signal: options.signal };
  const { pools } = await requestJson<{ pools: Array<{ name: string; stats: RemotePoolStats }> }>(ep, "/v1/pools", "connect");
  const out: Record<string, RemotePool> = {};
  for (const p of pools) out[p.name] = new RemotePool(ep, p.name, p.stats, lifeMs);
  const extra: RemotePool[] = [];
  const close = async () => {
    await Promise.all([...Object.values(out), ...extra].map((p) => p.shutdown()));
  };
  Object.defineProperty(out, "close", { value: close, enumerable: false });
  Object.defineProperty(out, Symbol.asyncDispose, { value: close, enumerable: false });
  Object.defineProperty(out, "url", { value: ep.url, enumerable: false });
  Object.defineProperty(out, "fromSnapshot", {
    enumerable: false,
    value: (id: string) => {
      const pool = new RemotePool(ep, `snapshot:${id}`, undefined, lifeMs, id);
      extra.push(pool);
      return pool;
    },
  });
  return out as unknown as RemotePools;
}
