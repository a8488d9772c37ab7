/**
 * The HTTP server of `supermachine serve`: one Fastify app on one port for both the control plane
 * (API key in `X-API-KEY` or `Authorization: Bearer`) and the sandboxes' data plane (E2B's envd
 * calls, routed by `E2b-Sandbox-Id` or by the sandbox's access token, which is also their
 * credential), the native API (`/v1`, see native/routes.ts; its OpenAPI document at
 * `/openapi.json`), plus `/healthz`, `/readyz` and `/metrics`. Every request gets an id (its
 * `X-Request-Id`, or a new one) that each log line and the response carry. Errors are JSON: E2B's
 * `{ code, message }` shape, with the library's code and hint added.
 */
import { randomBytes } from "node:crypto";
import type { IncomingMessage } from "node:http";
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from "fastify";
import multipart from "@fastify/multipart";
import { createContextKey, createContextValues, Code, ConnectError, type HandlerContext } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { SupermachineError, GuestFileError, OptionError } from "../errors.js";
import { ServerError } from "./errors.js";
import type { KeyRecord, KeyStore } from "./keys.js";
import { countProcess, type Sandbox, type SandboxRegistry } from "./sandboxes.js";
import type { ServerMetrics } from "./metrics.js";
import { registerControlPlane } from "./e2b/control.js";
import { isPagePath, registerPage } from "./ui.js";
import { registerNative } from "./native/routes.js";
import type { NativeState } from "./native/state.js";
import { envdHealth, registerEnvdFiles } from "./e2b/files.js";
import { processService } from "./e2b/envd-process.js";
import { Process } from "./e2b/gen/process/process_pb.js";
import { Filesystem } from "./e2b/gen/filesystem/filesystem_pb.js";
import { filesystemService } from "./e2b/envd-filesystem.js";

export interface AppDeps {
  keys: KeyStore;
  /** Undefined until the project's pools are loaded (the server answers 503 meanwhile). */
  registry: () => SandboxRegistry | undefined;
  metrics: ServerMetrics;
  /** Why the server is not ready, or undefined when it is. */
  notReady: () => string | undefined;
  logger: boolean | { level: string; stream?: NodeJS.WritableStream };
  https?: { cert: string | Buffer; key: string | Buffer } | undefined;
  /** The native API's snapshots and build status. */
  native?: NativeState;
  /** This node's report for fronts (`GET /v1/node`). */
  node?: () => unknown;
  /** Serve the web page at `/` (src/server/ui.ts). */
  page?: boolean;
  /** Services of the data plane beyond processes (the filesystem), registered by the caller. */
  extraServices?: (router: import("@connectrpc/connect").ConnectRouter, sandboxOf: (ctx: HandlerContext) => Sandbox) => void;
}

/** Paths anyone may call (probes and scrapers; the server listens on loopback by default). */
const OPEN = new Set(["/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/node"]);
const CONNECT_PREFIXES = ["/process.Process/", "/filesystem.Filesystem/"];
const ENVD_PATHS = new Set(["/files"]);

/** What a request was routed to and on whose behalf. */
interface RequestAuth {
  key?: KeyRecord;
  sandbox?: Sandbox;
  /** Why a data-plane request has no sandbox (told to the handler, which answers in its protocol). */
  refused?: ServerError;
}

const kSandbox = createContextKey<Sandbox | ServerError | undefined>(undefined);

export function statusOf(err: unknown): number {
  if (err instanceof ServerError) {
    return { SERVER_UNAUTHORIZED: 401, SERVER_LIMIT: 429, SERVER_NOT_FOUND: 404, SERVER_POOL_UNKNOWN: 404, SERVER_BAD_REQUEST: 400, SERVER_DRAINING: 503, SERVER_STARTING: 503, SERVER_SANDBOX_GONE: 502, SERVER_CONFLICT: 409, SERVER_FULL: 503, SERVER_NO_NODE: 503, SANDBOX_NODE_LOST: 502 }[err.code as string] ?? 500;
  }
  if (err instanceof GuestFileError) return err.code === "ENOENT" ? 404 : err.code === "EACCES" || err.code === "EPERM" ? 403 : 400;
  if (err instanceof OptionError) return 400;
  if (err instanceof SupermachineError && err.code === "EXEC_SNAPSHOT_UNSUPPORTED") return 409;
  if (err instanceof SupermachineError) return err.code === "POOL_ACQUIRE_TIMEOUT" || err.code === "POOL_SHUT_DOWN" ? 503 : err.code === "VM_DEAD" ? 502 : 500;
  const status = (err as { statusCode?: number }).statusCode;
  return typeof status === "number" && status >= 400 && status < 600 ? status : 500;
}

