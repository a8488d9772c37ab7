/**
 * The host side of a VM's egress (issue 12): an HTTP proxy that each connection a guest client
 * opens to the in-guest proxy port is handed to (`handle`, a Duplex: what the client sends, and
 * what goes back to it). This file holds the proxy and its per-VM budgets and counters; one
 * connection's life is ./flow.ts's. A connection reads one request head, accepts `CONNECT host:port` (then a raw
 * tunnel) and absolute-form plain HTTP (`GET http://host/path`, forwarded in origin form with
 * `Connection: close`), checks the target against the VM's policy before any DNS, resolves the
 * name on the host (`hosts` first), drops addresses the policy refuses, and connects to the
 * address itself (never the name again, so DNS cannot change between check and connect).
 * Everything else gets an HTTP error whose body says why and what to change; every refusal is
 * logged (`DEBUG=supermachine:net`). Connections at once and bytes in + out are capped per VM.
 *
 * The guest is untrusted: heads are bounded (16 KiB) and timed (30 s), nothing is buffered
 * beyond one chunk per direction (backpressure both ways), and an error on either side ends both.
 */
import { lookup } from "node:dns/promises";
import type { Duplex } from "node:stream";
import { logger } from "../debug.js";
import { NETWORK_DEFAULTS, type NetworkOption, type ResolvedNetworkOption } from "../schema/network.js";
import { EgressPolicy } from "./policy.js";
import { EGRESS_DEFAULTS, Flow } from "./flow.js";

export { EGRESS_DEFAULTS };

export interface ResolvedAddress {
  address: string;
  family?: number;
}

export interface EgressDeps {
  /** Where refusals and connections are logged (default: the `supermachine:net` debug logger). */
  log?: (format: string, ...args: unknown[]) => void;
  /** Resolves a host name (default: `dns.promises.lookup(name, { all: true })`). */
  resolve?: (name: string) => Promise<ResolvedAddress[]>;
  headTimeoutMs?: number;
  connectTimeoutMs?: number;
  lingerMs?: number;
}

export interface EgressStats {
  /** Connections handed to `handle`. */
  connections: number;
  /** Connections open now (each counts against maxConnections from `handle` until it closes). */
  active: number;
  /** Connections the policy or a limit refused (403, 429; transparent connections are reset). */
  refused: number;
  /**
   * The refusals by reason: `not-allowed` (the allowlist does not list the target),
   * `private-address` (it resolved to a loopback, private or metadata address not listed by IP),
   * `limit` (maxConnections or maxBytes), `name-mismatch` (a TLS SNI or HTTP Host the allowlist
   * does not list, sent to an allowed name's address), `stale-address` (an address of the
   * guest's DNS that no name holds any more), `disabled` (network "none").
   */
  refusedBy: Record<string, number>;
  /** Connections answered with another error (400, 408, 431, 502, 504). */
  failed: number;
  /** Bytes written to the guest (responses, tunnelled data, the proxy's own answers). */
  bytesIn: number;
  /** Bytes received from the guest (request heads included). */
  bytesOut: number;
}

export class EgressProxy {
  readonly policy: EgressPolicy;
  private readonly flows = new Set<Flow>();
  private readonly log: (format: string, ...args: unknown[]) => void;
  readonly resolveName: (name: string) => Promise<ResolvedAddress[]>;
  readonly headTimeoutMs: number;
  readonly connectTimeoutMs: number;
  readonly lingerMs: number;
  private readonly counters = { connections: 0, refused: 0, failed: 0, bytesIn: 0, bytesOut: 0 };
  private readonly refusedBy: Record<string, number> = {};
  private used = 0;
  private exhausted = false;
  private closed = false;

