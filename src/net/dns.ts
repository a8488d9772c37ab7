/**
 * Transparent egress's DNS verdicts (issue 21 step 3): the guest agent answers every DNS query
 * itself and, for each name, asks the host with a `RESOLVE` request. This decides the answer
 * from the VM's EgressPolicy, in this order:
 * 1. a name no allow rule lists gets NXDOMAIN at once, and no query leaves the host;
 * 2. the `hosts` entry, otherwise the host's resolver, within a timeout (SERVFAIL after it,
 *    NXDOMAIN for a name that does not exist);
 * 3. only addresses `checkAddress` accepts for at least one port the name is allowed on count;
 *    if none is left (loopback, private, metadata... not listed by IP), REFUSED;
 * 4. otherwise ALLOW with those ports and a TTL. The addresses are kept for that TTL, so the
 *    connect that follows (to the agent's fake IP for the name) need not resolve again.
 * The guest never sees a real address: the agent answers with a fake one of its own.
 */
import { lookup } from "node:dns/promises";
import type { EgressPolicy } from "./policy.js";

/** The verdict codes on the wire (RESOLVE's OK field 1). */
export const DNS_VERDICT = { allow: 0, nxdomain: 1, refused: 2, servfail: 3 } as const;
export type DnsVerdictName = keyof typeof DNS_VERDICT;

export type DnsVerdict =
  | { verdict: "allow"; ttl: number; ports: number[]; addresses: string[] }
  | {
      verdict: "nxdomain" | "refused" | "servfail";
      ttl: number;
      reason: "not-allowed" | "not-found" | "private-address" | "timeout" | "error";
      message: string;
      /** What the name resolved to, for a `private-address` refusal (a connect re-checks them, and is refused by name). */
      addresses?: string[];
    };

export type DnsResolve = (name: string) => Promise<{ address: string }[]>;

export interface DnsDeps {
  /** The host's resolver (default: `dns.promises.lookup(name, {all: true})`). Tests pass a spy. */
  resolve?: DnsResolve;
  /** How long one resolution may take before SERVFAIL (default 5000 ms). */
  timeoutMs?: number;
  /** The TTL of answers, in seconds, and the longest the cache keeps one (default 30). */
  ttlSeconds?: number;
  /** The clock, in ms (tests move it). */
  now?: () => number;
}

export const DNS_DEFAULTS = { timeoutMs: 5000, ttlSeconds: 30 } as const;
/** Refusals are cached briefly: a client that retries does not cost a lookup each time. */
const NEGATIVE_TTL = 5;

/** One VM's DNS: its policy, its resolver and its cache of verdicts. */
export class EgressDns {
  private readonly resolveName: DnsResolve;
  private readonly timeoutMs: number;
  private readonly ttl: number;
  private readonly now: () => number;
  private readonly cache = new Map<string, { until: number; verdict: DnsVerdict }>();
  private readonly pending = new Map<string, Promise<DnsVerdict>>();
  /** Queries the guest asked (`queries`) and those it got no address for (`refused`: NXDOMAIN, REFUSED, SERVFAIL). */
  readonly counters = { queries: 0, refused: 0 };

  constructor(
    readonly policy: EgressPolicy,
    deps: DnsDeps = {},
  ) {
    this.resolveName = deps.resolve ?? ((name) => lookup(name, { all: true }));
    this.timeoutMs = deps.timeoutMs ?? DNS_DEFAULTS.timeoutMs;
    this.ttl = deps.ttlSeconds ?? DNS_DEFAULTS.ttlSeconds;
    this.now = deps.now ?? Date.now;
  }

  /**
   * The verdict on `name` (any case, trailing dot allowed). `qtype` is the DNS type the guest asked
   * for; the verdict is about the name (the agent answers A with its fake address, AAAA and other
   * types of an allowed name with no data), so it only counts here.
   */
  async resolve(name: string, qtype = 1): Promise<DnsVerdict> {
    void qtype;
    this.counters.queries++;
    return this.count(await this.verdict(name));
  }