export function buildApp(deps: AppDeps): FastifyInstance {
  const app = Fastify({
    logger: deps.logger,
    requestIdHeader: "x-request-id",
    genReqId: () => randomBytes(8).toString("hex"),
    bodyLimit: 16 * 1024 * 1024,
    ...(deps.https ? { https: deps.https } : {}),
  }) as unknown as FastifyInstance;
  const auth = new WeakMap<IncomingMessage, RequestAuth>();

  app.addHook("onSend", async (req, reply) => {
    void reply.header("x-request-id", req.id);
  });
  app.addHook("onResponse", async (req, reply) => {
    deps.metrics.requests.inc({ method: req.method, route: req.routeOptions.url ?? "unmatched", status: String(reply.statusCode) });
  });

  // Routing and authentication, before any body is read.
  app.addHook("onRequest", async (req) => {
    const path = req.url.split("?")[0]!;
    if (OPEN.has(path) || (deps.page && isPagePath(path))) return;
    const registry = deps.registry();
    const sandboxId = header(req, "e2b-sandbox-id");
    const token = header(req, "x-access-token");
    // Data-plane paths are envd's; /health is on both planes, and is envd's when the request names
    // a sandbox (SDKs before 2.14.1 send only the access token, no E2b-Sandbox-Id). Every other
    // path is the control plane's and needs a key, whatever else the request carries.
    const envdPath = CONNECT_PREFIXES.some((p) => path.startsWith(p)) || ENVD_PATHS.has(path);
    if (envdPath || (path === "/health" && (sandboxId !== undefined || token !== undefined))) {
      auth.set(req.raw, routeToSandbox(registry, sandboxId, token));
      return;
    }
    if (path === "/health") return;
    const key = deps.keys.verify(header(req, "x-api-key") ?? bearer(header(req, "authorization")));
    if (!key) {
      throw new ServerError("SERVER_UNAUTHORIZED", header(req, "x-api-key") || header(req, "authorization") ? "the API key is unknown or revoked" : "the request has no API key", {
        hint: "send a key from `supermachine keys create` in the X-API-KEY header (E2B_API_KEY for the E2B SDKs)",
      });
    }
    auth.set(req.raw, { key });
    // Until the pools are loaded; once draining, reads still work and creates say why they fail.
    if (!registry) throw new ServerError("SERVER_STARTING", `the server is not ready: ${deps.notReady() ?? "loading the project"}`, { hint: "wait for /readyz to answer 200" });
  });

  const keyOf = (req: FastifyRequest): KeyRecord => {
    const key = auth.get(req.raw)?.key;
    if (!key) throw new ServerError("SERVER_UNAUTHORIZED", "the request has no API key", { hint: "send X-API-KEY" });
    return key;
  };
  const sandboxOfRequest = (req: FastifyRequest): Sandbox => {
    const a = auth.get(req.raw);
    if (a?.sandbox) return a.sandbox;
    throw a?.refused ?? new ServerError("SERVER_NOT_FOUND", "the request names no sandbox", { hint: "send E2b-Sandbox-Id and X-Access-Token" });
  };
  const sandboxOfCall = (ctx: HandlerContext): Sandbox => {
    const v = ctx.values.get(kSandbox);
    if (v === undefined) throw new ConnectError("the request names no sandbox (E2b-Sandbox-Id / X-Access-Token)", Code.NotFound);
    if (v instanceof ServerError) throw new ConnectError(`${v.code}: ${v.message}`, v.code === "SERVER_UNAUTHORIZED" ? Code.Unauthenticated : Code.NotFound);
    return v;
  };

  app.setErrorHandler((err, req, reply) => {
    const status = statusOf(err);
    const code = err instanceof SupermachineError ? err.code : (err as { code?: string }).code;
    const message = (err as Error).message;
    if (status >= 500 && code !== "SERVER_SANDBOX_GONE") {
      req.log.error({ err }, "request failed");
      const keyId = auth.get(req.raw)?.key?.id;
      if (keyId) deps.native?.events.emit({ kind: "error", type: "request", message: `${req.method} ${req.url.split("?")[0]}: ${message}`, code: code ?? null }, keyId);
    } else req.log.info({ code, status, message }, "request refused");
    void reply.code(status).send({ code: status, message: code ? `${code}: ${message}` : message, ...(code ? { errorCode: code } : {}), ...(err instanceof SupermachineError && err.hint ? { hint: err.hint } : {}) });
  });
  app.setNotFoundHandler((req, reply) => {
    void reply.code(404).send({ code: 404, message: `no route ${req.method} ${req.url.split("?")[0]}`, errorCode: "SERVER_NOT_FOUND", hint: "see docs/serve.md for the routes this server offers" });
  });

  // Octet-stream bodies (file uploads) are handed over as streams, never buffered.
  app.addContentTypeParser("application/octet-stream", (_req, payload, done) => done(null, payload));
  // preservePath: a part's filename is the path to write (E2B's multi-file form), not a bare name.
  void app.register(multipart, { preservePath: true, limits: { fileSize: Number.MAX_SAFE_INTEGER, files: 10_000, fields: 100, parts: 10_100 } });

  if (deps.page) registerPage(app);
  app.get("/healthz", async () => ({ status: "ok" }));
  app.get("/readyz", async (_req, reply) => {
    const why = deps.notReady();
    return why ? reply.code(503).send({ status: "starting", reason: why }) : { status: "ready" };
  });
  app.get("/metrics", async (_req, reply) => reply.type(deps.metrics.contentType).send(await deps.metrics.text()));
  if (deps.node) app.get("/v1/node", async () => deps.node!());
  app.get("/health", async (req, reply) => {
    const a = auth.get(req.raw);
    if (a) return envdHealth(sandboxOfRequest(req), reply);
    return { status: "ok" };
  });

  const connect = connectNodeAdapter({
    routes: (router) => {
      router.service(Process, processService(sandboxOfCall, (sb) => countProcess(sb, deps.metrics, "spawn")));
      router.service(Filesystem, filesystemService(sandboxOfCall));
      deps.extraServices?.(router, sandboxOfCall);
    },
    contextValues: (req) => {
      const a = auth.get(req as IncomingMessage);
      return createContextValues().set(kSandbox, a?.sandbox ?? a?.refused);
    },
    jsonOptions: { ignoreUnknownFields: true },
    // One message (stdin for SendInput, a path) is small; bound what a request can make us hold.
    readMaxBytes: 16 * 1024 * 1024,
    acceptCompression: [],
    grpc: false,
    grpcWeb: false,
  });
  for (const prefix of CONNECT_PREFIXES) {
    app.route({
      method: ["POST", "GET"],
      url: `${prefix}*`,
      onRequest: (req: FastifyRequest, reply: FastifyReply, done: () => void) => {
        // Connect answers on the raw response: give it the request id, and log its end (Fastify
        // logs neither for a hijacked reply).
        reply.raw.setHeader("x-request-id", req.id);
        const t0 = performance.now();
        reply.raw.once("close", () => {
          deps.metrics.requests.inc({ method: req.method, route: prefix + "*", status: String(reply.raw.statusCode) });
          req.log.info({ res: { statusCode: reply.raw.statusCode }, responseTime: performance.now() - t0, rpc: req.url.split("?")[0] }, "rpc completed");
        });
        reply.hijack();
        connect(req.raw, reply.raw);
        done();
      },
      handler: async () => {},
    });
  }

  void app.register(async (scoped) => {
    registerEnvdFiles(scoped, { sandboxOf: sandboxOfRequest });
    const registry = () => {
      const r = deps.registry();
      if (!r) throw new ServerError("SERVER_STARTING", `the server is not ready: ${deps.notReady() ?? "loading the project"}`, { hint: "wait for /readyz to answer 200" });
      return r;
    };
    registerControlPlane(scoped, { registry, keyOf });
    registerNative(scoped, { registry, keyOf, metrics: deps.metrics, state: deps.native });
  });
  return app;
}

