/**
 * A VM's egress (`network: { allow }`): the agent listens on the guest's loopback proxy port,
 * every exec finds it through the proxy variables, and each connection a guest process makes
 * there comes to the host as a stream, which the egress proxy (`src/net/`) checks against the
 * allowlist and carries to the outside world. The guest has no network device: what ignores
 * the variables reaches nothing.
 */
import type { AgentClient } from "../agent/client.js";
import { logger } from "../debug.js";
import { EgressProxy, type EgressStats } from "../net/index.js";
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

/** Traffic through a VM's egress proxy so far. */
export type NetStats = EgressStats;

/** @internal */
export class GuestEgress {
  private stopped = false;

  private constructor(
    private readonly agent: AgentClient,
    private readonly proxy: EgressProxy,
  ) {}

  /** Starts egress on the VM behind `agent`: the host proxy first, then the guest listener. */
  static async start(agent: AgentClient, network: ResolvedNetwork): Promise<GuestEgress> {
    const proxy = new EgressProxy(network);
    const egress = new GuestEgress(agent, proxy);
    // A few streams beyond the host's own cap, so that the excess is answered (429) at once
    // instead of waiting in the guest's listen backlog.
    const maxStreams = network.maxConnections + 16;
    try {
      await agent.proxyListen({ port: GUEST_PROXY_PORT, env: proxyEnv(), maxStreams }, (stream, info) => {
        if (egress.stopped) return stream.abandon(new Error("egress stopped"));
        // The agent opens no more than maxStreams at once; one that does is not obeyed.
        if (proxy.stats().active >= maxStreams) {
          log("guest connection from port %d: over the agent's own limit of %d streams, cancelled", info.peerPort, maxStreams);
          return stream.abandon(new Error("too many proxy streams"));
        }
        log("guest connection from port %d (stream %d)", info.peerPort, stream.id);
        proxy.handle(streamDuplex(stream));
      });
    } catch (err) {
      await proxy.close();
      throw err;
    }
    return egress;
  }

  stats(): NetStats {
    return this.proxy.stats();
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