  /**
   * The addresses a connection to `name` may go to now: those of the cached verdict, or of a
   * fresh one when it expired (so an answer that changed to a refused address since the guest's
   * query is refused here too: DNS rebinding). A `private-address` refusal yields the addresses,
   * which the caller's address check then refuses by name; no address at all throws, like
   * `dns.lookup` (`code` ENOTFOUND or ESERVFAIL). Not counted as a guest query.
   */
  async addressesFor(name: string): Promise<{ address: string }[]> {
    const v = await this.verdict(name);
    const found = v.verdict === "allow" ? v.addresses : (v.addresses ?? []);
    if (found.length > 0) return found.map((address) => ({ address }));
    throw Object.assign(new Error(v.verdict === "allow" ? "no addresses" : v.message.replace(/^supermachine: /, "")), { code: v.verdict === "servfail" ? "ESERVFAIL" : "ENOTFOUND" });
  }

  private async verdict(name: string): Promise<DnsVerdict> {
    const key = name.toLowerCase().replace(/\.$/, "");
    const hit = this.cache.get(key);
    if (hit && hit.until > this.now()) return hit.verdict;
    let job = this.pending.get(key);
    if (!job) {
      job = this.decide(key).finally(() => this.pending.delete(key));
      this.pending.set(key, job);
    }
    const verdict = await job;
    this.cache.set(key, { until: this.now() + verdict.ttl * 1000, verdict });
    return verdict;
  }

  /**
   * The answer to the agent's RESOLVE (the shape of the agent client's ResolveAnswer): the verdict,
   * its TTL and, when allowed, the ports. Never throws: an unexpected failure is SERVFAIL.
   */
  async answer(req: { name: string; qtype: number }): Promise<{ verdict: DnsVerdictName; ttl: number; ports?: number[] }> {
    try {
      const v = await this.resolve(req.name, req.qtype);
      return v.verdict === "allow" ? { verdict: "allow", ttl: v.ttl, ports: v.ports } : { verdict: v.verdict, ttl: v.ttl };
    } catch {
      return { verdict: "servfail", ttl: 0 };
    }
  }

  /** The addresses an ALLOW verdict on `name` found, while it is cached (for the connect that follows). */
  cachedAddresses(name: string): string[] | undefined {
    const hit = this.cache.get(name.toLowerCase());
    return hit && hit.until > this.now() && hit.verdict.verdict === "allow" ? hit.verdict.addresses : undefined;
  }

  private count(v: DnsVerdict): DnsVerdict {
    if (v.verdict !== "allow") this.counters.refused++;
    return v;
  }

  private async decide(name: string): Promise<DnsVerdict> {
    const ports = this.policy.portsFor(name);
    if (ports.length === 0) {
      return { verdict: "nxdomain", ttl: NEGATIVE_TTL, reason: "not-allowed", message: `supermachine: ${JSON.stringify(name)} is not in network.allow; add it (with its port) to resolve it in the guest` };
    }
    let addresses: string[];
    const mapped = this.policy.hostsEntry(name);
    if (mapped) addresses = [mapped];
    else {
      let timer: NodeJS.Timeout | undefined;
      try {
        const found = await Promise.race([
          this.resolveName(name),
          new Promise<"timeout">((done) => {
            timer = setTimeout(() => done("timeout"), this.timeoutMs);
          }),
        ]);
        if (found === "timeout") return { verdict: "servfail", ttl: 0, reason: "timeout", message: `supermachine: resolving ${name} on the host took over ${this.timeoutMs} ms` };
        addresses = found.map((a) => a.address);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === "ENOTFOUND" || code === "ENODATA") return { verdict: "nxdomain", ttl: NEGATIVE_TTL, reason: "not-found", message: `supermachine: ${name} does not resolve on the host (${code})` };
        return { verdict: "servfail", ttl: 0, reason: "error", message: `supermachine: resolving ${name} on the host failed: ${code ?? (e as Error).message}` };
      } finally {
        clearTimeout(timer);
      }
    }
    const usable = addresses.filter((a) => ports.some((p) => this.policy.checkAddress(name, p, a).allowed));
    if (usable.length === 0) {
      const why = addresses.length ? this.policy.checkAddress(name, ports[0]!, addresses[0]!) : undefined;
      return { verdict: "refused", ttl: NEGATIVE_TTL, reason: "private-address", message: why && !why.allowed ? why.message : `supermachine: ${name} resolved to no address`, addresses };
    }
    return { verdict: "allow", ttl: this.ttl, ports, addresses: usable };
  }
}
