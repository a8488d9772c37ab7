/**
 * `supermachine serve --front`: a stateless front for a fleet of `serve` nodes. It discovers the
 * nodes (src/server/front/discovery.ts), polls their reports (nodes.ts), places each create by
 * power of K with snapshot-cache affinity (placement.ts), and sends every other request to the
 * node its sandbox id names (routes.ts), so any number of fronts serve any request with nothing
 * shared. It holds no keys: nodes authenticate every request they get, and the front passes the
 * client's headers on. Creates a node refuses (draining, full, its pool cannot open, down) go to
 * the next node; a request for a sandbox whose node is gone fails with SANDBOX_NODE_LOST.
 */
import { randomBytes } from "node:crypto";
import { request as httpRequest, type IncomingMessage } from "node:http";
import { request as httpsRequest } from "node:https";
import type { AddressInfo, Socket } from "node:net";
import type { Duplex } from "node:stream";
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from "fastify";
import replyFrom from "@fastify/reply-from";
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import { ServerError } from "../errors.js";
import { parseListen } from "../listen.js";
import { parseNodes, type DiscoveryOptions } from "./discovery.js";
import { NodeSet, type NodeEntry } from "./nodes.js";
import { placementOrder } from "./placement.js";
import { classify, createTarget, type Route } from "./routes.js";
import { tagOf } from "../node-tag.js";

export interface FrontOptions extends DiscoveryOptions {
  /** Where the nodes are: `host:port,...`, `dns:<name>:<port>` or `k8s:<label selector>`. */
  nodes: string;
  /** `host:port` (default 127.0.0.1:8080). */
  listen?: string;
  /** How often to poll discovery and the nodes (default 1000 ms). */
  pollMs?: number;
  logLevel?: string;
  logStream?: NodeJS.WritableStream;
}

export interface SupermachineFront {
  readonly url: string;
  readonly app: FastifyInstance;
  readonly nodes: NodeSet;
  close(): Promise<void>;
}

/** A create body is small JSON; more is refused before it is read. */
const CREATE_BODY_LIMIT = 1024 * 1024;
const HOP_BY_HOP = new Set(["connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection", "te", "trailer", "host", "content-length"]);

