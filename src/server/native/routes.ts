/**
 * The native API (`/v1`): pools, sandboxes (acquire from a pool or a snapshot, list by metadata,
 * extend, release), unary exec, streamed files, snapshots and the build's status, plus the
 * WebSocket routes of ws.ts (processes, TCP). Sandboxes are the server's registry's, so E2B and
 * native clients share one set (same keys, limits, timeouts, drain). Every body, query and path
 * parameter is checked against schemas.ts; a bad one is a 400 naming the field. `GET
 * /openapi.json` serves the document generated from the same schemas.
 */
import type { Readable } from "node:stream";
import type { ProjectPool } from "../../project/pools.js";
import type { FastifyInstance, FastifyRequest } from "fastify";
import websocket from "@fastify/websocket";
import type { z } from "zod";
import { GuestFileError, SupermachineError } from "../../errors.js";
import { ServerError } from "../errors.js";
import type { KeyRecord } from "../keys.js";
import type { ServerMetrics } from "../metrics.js";
import { countProcess, type Sandbox, type SandboxRegistry } from "../sandboxes.js";
import * as s from "./schemas.js";
import { openApiDocument } from "./openapi.js";
import type { NativeState } from "./state.js";
import { processSocket, tcpSocket } from "./ws.js";


export interface NativeDeps {
  registry: () => SandboxRegistry;
  keyOf: (req: FastifyRequest) => KeyRecord;
  metrics: ServerMetrics;
  /** Snapshots and builds (undefined: those routes answer 503). */
  state: NativeState | undefined;
}

/** `schema` applied to `value`; a 400 naming the first field at fault otherwise. */
export function parse<T extends z.ZodType>(schema: T, value: unknown, what: string): z.output<T> {
  const r = schema.safeParse(value);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    const field = issue.path.length ? issue.path.map(String).join(".") : "body";
    throw new ServerError("SERVER_BAD_REQUEST", `${what}: ${field}: ${issue.message}`, { hint: "GET /openapi.json describes every field the native API takes" });
  }
  return r.data;
}

/**
 * Codes of library errors that say the request cannot be done as asked (4xx), which the app's
 * error handler would answer with a 500; everything else goes on to that handler.
 */
const CLIENT_CODES: Record<string, number> = {
  VM_RELEASED: 404,
  EXEC_ALREADY_EXITED: 409,
  EXEC_PROCESS_EXITED: 409,
  EXEC_STDIN_CLOSED: 409,
  EXEC_STREAM_IN_USE: 409,
  EXEC_READ_SIZE: 400,
  EXEC_USER_UNKNOWN: 400,
  EXEC_SNAPSHOT_UNSUPPORTED: 400,
  EXEC_OUTPUT_LIMIT: 413,
  EXEC_NO_WORKLOAD: 404,
  TCP_PORT_IN_USE: 409,
};

export function clientStatus(err: unknown): number | undefined {
  return err instanceof SupermachineError && !(err instanceof GuestFileError) ? CLIENT_CODES[err.code] : undefined;
}

/** The app's error body (errors.ts of the server documents it): `{ code, message, errorCode, hint }`. */
export function errorBody(err: unknown, status: number) {
  const code = err instanceof SupermachineError ? err.code : (err as { code?: string }).code;
  const message = (err as Error).message;
  return { code: status, message: code ? `${code}: ${message}` : message, ...(code ? { errorCode: code } : {}), ...(err instanceof SupermachineError && err.hint ? { hint: err.hint } : {}) };
}

const iso = (d: Date) => d.toISOString();
const SNAPSHOT_POOL = "snapshot:";

export function sandboxInfo(sb: Sandbox): z.infer<typeof s.sandboxInfo> {
  return {
    id: sb.id,
    pool: sb.pool,
    snapshot: sb.pool.startsWith(SNAPSHOT_POOL) ? sb.pool.slice(SNAPSHOT_POOL.length) : null,
    metadata: sb.metadata,
    startedAt: iso(sb.startedAt),
    endAt: iso(sb.endAt),
    memoryMib: sb.memoryMib,
    vcpus: sb.vcpus,
    state: sb.state,
    execs: sb.execs,
    egressBytes: sb.egressBytes(),
  };
}

