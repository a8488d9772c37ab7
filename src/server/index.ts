/**
 * `supermachine serve` as a library: `startServer()` listens at once (so `/healthz` answers and
 * `/readyz` says why it is not ready), then loads the project's pools (`loadPools`, with its
 * cache and watch options) and serves them. `server.drain()` stops creating sandboxes, gives the
 * live ones a grace period, releases them, closes the pools and the listener: nothing is left
 * running (snapshots taken through the native API included). SIGTERM handling belongs to the caller (the CLI drains on it).
 */
import { readFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import type { FastifyInstance } from "fastify";
import { loadPools, type Pools, type LoadPoolsOptions } from "../project/pools.js";
import type { BuildEvent as PublicBuildEvent, WatchEvent as PublicWatchEvent } from "../schema/events.js";
import { ServerError } from "./errors.js";
import { KeyStore } from "./keys.js";
import { ServerMetrics } from "./metrics.js";
import { SandboxRegistry, poolEntries } from "./sandboxes.js";
import { buildApp } from "./app.js";
import { NativeState } from "./native/state.js";
import { newNodeTag } from "./node-tag.js";
import { defaultCapacity, defaultNodeName, nodeReport } from "./node.js";

export { ServerError, SERVER_ERROR_CODES, type ServerErrorCode } from "./errors.js";
export { KeyStore, defaultKeysPath, type KeyRecord } from "./keys.js";
export { parseListen } from "./listen.js";
import { parseListen } from "./listen.js";

export interface ServeOptions extends Pick<LoadPoolsOptions, "config" | "cwd" | "cacheFrom" | "cacheTrust" | "watch" | "frozen" | "concurrency" | "lazy" | "bakeOnDemand"> {
  /** This node's name in a fleet (`GET /v1/node`; default: the hostname). */
  nodeName?: string;
  /**
   * The most sandboxes this node holds at once: creates past it are refused (SERVER_FULL), so a
   * front places them elsewhere. Without it nothing is refused, and fronts weigh load against
   * a capacity derived from memory (256 MiB of guest RAM per sandbox in 3/4 of it).
   */
  capacity?: number;
  /** `host:port` (default 127.0.0.1:8080; port 0 picks a free one). */
  listen?: string;
  /** The key file (default `$SUPERMACHINE_HOME/server/keys.json`). */
  keys?: string;
  /** PEM files: serve HTTPS. */
  tls?: { cert: string; key: string };
  /** Log level of the JSON request log (default "info"; "silent" for none). */
  logLevel?: string;
  /** Where log lines go (default stderr). */
  logStream?: NodeJS.WritableStream;
  /** A sandbox's life when the client does not say (default 300 s) and the most it may ask for (default 24 h). */
  defaultTimeoutMs?: number;
  maxTimeoutMs?: number;
  /**
   * Let creates give their sandbox egress of its own (`network`, on pools without one). Off by
   * default: a key holder could otherwise open the network the project's pools keep closed.
   */
  allowSandboxNetwork?: boolean;
  /** Progress of the project's build. */
  onEvent?: (e: PublicBuildEvent) => void;
  /** With `watch`: what the watcher does (changes, rounds, failures). */
  onWatchEvent?: (e: PublicWatchEvent) => void;
  /** Pools already open, instead of loading the project (tests, embedding). */
  pools?: Pools;
}

export interface SupermachineServer {
  /** `http(s)://host:port`. */
  readonly url: string;
  /** Resolves once the pools are loaded and warm; rejects if loading fails. */
  readonly ready: Promise<void>;
  readonly app: FastifyInstance;
  /** Stops taking sandboxes, waits up to `graceMs` (default 30 s) for live ones, releases them, closes everything. */
  drain(graceMs?: number): Promise<void>;
  /** drain(0). */
  close(): Promise<void>;
}


export async function startServer(options: ServeOptions = {}): Promise<SupermachineServer> {
  const { host, port } = parseListen(options.listen ?? "127.0.0.1:8080");
  const keys = new KeyStore(options.keys);
  keys.list(); // a broken key file fails the start, not the first request
  let https: { cert: Buffer; key: Buffer } | undefined;
  if (options.tls) {
    try {
      https = { cert: await readFile(options.tls.cert), key: await readFile(options.tls.key) };
    } catch (err) {
      throw new ServerError("SERVER_TLS_INVALID", `cannot read the TLS certificate or key: ${(err as Error).message}`, { hint: "pass PEM files with --tls-cert and --tls-key", cause: err });
    }
  }
  let pools: Pools | undefined;
  let registry: SandboxRegistry | undefined;
  let notReady: string | undefined = "loading the project";
  const native = new NativeState(options.pools ? {} : { project: { ...(options.cwd ? { cwd: options.cwd } : {}), ...(options.config ? { config: options.config } : {}) } });
  const nodeTag = newNodeTag();
  const startedAt = new Date();
  const metrics = new ServerMetrics(
    () => (pools ? Object.fromEntries(poolEntries(pools).map(([n, p]) => [n, p.stats()])) : {}),
    () => registry?.alivePerPool() ?? {},
  );
  const app = buildApp({
    keys,
    registry: () => registry,
    metrics,
    notReady: () => notReady,
    logger: options.logLevel === "silent" ? false : { level: options.logLevel ?? "info", stream: options.logStream ?? process.stderr },
    https,
    native,
    page: true,
    node: () =>
      nodeReport({
        name: options.nodeName ?? defaultNodeName(),
        tag: nodeTag,
        startedAt,
        capacity: options.capacity ?? defaultCapacity(),
        pools: () => pools,
        registry: () => registry,
        notReady: () => notReady,
      }),
  });
  try {
    await app.listen({ host, port });
  } catch (err) {
    throw new ServerError("SERVER_LISTEN_FAILED", `cannot listen on ${host}:${port}: ${(err as Error).message}`, {
      hint: (err as NodeJS.ErrnoException).code === "EADDRINUSE" ? "another process has that port: pick another with --listen" : "check the address",
      cause: err,
    });
  }
  const addr = app.server.address() as AddressInfo;
  const url = `${https ? "https" : "http"}://${addr.family === "IPv6" ? `[${addr.address}]` : addr.address}:${addr.port}`;
  let closing: Promise<void> | undefined;

  const ready = (async () => {
    try {
      pools =
        options.pools ??
        (await loadPools({
          ...(options.config ? { config: options.config } : {}),
          ...(options.cwd ? { cwd: options.cwd } : {}),
          ...(options.cacheFrom ? { cacheFrom: options.cacheFrom } : {}),
          ...(options.cacheTrust ? { cacheTrust: options.cacheTrust } : {}),
          ...(options.watch ? { watch: true } : {}),
          ...(options.frozen ? { frozen: true } : {}),
          ...(options.concurrency ? { concurrency: options.concurrency } : {}),
          ...(options.lazy ? { lazy: true } : {}),
          ...(options.bakeOnDemand ? { bakeOnDemand: true } : {}),
          onEvent: (e) => {
            if (e.type === "done") metrics.bakes.inc({ status: e.node.status });
            native.onBuild(e);
            options.onEvent?.(e);
          },
          onWatchEvent: (e) => {
            native.onWatch(e);
            options.onWatchEvent?.(e);
          },
        }));
      if (closing) {
        await pools.close();
        return;
      }
      registry = new SandboxRegistry(pools, {
        ...(options.defaultTimeoutMs ? { defaultTimeoutMs: options.defaultTimeoutMs } : {}),
        ...(options.maxTimeoutMs ? { maxTimeoutMs: options.maxTimeoutMs } : {}),
        metrics,
        ...(options.allowSandboxNetwork ? { allowSandboxNetwork: true } : {}),
        ...(options.capacity ? { capacity: options.capacity } : {}),
        nodeTag,
        log: (msg, fields) => app.log.info(fields ?? {}, msg),
        events: native.events,
        series: native.series,
      });
      // The page's first look at the graph, before anyone asks (and the keys a watch round compares with).
      native.images.list().catch((err: Error) => app.log.warn({ err }, "listing the project's images"));
      notReady = undefined;
      app.log.info({ pools: registry.poolNames(), node: options.nodeName ?? defaultNodeName(), tag: nodeTag }, "ready");
    } catch (err) {
      notReady = `the project failed to load: ${(err as Error).message}`;
      throw err;
    }
  })();
  ready.catch(() => {});

  const drain = (graceMs = 30_000): Promise<void> =>
    (closing ??= (async () => {
      notReady = "draining";
      app.log.info({ graceMs, sandboxes: registry?.size ?? 0 }, "draining");
      await registry?.drain(graceMs);
      // No sandbox is left: the snapshots clients took go, with their pools.
      await native.close().catch((err: Error) => app.log.warn({ err }, "removing the snapshots"));
      await ready.catch(() => {});
      await pools?.close();
      // Streams still open (followers of processes that ended with their VM) are cut now.
      const closed = app.close();
      app.server.closeAllConnections?.();
      await closed;
    })());

  return { url, ready, app, drain, close: () => drain(0) };
}