export async function startFront(options: FrontOptions): Promise<SupermachineFront> {
  const { host, port } = parseListen(options.listen ?? "127.0.0.1:8080");
  const discovery = parseNodes(options.nodes, options);
  const app = Fastify({
    logger: options.logLevel === "silent" ? false : { level: options.logLevel ?? "info", stream: options.logStream ?? process.stderr },
    requestIdHeader: "x-request-id",
    genReqId: () => randomBytes(8).toString("hex"),
  }) as unknown as FastifyInstance;
  const nodes = new NodeSet(discovery, { ...(options.pollMs ? { pollMs: options.pollMs } : {}), log: (msg, fields) => app.log.info(fields ?? {}, msg) });
  const metrics = frontMetrics(nodes);

  // Bodies pass through as streams; only creates are read (to learn the pool).
  app.removeAllContentTypeParsers();
  app.addContentTypeParser("*", (_req, payload, done) => done(null, payload));
  await app.register(replyFrom, { undici: { connections: 256, pipelining: 1, headersTimeout: 0, bodyTimeout: 0 } });

  app.addHook("onSend", async (req, reply) => {
    void reply.header("x-request-id", req.id);
  });
  app.addHook("onResponse", async (req, reply) => {
    metrics.requests.inc({ method: req.method, status: String(reply.statusCode) });
  });
  app.setErrorHandler((err, req, reply) => {
    const e = err as ServerError;
    if (statusOfFront(e) >= 500) req.log.warn({ code: e.code, message: e.message }, "request failed");
    sendError(reply, req.url, e);
  });

  app.get("/healthz", async () => ({ status: "ok" }));
  app.get("/readyz", async (_req, reply) => {
    const n = nodes.live().filter((e) => e.report.state === "ready").length;
    return n > 0 ? { status: "ready", nodes: n } : reply.code(503).send({ status: "starting", reason: nodes.discoveryError ? `node discovery failed: ${nodes.discoveryError}` : `no node is ready (of ${nodes.all().length} known from ${discovery.source})` });
  });
  app.get("/metrics", async (_req, reply) => reply.type(metrics.registry.contentType).send(await metrics.registry.metrics()));
  app.get("/v1/nodes", async () => ({
    source: discovery.source,
    nodes: nodes.all().map((e) => ({ url: e.url, down: e.down ?? null, inflight: e.inflight, ...e.report })),
  }));

  const headersOf = (req: FastifyRequest): Record<string, string> => {
    const out: Record<string, string> = {};
    for (const [k, v] of Object.entries(req.headers)) if (v !== undefined && !HOP_BY_HOP.has(k)) out[k] = Array.isArray(v) ? v.join(", ") : v;
    out["x-request-id"] = req.id;
    out["x-forwarded-for"] = req.ip;
    return out;
  };

  /** Sends the request on to one node, streaming both ways; an unreachable node loses its sandboxes. */
  const forward = (req: FastifyRequest, reply: FastifyReply, entry: NodeEntry, lost?: string) =>
    reply.from(entry.url + req.url, {
      rewriteRequestHeaders: (_r, h) => ({ ...h, "x-request-id": req.id }),
      onError: (r, { error }) => {
        const code = (error as { code?: string }).code ?? "";
        if (/ECONNREFUSED|ECONNRESET|UND_ERR_SOCKET|EHOSTUNREACH|ETIMEDOUT|UND_ERR_CONNECT/.test(code + (error as Error).message)) nodes.markDown(entry, (error as Error).message);
        const err = lost
          ? new ServerError("SANDBOX_NODE_LOST", `${lost} was on node ${entry.report.node.name} (${entry.url}), which cannot be reached: ${(error as Error).message}`, { hint: "the node died or was cut off; its sandboxes are gone: create new ones" })
          : new ServerError("SERVER_NO_NODE", `node ${entry.report.node.name} (${entry.url}) cannot be reached: ${(error as Error).message}`, { hint: "retry: the front sends the next request to another node" });
        sendError(r as unknown as FastifyReply, req.url, err);
      },
    });

  const anyNode = (): NodeEntry => {
    const ready = nodes.live().filter((e) => e.report.state === "ready");
    const pick = ready[Math.floor(Math.random() * ready.length)];
    if (!pick) throw new ServerError("SERVER_NO_NODE", `no node is ready (of ${nodes.all().length} from ${discovery.source})`, { hint: "check the nodes' /readyz and the front's GET /v1/nodes" });
    return pick;
  };

  const byTag = async (route: Extract<Route, { kind: "tag" }>, req: FastifyRequest): Promise<NodeEntry> => {
    const what = route.id ? `sandbox ${route.id}` : "the sandbox of this access token";
    if (!route.tag) throw new ServerError("SERVER_NOT_FOUND", `${what}: not an id this fleet hands out`, { hint: "use the id (and access token) a create returned" });
    const { entry, gone } = await nodes.byTag(route.tag);
    if (!entry) {
      if (gone) throw new ServerError("SANDBOX_NODE_LOST", `${what} was on a node that left the fleet or restarted (tag ${route.tag})`, { hint: "its sandboxes are gone: create new ones" });
      throw new ServerError("SERVER_NOT_FOUND", `${what}: no node of this fleet has tag ${route.tag}`, { hint: "it may have timed out, been killed, or never existed" });
    }
    if (entry.down) throw new ServerError("SANDBOX_NODE_LOST", `${what} was on node ${entry.report.node.name} (${entry.url}), which is down: ${entry.down}`, { hint: "its sandboxes are gone: create new ones" });
    req.log.debug({ node: entry.report.node.name }, "routed by tag");
    return entry;
  };

  app.all("/*", async (req, reply) => {
    const path = req.url.split("?")[0]!;
    const route = classify(req.method, path, (n) => {
      const v = req.headers[n];
      return (Array.isArray(v) ? v[0] : v) || undefined;
    });
    if (route.kind === "tag") return forward(req, reply, await byTag(route, req), route.id ? `sandbox ${route.id}` : "the sandbox");
    if (route.kind === "any") return forward(req, reply, anyNode());
    if (route.kind === "list") return list(req, reply, route);
    return create(req, reply, route.api);
  });

  const readBody = async (req: FastifyRequest): Promise<Buffer> => {
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const c of (req.body as AsyncIterable<Buffer> | undefined) ?? []) {
      size += c.length;
      if (size > CREATE_BODY_LIMIT) throw new ServerError("SERVER_BAD_REQUEST", `the create body is over ${CREATE_BODY_LIMIT} bytes`, { hint: "a create names a pool and a few fields" });
      chunks.push(c);
    }
    return Buffer.concat(chunks);
  };

  const create = async (req: FastifyRequest, reply: FastifyReply, api: "e2b" | "native") => {
    const t0 = performance.now();
    const body = await readBody(req);
    let parsed: unknown;
    try {
      parsed = body.length ? JSON.parse(body.toString("utf8")) : {};
    } catch {
      throw new ServerError("SERVER_BAD_REQUEST", `POST ${req.url}: the body is not JSON`, { hint: "send the create as application/json" });
    }
    const target = createTarget(api, parsed);
    let order: NodeEntry[];
    if (target.snapshot !== undefined) {
      order = [await byTag({ kind: "tag", tag: tagOf(target.snapshot), id: target.snapshot }, req)];
    } else {
      if (!target.pool) throw new ServerError("SERVER_BAD_REQUEST", `POST ${req.url}: the body names no ${api === "e2b" ? "templateID" : "pool"}`, { hint: "name one of the project's pools" });
      order = placementOrder(nodes.live(), target.pool).map((s) => s.view as NodeEntry);
      if (order.length === 0) {
        metrics.creates.inc({ result: "no-node" });
        throw new ServerError("SERVER_NO_NODE", `no ready node has pool ${JSON.stringify(target.pool)} (${nodes.live().length} of ${nodes.all().length} nodes are up)`, {
          hint: "check the pool's name, and the nodes' /readyz and the front's GET /v1/nodes",
        });
      }
    }
    const headers = headersOf(req);
    let last: { status: number; headers: Headers; body: Buffer } | undefined;
    const refusals: string[] = [];
    for (const entry of order) {
      entry.inflight++;
      try {
        const res = await fetch(entry.url + req.url, { method: "POST", headers, body });
        const out = { status: res.status, headers: res.headers, body: Buffer.from(await res.arrayBuffer()) };
        // A refusal of this node (draining, full, its pool cannot open here) goes to the next;
        // one of the request (bad body, key, limit) comes back as it is.
        if (out.status < 500 && !(out.status === 404 && out.body.includes("SERVER_POOL_UNKNOWN"))) {
          metrics.creates.inc({ result: out.status < 300 ? "ok" : "refused" });
          metrics.createSeconds.observe((performance.now() - t0) / 1000);
          req.log.info({ node: entry.report.node.name, status: out.status, tried: refusals.length + 1 }, "create placed");
          return relay(reply, out);
        }
        refusals.push(`${entry.report.node.name}: ${out.status} ${out.body.toString("utf8").slice(0, 200)}`);
        last = out;
      } catch (err) {
        nodes.markDown(entry, ((err as Error).cause as Error | undefined)?.message ?? (err as Error).message);
        refusals.push(`${entry.report.node.name}: unreachable`);
      } finally {
        entry.inflight--;
      }
    }
    metrics.creates.inc({ result: "failed" });
    req.log.warn({ refusals }, "every node refused the create");
    if (last) return relay(reply, last);
    throw new ServerError("SERVER_NO_NODE", `no node could take the create: ${refusals.join("; ")}`, { hint: "check the nodes' /readyz and the front's GET /v1/nodes" });
  };

  const relay = (reply: FastifyReply, out: { status: number; headers: Headers; body: Buffer }) => {
    for (const [k, v] of out.headers) if (!HOP_BY_HOP.has(k) && k !== "content-encoding") void reply.header(k, v);
    return reply.code(out.status).send(out.body);
  };

  const list = async (req: FastifyRequest, reply: FastifyReply, route: Extract<Route, { kind: "list" }>) => {
    // Every node that holds sandboxes (draining ones too); one that fails to answer is left out.
    const headers = headersOf(req);
    const answers = await Promise.all(
      nodes.live().map(async (e) => {
        try {
          const res = await fetch(e.url + req.url, { headers, signal: AbortSignal.timeout(10_000) });
          return { res, body: (await res.json()) as unknown };
        } catch (err) {
          req.log.warn({ node: e.report.node.name, error: (err as Error).message }, "list: node did not answer");
          return undefined;
        }
      }),
    );
    const ok = answers.filter((a): a is { res: Response; body: unknown } => a !== undefined);
    const refused = ok.find((a) => !a.res.ok);
    if (refused) return reply.code(refused.res.status).send(refused.body);
    if (route.api === "native") return { [route.field!]: ok.flatMap((a) => ((a.body as Record<string, unknown[]>)[route.field!] ?? []) as unknown[]) };
    type Item = { sandboxID: string; startedAt: string };
    const items = ok.flatMap((a) => a.body as Item[]);
    const position = (s: Item) => `${s.startedAt}_${s.sandboxID}`;
    items.sort((a, b) => (position(a) < position(b) ? -1 : 1));
    if (route.api === "e2b-paged") {
      // Each node gave its page after the token (a position: start time, then id); the merged
      // page is the first `limit` of them all.
      const limit = Number(new URL(req.url, "http://x").searchParams.get("limit") ?? 100) || 100;
      const more = ok.some((a) => a.res.headers.get("x-next-token")) || items.length > limit;
      const page = items.slice(0, limit);
      if (more && page.length) void reply.header("x-next-token", position(page[page.length - 1]!));
      return page;
    }
    return items;
  };

  // WebSockets (the native API's spawn, attach and TCP tunnels): the upgrade is passed to the
  // sandbox's node and the two sockets are joined.
  app.server.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    void upgrade(req, socket, head).catch((err: Error) => {
      const e = err as ServerError;
      const status = e.code === "SANDBOX_NODE_LOST" ? 502 : e.code === "SERVER_NOT_FOUND" ? 404 : 503;
      socket.end(`HTTP/1.1 ${status} ${status === 404 ? "Not Found" : status === 502 ? "Bad Gateway" : "Service Unavailable"}\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n${JSON.stringify({ code: status, message: `${e.code ?? "ERROR"}: ${e.message}`, errorCode: e.code })}`);
    });
  });
  const upgrade = async (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const path = (req.url ?? "/").split("?")[0]!;
    const route = classify(req.method ?? "GET", path, (n) => {
      const v = req.headers[n];
      return (Array.isArray(v) ? v[0] : v) || undefined;
    });
    const entry = route.kind === "tag" ? await byTag(route, { log: app.log } as unknown as FastifyRequest) : anyNode();
    const target = new URL(entry.url + req.url);
    const send = target.protocol === "https:" ? httpsRequest : httpRequest;
    const up = send({ host: target.hostname, port: target.port, path: target.pathname + target.search, method: req.method, headers: { ...req.headers, host: target.host } });
    up.on("upgrade", (res, upSocket: Socket, upHead) => {
      const lines = [`HTTP/1.1 ${res.statusCode} ${res.statusMessage}`, ...Object.entries(res.headers).flatMap(([k, v]) => (Array.isArray(v) ? v.map((x) => `${k}: ${x}`) : [`${k}: ${v}`]))];
      socket.write(lines.join("\r\n") + "\r\n\r\n");
      if (upHead.length) socket.write(upHead);
      if (head.length) upSocket.write(head);
      upSocket.pipe(socket).pipe(upSocket);
      const close = () => {
        upSocket.destroy();
        socket.destroy();
      };
      upSocket.on("error", close).on("close", close);
      socket.on("error", close).on("close", close);
    });
    up.on("response", (res) => {
      // The node refused the upgrade: its answer goes back as it is.
      socket.write(`HTTP/1.1 ${res.statusCode} ${res.statusMessage}\r\ncontent-type: ${res.headers["content-type"] ?? "text/plain"}\r\nconnection: close\r\n\r\n`);
      res.pipe(socket);
    });
    up.on("error", (err) => {
      nodes.markDown(entry, err.message);
      socket.end(`HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n${JSON.stringify({ code: 502, message: `SANDBOX_NODE_LOST: node ${entry.report.node.name} cannot be reached: ${err.message}`, errorCode: "SANDBOX_NODE_LOST" })}`);
    });
    up.end();
  };

  await nodes.start();
  try {
    await app.listen({ host, port });
  } catch (err) {
    nodes.close();
    throw new ServerError("SERVER_LISTEN_FAILED", `cannot listen on ${host}:${port}: ${(err as Error).message}`, { hint: "pick another address with --listen", cause: err });
  }
  const addr = app.server.address() as AddressInfo;
  const url = `http://${addr.family === "IPv6" ? `[${addr.address}]` : addr.address}:${addr.port}`;
  app.log.info({ nodes: nodes.all().length, source: discovery.source }, "front listening");
  return {
    url,
    app,
    nodes,
    async close() {
      nodes.close();
      const closed = app.close();
      app.server.closeAllConnections?.();
      await closed;
    },
  };
}