export function registerNative(app: FastifyInstance, deps: NativeDeps): void {
  app.get("/openapi.json", async () => openApiDocument());

  void app.register(async (api) => {
    await api.register(websocket, { options: { maxPayload: 16 * 1024 * 1024 } });
    api.setErrorHandler((err, req, reply) => {
      const status = clientStatus(err);
      // Anything else is the app's handler's to answer (a handler that throws passes it up).
      if (status === undefined) throw err;
      req.log.info({ code: (err as { code?: string }).code, status, message: (err as Error).message }, "request refused");
      void reply.code(status).send(errorBody(err, status));
    });

    const { keyOf } = deps;
    const what = (req: FastifyRequest) => `${req.method} ${req.url.split("?")[0]}`;
    const sandboxOf = (req: FastifyRequest): Sandbox => {
      const { id } = parse(s.sandboxParams, req.params, what(req));
      return deps.registry().require(id, keyOf(req), what(req));
    };
    const state = (): NativeState => {
      if (!deps.state) throw new ServerError("SERVER_STARTING", "this server was started without the native API's state", { hint: "start it with startServer()" });
      return deps.state;
    };

    // ---- pools ----
    const poolInfo = (name: string, p: ProjectPool) => {
      const { cyclesPerSecond, ...acquire } = deps.state?.series.report(name) ?? { bucketSeconds: 0, buckets: [], cyclesPerSecond: 0 };
      return { name, image: p.describe?.().image ?? null, stats: p.stats(), acquire, cyclesPerSecond };
    };
    api.get("/v1/pools", async () => {
      return { pools: deps.registry().poolList().map(([name, p]) => poolInfo(name, p)) };
    });
    api.get("/v1/pools/:name", async (req) => {
      const { name } = req.params as { name: string };
      const pool = deps.registry().poolList().find(([n]) => n === name);
      if (!pool) {
        throw new ServerError("SERVER_POOL_UNKNOWN", `${what(req)}: no pool named ${JSON.stringify(name)} on this server`, { hint: "GET /v1/pools lists the project's pools" });
      }
      return poolInfo(name, pool[1]);
    });

    // ---- sandboxes ----
    api.post("/v1/sandboxes", async (req, reply) => {
      const body = parse(s.createSandbox, req.body ?? {}, what(req));
      const key = keyOf(req);
      const registry = deps.registry();
      let sb: Sandbox;
      if (body.snapshot !== undefined) {
        const snaps = state().snapshots;
        const rec = snaps.require(body.snapshot, key, what(req));
        const source = await snaps.pool(rec);
        sb = await registry.create({ pool: `${SNAPSHOT_POOL}${rec.id}`, key, timeoutMs: body.timeoutMs, metadata: body.metadata, env: body.env, source, network: body.network });
      } else {
        sb = await registry.create({ pool: body.pool!, key, timeoutMs: body.timeoutMs, metadata: body.metadata, env: body.env, network: body.network });
      }
      req.log.info({ sandbox: sb.id, pool: sb.pool }, "sandbox created");
      return reply.code(201).send(sandboxInfo(sb));
    });

    api.get("/v1/sandboxes", async (req) => {
      const q = parse(s.listSandboxesQuery, req.query ?? {}, what(req));
      const metadata: Record<string, string> = {};
      let pool: string | undefined;
      for (const [k, v] of Object.entries(q)) {
        const value = Array.isArray(v) ? v[v.length - 1]! : v;
        if (k === "pool") pool = value;
        else if (k.startsWith("metadata.") && k.length > "metadata.".length) metadata[k.slice("metadata.".length)] = value;
        else throw new ServerError("SERVER_BAD_REQUEST", `${what(req)}: ${k}: is not a filter`, { hint: "filter with ?pool=<name> and ?metadata.<key>=<value>" });
      }
      return { sandboxes: deps.registry().list(keyOf(req), metadata, pool).map(sandboxInfo) };
    });

    api.get("/v1/sandboxes/:id", async (req) => sandboxInfo(sandboxOf(req)));

    api.delete("/v1/sandboxes/:id", async (req, reply) => {
      const sb = sandboxOf(req);
      await deps.registry().kill(sb.id, keyOf(req));
      req.log.info({ sandbox: sb.id }, "sandbox released");
      return reply.code(204).send();
    });

    api.post("/v1/sandboxes/:id/timeout", async (req) => {
      const body = parse(s.setTimeoutBody, req.body ?? {}, what(req));
      const sb = sandboxOf(req);
      sb.setTimeout(deps.registry().checkTimeout(body.timeoutMs, "timeoutMs"));
      return sandboxInfo(sb);
    });

    // ---- exec ----
    api.post("/v1/sandboxes/:id/exec", async (req, reply) => {
      const b = parse(s.execBody, req.body ?? {}, what(req));
      const sb = sandboxOf(req);
      // A client that goes away stops its command (a unary call has nobody left to answer).
      const gone = new AbortController();
      reply.raw.once("close", () => {
        if (!reply.raw.writableEnded) gone.abort(new ServerError("SERVER_BAD_REQUEST", "the client closed the request"));
      });
      countProcess(sb, deps.metrics, "exec");
      const out = await sb.vm.exec({
        argv: b.argv,
        env: { ...sb.env, ...b.env },
        ...(b.cwd !== undefined ? { cwd: b.cwd } : {}),
        ...(b.timeoutMs !== undefined ? { timeoutMs: b.timeoutMs } : {}),
        ...(b.tty !== undefined ? { tty: b.tty } : {}),
        ...(b.winsize ? { winsize: b.winsize } : {}),
        ...(b.user !== undefined ? { user: b.user } : {}),
        ...(b.limits ? { limits: b.limits } : {}),
        ...(b.detach !== undefined ? { detach: b.detach } : {}),
        ...(b.chain ? { chain: b.chain } : {}),
        ...(b.stageFiles ? { stageFilesMode: b.stageFiles.map((f) => ({ path: f.path, bytes: Buffer.from(f.data, "base64"), mode: f.mode ?? 0o644 })) } : {}),
        signal: gone.signal,
      });
      return { ...out, stdout: out.stdout.toString("base64"), stderr: out.stderr.toString("base64") };
    });

    // ---- processes ----
    api.get("/v1/sandboxes/:id/processes", async (req) => ({
      processes: sandboxOf(req).processes.running().map((p) => ({ pid: p.pid, argv: [p.config.cmd, ...p.config.args], tty: p.pty, running: p.running })),
    }));
    api.get("/v1/sandboxes/:id/processes/spawn", { websocket: true }, (socket, req) => {
      processSocket(socket, req, { sandbox: () => sandboxOf(req), metrics: deps.metrics });
    });
    api.get("/v1/sandboxes/:id/processes/:pid", { websocket: true }, (socket, req) => {
      processSocket(socket, req, {
        sandbox: () => sandboxOf(req),
        metrics: deps.metrics,
        attach: () => parse(s.processParams, req.params, what(req)).pid,
      });
    });

    // ---- files ----
    api.get("/v1/sandboxes/:id/files", async (req, reply) => {
      const q = parse(s.fileQuery, req.query ?? {}, what(req));
      const sb = sandboxOf(req);
      const stream = await sb.vm.readFileStream(q.path, q.maxBytes !== undefined ? { maxBytes: q.maxBytes } : {});
      return reply.type("application/octet-stream").send(stream);
    });
    api.put("/v1/sandboxes/:id/files", async (req) => {
      const q = parse(s.fileQuery, req.query ?? {}, what(req));
      const sb = sandboxOf(req);
      const body = req.body as Readable | undefined;
      if (!body || typeof (body as Readable).pipe !== "function") {
        throw new ServerError("SERVER_BAD_REQUEST", `${what(req)}: body: must be the file's bytes as application/octet-stream`, { hint: "send Content-Type: application/octet-stream" });
      }
      const bytes = await sb.vm.writeFileStream(q.path, body, {
        ...(q.mode !== undefined ? { mode: parseInt(q.mode, 8) } : {}),
        ...(q.user !== undefined ? { user: q.user } : {}),
        ...(q.maxBytes !== undefined ? { maxBytes: q.maxBytes } : {}),
      });
      return { path: q.path, bytes };
    });

    api.get("/v1/sandboxes/:id/files/stat", async (req) => {
      const q = parse(s.statQuery, req.query ?? {}, what(req));
      return sandboxOf(req).vm.stat(q.path, { follow: q.follow === "true" });
    });
    api.get("/v1/sandboxes/:id/files/list", async (req) => {
      const q = parse(s.listQuery, req.query ?? {}, what(req));
      return { entries: await sandboxOf(req).vm.readDir(q.path, q.depth !== undefined ? { depth: q.depth } : {}) };
    });
    api.post("/v1/sandboxes/:id/files/mkdir", async (req) => {
      const b = parse(s.makeDirBody, req.body ?? {}, what(req));
      const { path, ...options } = b;
      return { created: await sandboxOf(req).vm.makeDir(path, options) };
    });
    api.post("/v1/sandboxes/:id/files/move", async (req, reply) => {
      const b = parse(s.moveBody, req.body ?? {}, what(req));
      await sandboxOf(req).vm.rename(b.from, b.to);
      return reply.code(204).send();
    });
    api.delete("/v1/sandboxes/:id/files", async (req, reply) => {
      const q = parse(s.removeQuery, req.query ?? {}, what(req));
      await sandboxOf(req).vm.remove(q.path, { recursive: q.recursive === "true" });
      return reply.code(204).send();
    });

    // ---- TCP ----
    api.get("/v1/sandboxes/:id/tcp/:port", { websocket: true }, (socket, req) => {
      tcpSocket(socket, req, { sandbox: () => sandboxOf(req), port: () => parse(s.tcpParams, req.params, what(req)).port });
    });

    // ---- snapshots ----
    api.post("/v1/sandboxes/:id/snapshot", async (req, reply) => {
      const body = parse(s.snapshotBody, req.body ?? {}, what(req));
      const sb = sandboxOf(req);
      const rec = await state().snapshots.take(sb, keyOf(req), body.timeoutMs);
      req.log.info({ sandbox: sb.id, snapshot: rec.id }, "snapshot taken");
      return reply.code(201).send(snapshotInfo(rec));
    });
    api.get("/v1/snapshots", async (req) => ({ snapshots: state().snapshots.list(keyOf(req)).map(snapshotInfo) }));
    api.delete("/v1/snapshots/:snapshot", async (req, reply) => {
      const { snapshot } = parse(s.snapshotParams, req.params, what(req));
      const snaps = state().snapshots;
      void snaps.remove(snaps.require(snapshot, keyOf(req), what(req))).catch((err: Error) => req.log.warn({ err }, "removing a snapshot"));
      return reply.code(204).send();
    });

    // ---- builds ----
    api.get("/v1/builds", async () => ({ images: state().builds.list() }));
    api.get("/v1/builds/events", async (req, reply) => {
      const builds = state().builds;
      reply.hijack();
      const res = reply.raw;
      res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store", connection: "keep-alive", "x-request-id": req.id });
      // The current status first, so a client that connects mid-build knows where it stands.
      for (const img of builds.list()) res.write(`event: status\ndata: ${JSON.stringify(img)}\n\n`);
      const unsubscribe = builds.subscribe((e) => res.write(`event: ${String(e.type)}\ndata: ${JSON.stringify(e)}\n\n`));
      const ping = setInterval(() => res.write(": keepalive\n\n"), 15_000);
      res.once("close", () => {
        clearInterval(ping);
        unsubscribe();
      });
    });

    // ---- the project's images (the page) ----
    api.get("/v1/images", async () => state().images.list());
    api.get("/v1/images/:name/why", async (req) => {
      const { name } = parse(s.imageParams, req.params, what(req));
      return state().images.why(name, what(req));
    });
    api.get("/v1/images/:name/log", async (req, reply) => {
      const { name } = parse(s.imageParams, req.params, what(req));
      const text = await state().images.log(name, what(req));
      if (text === undefined) throw new ServerError("SERVER_NOT_FOUND", `${what(req)}: no bake log is kept for ${JSON.stringify(name)}`, { hint: "an image has a log once it is baked here (a snapshot imported from a cache has the log of its bake)" });
      return reply.type("text/plain; charset=utf-8").send(text);
    });

    // ---- everything that happens, live ----
    api.get("/v1/events", async (req, reply) => {
      const events = state().events;
      const key = keyOf(req);
      const last = events.seenUpTo(header(req, "last-event-id"));
      reply.hijack();
      const res = reply.raw;
      res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store", connection: "keep-alive", "x-request-id": req.id, "x-accel-buffering": "no" });
      res.write("retry: 2000\n\n");
      const unsubscribe = events.subscribe(key.id, last, (e) => res.write(`id: ${events.sseId(e)}\nevent: ${e.kind}\ndata: ${JSON.stringify(e)}\n\n`));
      const ping = setInterval(() => res.write(": keepalive\n\n"), 15_000);
      res.once("close", () => {
        clearInterval(ping);
        unsubscribe();
      });
    });
  });
}

function snapshotInfo(rec: { id: string; pool: string; createdAt: Date; image: { memoryMib: number; vcpus: number } }) {
  return { id: rec.id, pool: rec.pool, createdAt: iso(rec.createdAt), memoryMib: rec.image.memoryMib, vcpus: rec.image.vcpus };
}

function header(req: FastifyRequest, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}