function header(req: FastifyRequest, name: string): string | undefined {
  const v = req.headers[name];
  const s = Array.isArray(v) ? v[0] : v;
  return s === undefined || s === "" ? undefined : s;
}

function bearer(authorization: string | undefined): string | undefined {
  return authorization?.match(/^Bearer\s+(\S+)$/i)?.[1];
}

/** The sandbox a data-plane request is for: by id (its token must match) or by token alone. */
function routeToSandbox(registry: SandboxRegistry | undefined, sandboxId: string | undefined, token: string | undefined): RequestAuth {
  const bySandbox = sandboxId !== undefined ? registry?.get(sandboxId) : token !== undefined ? registry?.withToken(token) : undefined;
  if (!bySandbox) {
    // 502, as E2B's proxy answers for a sandbox that is gone: the SDKs read it as "not running".
    return { refused: new ServerError("SERVER_SANDBOX_GONE", sandboxId ? `no sandbox ${JSON.stringify(sandboxId)} on this server` : "the request's access token names no sandbox", { hint: "it may have timed out or been killed" }) };
  }
  if (bySandbox.state === "paused") {
    return { refused: new ServerError("SERVER_SANDBOX_GONE", `sandbox ${bySandbox.id} is paused`, { hint: "resume it (connect) before calling into it" }) };
  }
  if (token !== bySandbox.accessToken) {
    return { refused: new ServerError("SERVER_UNAUTHORIZED", `the access token does not belong to sandbox ${bySandbox.id}`, { hint: "send the envdAccessToken the create call returned in X-Access-Token" }) };
  }
  return { sandbox: bySandbox };
}
