/**
 * A front's view of its nodes: every `pollMs` it asks discovery for the nodes' addresses and each
 * node for its report (`GET /v1/node`), and keeps, per node, the last report and whether the last
 * poll reached it. A node that does not answer is down at once (a killed process refuses
 * connections), so creates go elsewhere within one poll; a request that finds a node
 * unreachable marks it down too. Nothing here is shared between fronts: each polls on its own.
 */
import type { NodeReport } from "../node.js";
import type { Discovery } from "./discovery.js";
import type { NodeView } from "./placement.js";

export interface NodeEntry extends NodeView {
  /** The last poll's failure (the node is down), or undefined when it answered. */
  down: string | undefined;
  seenAt: number;
}

export interface NodeSetOptions {
  pollMs?: number;
  /** How long one node may take to answer a poll. */
  timeoutMs?: number;
  log?: (msg: string, fields?: Record<string, unknown>) => void;
}

/** Tags remembered after their node left, to tell a lost sandbox from an id that never was. */
const GONE_TAGS_KEPT = 10_000;

export class NodeSet {
  private readonly entries = new Map<string, NodeEntry>();
  private readonly goneTags = new Set<string>();
  private timer: NodeJS.Timeout | undefined;
  private round: Promise<void> | undefined;
  private closed = false;
  /** Discovery's last failure, if its last call failed. */
  discoveryError: string | undefined;
  readonly pollMs: number;
  private readonly timeoutMs: number;

  constructor(
    readonly discovery: Discovery,
    private readonly options: NodeSetOptions = {},
  ) {
    this.pollMs = options.pollMs ?? 1000;
    this.timeoutMs = options.timeoutMs ?? Math.max(500, this.pollMs);
  }

  /** Polls once now, then every pollMs. */
  async start(): Promise<void> {
    await this.refresh();
    const tick = () => {
      if (this.closed) return;
      this.timer = setTimeout(() => void this.refresh().finally(tick), this.pollMs);
      this.timer.unref();
    };
    tick();
  }

  /** One round of discovery and polls (rounds asked for while one runs share it). */
  refresh(): Promise<void> {
    return (this.round ??= this.poll().finally(() => (this.round = undefined)));
  }

  private async poll(): Promise<void> {
    let urls: string[];
    try {
      urls = await this.discovery.nodes();
      this.discoveryError = undefined;
    } catch (err) {
      // Keep what was known: a discovery hiccup (the API server restarting) is not a lost fleet.
      this.discoveryError = (err as Error).message;
      this.options.log?.("node discovery failed", { source: this.discovery.source, error: this.discoveryError });
      urls = [...this.entries.keys()];
    }
    for (const [url, e] of this.entries) {
      if (!urls.includes(url)) {
        this.forget(e);
        this.entries.delete(url);
        this.options.log?.("node left", { url, node: e.report.node.name });
      }
    }
    await Promise.all(urls.map((url) => this.pollOne(url)));
  }

  private async pollOne(url: string): Promise<void> {
    const e = this.entries.get(url);
    try {
      const res = await fetch(`${url}/v1/node`, { signal: AbortSignal.timeout(this.timeoutMs) });
      if (!res.ok) throw new Error(`GET /v1/node answered ${res.status}`);
      const report = (await res.json()) as NodeReport;
      if (typeof report?.node?.tag !== "string" || !Array.isArray(report.pools)) throw new Error("GET /v1/node answered what no supermachine node would");
      if (e && e.report.node.tag !== report.node.tag) {
        // The process behind the address restarted: sandboxes of the old one are gone.
        this.forget(e);
        this.options.log?.("node restarted", { url, node: report.node.name, tag: report.node.tag });
      }
      if (!e || e.down) this.options.log?.("node up", { url, node: report.node.name, tag: report.node.tag, state: report.state });
      this.entries.set(url, { url, report, inflight: e?.inflight ?? 0, down: undefined, seenAt: Date.now() });
    } catch (err) {
      const msg = (err as Error).name === "TimeoutError" ? `no answer within ${this.timeoutMs} ms` : ((err as Error).cause as Error | undefined)?.message ?? (err as Error).message;
      if (e) this.markDown(e, msg);
    }
  }

  private forget(e: NodeEntry): void {
    if (this.goneTags.size >= GONE_TAGS_KEPT) this.goneTags.delete(this.goneTags.values().next().value!);
    this.goneTags.add(e.report.node.tag);
  }

  /** The node did not answer (a poll or a request): nothing goes there until it answers again. */
  markDown(e: NodeEntry, why: string): void {
    if (!e.down) this.options.log?.("node down", { url: e.url, node: e.report.node.name, reason: why });
    e.down = why;
  }

  /** Nodes that answered their last poll. */
  live(): NodeEntry[] {
    return [...this.entries.values()].filter((e) => !e.down);
  }

  all(): NodeEntry[] {
    return [...this.entries.values()];
  }

  /** The node whose processes carry `tag`; `gone` when a node had it and is no longer there. */
  async byTag(tag: string): Promise<{ entry?: NodeEntry; gone: boolean }> {
    const find = () => [...this.entries.values()].find((e) => e.report.node.tag === tag);
    let entry = find();
    if (!entry && !this.goneTags.has(tag)) {
      // Maybe a node this front has not polled since it started (another front placed there).
      await this.refresh();
      entry = find();
    }
    return entry ? { entry, gone: false } : { gone: this.goneTags.has(tag) };
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
  }
}