  /** `options`: the VM's `network` option, raw (validated here: NetworkError) or resolved. With "none" every request is refused. */
  constructor(options: NetworkOption | ResolvedNetworkOption, deps: EgressDeps = {}) {
    this.policy = new EgressPolicy(options);
    this.log = deps.log ?? logger("net");
    this.resolveName = deps.resolve ?? ((name) => lookup(name, { all: true }));
    this.headTimeoutMs = deps.headTimeoutMs ?? EGRESS_DEFAULTS.headTimeoutMs;
    this.connectTimeoutMs = deps.connectTimeoutMs ?? EGRESS_DEFAULTS.connectTimeoutMs;
    this.lingerMs = deps.lingerMs ?? EGRESS_DEFAULTS.lingerMs;
  }

  get maxConnections(): number {
    return this.policy.settings?.maxConnections ?? NETWORK_DEFAULTS.maxConnections;
  }
  get maxBytes(): number {
    return this.policy.settings?.maxBytes ?? NETWORK_DEFAULTS.maxBytes;
  }

  /** Serves one guest connection to the proxy port; never throws (a closed proxy destroys it). */
  handle(conn: Duplex): void {
    const flow = this.admit(conn);
    if (flow) flow.start();
  }

  /**
   * Serves one connection the guest opened straight to `dst` (transparent egress): `name` is the
   * allowed name the guest's DNS gave that address for (absent for an address the program had
   * itself). There is no HTTP to answer in: a refusal resets the connection. Never throws.
   */
  handleTransparent(conn: Duplex, dst: { address: string; port: number }, name?: string): void {
    const flow = this.admit(conn, true);
    if (flow) flow.startTransparent(dst, name);
  }

  private admit(conn: Duplex, transparent = false): Flow | undefined {
    if (this.closed) {
      conn.destroy();
      return undefined;
    }
    this.counters.connections++;
    const flow = new Flow(this, conn, transparent);
    this.flows.add(flow);
    if (this.exhausted) flow.refuseBytes();
    else if (this.activeCount() >= this.maxConnections) flow.refuseConnections();
    else return flow;
    return undefined;
  }

  stats(): EgressStats {
    return { ...this.counters, refusedBy: { ...this.refusedBy }, active: this.activeCount() };
  }

  /** Destroys every connection, pending connect and timer; resolves once their sockets are closed. Idempotent. */
  async close(): Promise<void> {
    this.closed = true;
    const waits = [...this.flows].map((f) => f.destroy());
    this.flows.clear();
    await Promise.all(waits);
  }

  // ---- for Flow ----

  /** @internal */
  activeCount(): number {
    let n = 0;
    for (const f of this.flows) if (f.holdsSlot) n++;
    return n;
  }
  /** @internal */
  forget(flow: Flow): void {
    this.flows.delete(flow);
  }
  /** @internal How many of `n` bytes may still be carried; counts them. */
  take(dir: "in" | "out", n: number): number {
    const max = this.maxBytes;
    const k = Math.max(0, Math.min(n, max - this.used));
    this.used += k;
    if (dir === "in") this.counters.bytesIn += k;
    else this.counters.bytesOut += k;
    if (k < n) this.exhaust();
    return k;
  }
  /** @internal Bytes the proxy answers itself: counted, not capped. */
  count(dir: "in" | "out", n: number): void {
    this.used += n;
    if (dir === "in") this.counters.bytesIn += n;
    else this.counters.bytesOut += n;
  }
  /** @internal */
  refused(status: number, reason: string, message: string): void {
    if (status === 403 || status === 429) {
      this.counters.refused++;
      this.refusedBy[reason] = (this.refusedBy[reason] ?? 0) + 1;
    } else this.counters.failed++;
    this.log("refused %d (%s): %s", status, reason, message);
  }
  /** @internal */
  debug(format: string, ...args: unknown[]): void {
    this.log(format, ...args);
  }
  /** @internal */
  isExhausted(): boolean {
    return this.exhausted;
  }
  private exhaust(): void {
    if (this.exhausted) return;
    this.exhausted = true;
    this.log("network.maxBytes (%d) reached: ending %d connection(s)", this.maxBytes, this.flows.size);
    queueMicrotask(() => {
      for (const f of [...this.flows]) f.onExhausted();
    });
  }
}

