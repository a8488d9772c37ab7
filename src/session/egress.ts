/**
 * A VM's egress (`network: { allow }`): the agent listens on the guest's loopback proxy port,
 * every exec finds it through the proxy variables, and each connection a guest process makes
 * there comes to the host as a stream, which the egress proxy (`src/net/`) checks against the
 * allowlist and carries to the outside world. The guest has no network device.
 *
 * In transparent mode (the default) the agent also takes every TCP connection a guest program
 * opens to an outside address, and answers every DNS query: each query is decided here
 * (EgressDns: an allowed name gets an address of the agent's, any other NXDOMAIN with no
 * lookup), and each connection is checked by the name that address stands for, or by the IP
 * rules, and reset when refused. Proxy mode: what ignores the variables reaches nothing.
 */
import type { AgentClient } from "../agent/client.js";
import type { ProxyConnInfo } from "../agent/messages.js";
import { logger } from "../debug.js";
import { EgressDns, EgressProxy, classifyAddress, type DnsDeps, type EgressDeps, type EgressStats } from "../net/index.js";
import type { ResolvedNetwork } from "../schema/network.js";
import { streamDuplex } from "./tcp.js";

const log = logger("net");

/** The port the agent's proxy listens on in the guest (127.0.0.1). */
export const GUEST_PROXY_PORT = 3128;
/** Guest addresses that stay in the guest (the proxy would send them to the host). */
const NO_PROXY = "localhost,127.0.0.1,::1";
/** How long a PROXY_STOP may take before the host stops waiting (the VM may be dying). */
const STOP_TIMEOUT_MS = 2_000;

/** The variables every exec gets while egress is on (the exec's own values win). */
export function proxyEnv(port = GUEST_PROXY_PORT): string[] {
  const url = `http://127.0.0.1:${port}`;
  const vars: Record<string, string> = { http_proxy: url, https_proxy: url, all_proxy: url, no_proxy: NO_PROXY };
  return Object.entries(vars).flatMap(([k, v]) => [`${k}=${v}`, `${k.toUpperCase()}=${v}`]);
}

/** Traffic through a VM's egress so far: connections and bytes, and (transparent mode) DNS queries. */
export interface NetStats extends EgressStats {
  /** DNS queries the guest made (transparent mode; 0 in proxy mode, where the guest has no DNS). */
  dnsQueries: number;
  /** Of those, the ones answered without an address: NXDOMAIN (not in the allowlist), REFUSED (a private address), SERVFAIL. */
  dnsRefused: number;
}

/** The stats of a VM without egress. */
export function noNetStats(): NetStats {
  return { connections: 0, active: 0, refused: 0, refusedBy: {}, failed: 0, bytesIn: 0, bytesOut: 0, dnsQueries: 0, dnsRefused: 0 };
}

/** @internal Test seams: the host's resolver, DNS timing, the proxy's timeouts. */
export type GuestEgressDeps = EgressDeps & Pick<DnsDeps, "ttlSeconds" | "timeoutMs">;

/** @internal */
export class GuestEgress {
  private stopped = false;

  private constructor(
    private readonly agent: AgentClient,
    private readonly proxy: EgressProxy,
    private readonly dns: EgressDns | undefined,
  ) {}

  /** Starts egress on the VM behind `agent`: the host proxy (and DNS) first, then the guest listener. */
  static async start(agent: AgentClient, network: ResolvedNetwork, deps: GuestEgressDeps = {}): Promise<GuestEgress> {
    const transparent = network.mode === "transparent";
    let dns: EgressDns | undefined;
    // Transparent: names resolve through the VM's DNS verdicts (their cache, and the re-check of
    // an expired one), for the proxy port as for direct connections.
    const proxy = new EgressProxy(network, transparent ? { ...deps, resolve: (name) => dns!.addressesFor(name) } : deps);
    if (transparent) dns = new EgressDns(proxy.policy, { resolve: deps.resolve, ttlSeconds: deps.ttlSeconds, timeoutMs: deps.timeoutMs });
    const egress = new GuestEgress(agent, proxy, dns);
    // A few streams beyond the host's own cap, so that the excess is refused at once instead of
    // waiting in the guest's listen backlog.
    const maxStreams = network.maxConnections + 16;
    try {
      await agent.proxyListen(
        { port: GUEST_PROXY_PORT, env: proxyEnv(), maxStreams, ...(dns ? { mode: "transparent" as const, onResolve: (req) => dns.answer(req) } : {}) },
        (stream, info) => {
          if (egress.stopped) return stream.abandon(new Error("egress stopped"));
          // The agent opens no more than maxStreams at once; one that does is not obeyed.
          if (proxy.stats().active >= maxStreams) {
            log("guest connection from port %d: over the agent's own limit of %d streams, cancelled", info.peerPort, maxStreams);
            return stream.abandon(new Error("too many proxy streams"));
          }
          const direct = directTarget(info);
          if (direct) {
            log("guest connection from port %d to %s:%d%s (stream %d)", info.peerPort, direct.address, direct.port, info.name ? ` (${info.name})` : "", stream.id);
            proxy.handleTransparent(streamDuplex(stream), direct, info.name);
          } else {
            log("guest connection from port %d (stream %d)", info.peerPort, stream.id);
            proxy.handle(streamDuplex(stream));
          }
        },
      );
    } catch (err) {
      await proxy.close();
      throw err;
    }
    return egress;
  }

  stats(): NetStats {
    return { ...this.proxy.stats(), dnsQueries: this.dns?.counters.queries ?? 0, dnsRefused: this.dns?.counters.refused ?? 0 };
  }

  /**
   * Stops egress: the guest listener (unless `guestGone`: the VM is being thrown away) and every
   * connection through it. Idempotent; never throws.
   */
  async stop(guestGone = false): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (!guestGone && !this.agent.dead) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        this.agent.proxyStop().catch((e: Error) => log("proxy stop: %s", e.message)),
        new Promise<void>((r) => (timer = setTimeout(r, STOP_TIMEOUT_MS))),
      ]);
      clearTimeout(timer);
    }
    await this.proxy.close();
  }
}

/**
 * Where a transparent connection meant to go; undefined for one to the proxy port itself (the
 * agent's listener on the guest's loopback serves both: only connections to an outside address
 * are steered to it, so a loopback destination is a client of the proxy port).
 */
function directTarget(info: ProxyConnInfo): { address: string; port: number } | undefined {
  const dst = info.dst;
  if (!dst) return undefined;
  let cls: ReturnType<typeof classifyAddress>;
  try {
    cls = classifyAddress(dst.address);
  } catch {
    return dst; // not an address: the policy refuses it by name
  }
  return cls === "loopback" ? undefined : dst;
}