const STATUS: Record<string, number> = { SANDBOX_NODE_LOST: 502, SERVER_NO_NODE: 503, SERVER_NOT_FOUND: 404, SERVER_BAD_REQUEST: 400, SERVER_LISTEN_FAILED: 500 };
const statusOfFront = (e: ServerError): number => STATUS[e.code as string] ?? 500;
/** Connect's codes for the front's own refusals of envd calls (what the E2B SDKs read). */
const CONNECT_CODE: Record<string, string> = { SANDBOX_NODE_LOST: "unavailable", SERVER_NO_NODE: "unavailable", SERVER_NOT_FOUND: "not_found", SERVER_BAD_REQUEST: "invalid_argument" };
const CONNECT_STATUS: Record<string, number> = { unavailable: 503, not_found: 404, invalid_argument: 400, internal: 500 };

/**
 * The front's own error, in the protocol of the path: a Connect error (`{ code, message }` with
 * Connect's code and status) on envd's Connect paths; elsewhere the server's JSON shape.
 */
function sendError(reply: FastifyReply, url: string, e: ServerError): void {
  const message = e.code ? `${e.code}: ${e.message}` : e.message;
  if (/^\/(process\.Process|filesystem\.Filesystem)\//.test(url)) {
    const code = CONNECT_CODE[e.code as string] ?? "internal";
    void reply.code(CONNECT_STATUS[code]!).type("application/json").send({ code, message });
    return;
  }
  const status = statusOfFront(e);
  void reply.code(status).send({ code: status, message, ...(e.code ? { errorCode: e.code } : {}), ...(e.hint ? { hint: e.hint } : {}) });
}

function frontMetrics(nodes: NodeSet) {
  const registry = new Registry();
  const requests = new Counter({ name: "supermachine_front_requests_total", help: "Requests the front answered, by method and status", labelNames: ["method", "status"], registers: [registry] });
  const creates = new Counter({ name: "supermachine_front_creates_total", help: "Creates the front placed, by result", labelNames: ["result"], registers: [registry] });
  const createSeconds = new Histogram({ name: "supermachine_front_create_seconds", help: "Time to place a create, retries included", buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], registers: [registry] });
  new Gauge({
    name: "supermachine_front_nodes",
    help: "Nodes the front knows, by state",
    labelNames: ["state"],
    registers: [registry],
    collect() {
      const all = nodes.all();
      this.set({ state: "down" }, all.filter((e) => e.down).length);
      for (const s of ["ready", "starting", "draining"]) this.set({ state: s }, all.filter((e) => !e.down && e.report.state === s).length);
    },
  });
  return { registry, requests, creates, createSeconds };
}
