/**
 * The native API's wire format as zod schemas: every request body, query and WebSocket control
 * message the `/v1` routes take, and the bodies they answer. The routes validate with these, and
 * the OpenAPI document (openapi.ts) is generated from the same objects and the route table at the
 * end of this file, so the document and the server cannot disagree. Bytes travel as base64 in
 * JSON (exec's output, staged files) and raw everywhere else (files, WebSocket frames).
 */
import { z } from "zod";

const name = z.string().min(1).max(256);
const sandboxId = z.string().regex(/^[a-z0-9]{20}$/, { error: "is not a sandbox id (20 lowercase letters and digits)" });
const snapshotId = z.string().regex(/^[a-z0-9]{20}$/, { error: "is not a snapshot id (20 lowercase letters and digits)" });
const stringMap = z.record(z.string().min(1).max(1024), z.string().max(65536));
const noNul = (what: string) => z.string().max(65536).refine((s) => !s.includes("\0"), { error: `${what} must not contain a NUL byte` });
const argv = z.array(noNul("an argument")).min(1).max(65536);
const timeoutMs = z.number().int().positive().max(Number.MAX_SAFE_INTEGER);
const guestPath = noNul("a path").pipe(z.string().startsWith("/", { error: "must be an absolute guest path" }));
const base64 = z.string().regex(/^[A-Za-z0-9+/]*={0,2}$/, { error: "is not base64" });

// ---- pools -----------------------------------------------------------------------------------

export const poolStats = z.object({
  alive: z.number(),
  inUse: z.number(),
  idle: z.number(),
  waiting: z.number(),
  min: z.number(),
  max: z.number(),
  memoryMib: z.number(),
  vcpus: z.number(),
});
/** A pool's recent acquires in buckets of bucketSeconds (the last 10 minutes): count, p50 and p99 latency. */
export const acquireSeries = z.object({
  bucketSeconds: z.number(),
  buckets: z.array(z.object({ t: z.number(), count: z.number(), p50Ms: z.number().nullable(), p99Ms: z.number().nullable() })),
});
export const poolInfo = z.object({
  name: z.string(),
  /** The project image it serves (null when unknown). */
  image: z.string().nullable(),
  stats: poolStats,
  acquire: acquireSeries,
  /** Sandboxes of the pool created and ended per second, over the last minute. */
  cyclesPerSecond: z.number(),
});
export const poolList = z.object({ pools: z.array(poolInfo) });

// ---- sandboxes -------------------------------------------------------------------------------

export const createSandbox = z
  .object({
    /** The project pool to acquire from (or `snapshot`). */
    pool: name.optional(),
    /** A snapshot taken with POST /v1/sandboxes/{id}/snapshot (or `pool`). */
    snapshot: snapshotId.optional(),
    /** The sandbox's life; the server's default when absent. */
    timeoutMs: timeoutMs.optional(),
    metadata: stringMap.optional(),
    /** Environment of every process started in the sandbox (a call's own env wins). */
    env: stringMap.optional(),
    /**
     * Egress of this sandbox: "none" or { allow, hosts?, maxConnections?, maxBytes? } (docs/network.md);
     * only on a server started with --allow-sandbox-network, and a pool without its own network.
     */
    network: z.union([z.literal("none"), z.object({ allow: z.array(z.string()), hosts: stringMap.optional(), maxConnections: z.number().int().optional(), maxBytes: z.number().int().optional() }).strict()]).optional(),
  })
  .strict()
  .refine((b) => (b.pool === undefined) !== (b.snapshot === undefined), { error: "name exactly one of pool and snapshot", path: ["pool"] });

export const sandboxInfo = z.object({
  id: z.string(),
  pool: z.string(),
  snapshot: z.string().nullable(),
  metadata: z.record(z.string(), z.string()),
  startedAt: z.string(),
  endAt: z.string(),
  memoryMib: z.number(),
  vcpus: z.number(),
  state: z.enum(["running", "paused"]),
  /** Processes started in it through the server (execs and spawns). */
  execs: z.number(),
  /** Bytes its egress moved, both ways. */
  egressBytes: z.number(),
});
export const sandboxList = z.object({ sandboxes: z.array(sandboxInfo) });
/** `?metadata.<key>=<value>` filters (all must match) and `?pool=`. */
export const listSandboxesQuery = z.record(z.string(), z.union([z.string(), z.array(z.string())]));
export const setTimeoutBody = z.object({ timeoutMs }).strict();
export const sandboxParams = z.object({ id: sandboxId });

// ---- exec ------------------------------------------------------------------------------------

const winsize = z.object({ cols: z.number().int().min(1).max(65535), rows: z.number().int().min(1).max(65535) }).strict();
const limits = z.object({ processes: z.number().int().min(1).max(4_194_304).optional(), memoryMib: z.number().int().min(1).max(1 << 20).optional() }).strict();
const stagedFile = z.object({ path: guestPath, data: base64, mode: z.number().int().min(0).max(0o7777).optional() }).strict();

const processOptions = {
  argv,
  env: stringMap.optional(),
  cwd: guestPath.optional(),
  timeoutMs: timeoutMs.optional(),
  tty: z.boolean().optional(),
  winsize: winsize.optional(),
  user: z.string().min(1).max(256).optional(),
  limits: limits.optional(),
  detach: z.boolean().optional(),
  /** Files written before the process starts (base64 `data`, `mode` default 0644). */
  stageFiles: z.array(stagedFile).max(1024).optional(),
};

export const execBody = z.object({ ...processOptions, chain: argv.optional() }).strict();
export const execResult = z.object({
  /** base64 */
  stdout: z.string(),
  /** base64 */
  stderr: z.string(),
  exitCode: z.number(),
  timedOut: z.boolean(),
  signal: z.string().nullable(),
  durationMs: z.number(),
  oomKilled: z.boolean(),
  pidsLimited: z.boolean(),
});

// ---- processes (WebSocket) -------------------------------------------------------------------

/** The first text frame on /v1/sandboxes/{id}/processes: what to start. */
export const startMessage = z
  .object({
    type: z.literal("start"),
    ...processOptions,
    /** Kill the process when this socket closes (default: it runs on; attach again by pid). */
    killOnDisconnect: z.boolean().optional(),
  })
  .strict();

/** Control frames a client sends after the start (or after attaching). */
export const clientControl = z.discriminatedUnion("type", [
  z.object({ type: z.literal("signal"), signal: z.union([z.number().int().min(1).max(64), z.string().min(1).max(32)]) }).strict(),
  z.object({ type: z.literal("resize"), cols: z.number().int().min(1).max(65535), rows: z.number().int().min(1).max(65535) }).strict(),
  z.object({ type: z.literal("closeStdin") }).strict(),
]);

export const waitResult = z.object({
  exitCode: z.number(),
  timedOut: z.boolean(),
  peakRssKib: z.number().nullable(),
  signal: z.string().nullable(),
  durationMs: z.number(),
  oomKilled: z.boolean(),
  pidsLimited: z.boolean(),
});
export const errorBody = z.object({ code: z.number(), message: z.string(), errorCode: z.string().optional(), hint: z.string().optional() });
const wireError = z.object({ code: z.string(), message: z.string(), hint: z.string().optional() });

/** Control frames the server sends. */
export const serverControl = z.discriminatedUnion("type", [
  z.object({ type: z.literal("started"), pid: z.number(), tty: z.boolean() }),
  z.object({ type: z.literal("exit"), result: waitResult }),
  z.object({ type: z.literal("error"), error: wireError }),
]);

export const processInfo = z.object({ pid: z.number(), argv: z.array(z.string()), tty: z.boolean(), running: z.boolean() });
export const processList = z.object({ processes: z.array(processInfo) });
export const processParams = z.object({ id: sandboxId, pid: z.coerce.number().int().positive().max(2 ** 31) });

/** The first byte of a binary frame: which stream its bytes belong to. */
export const CHANNEL = { stdin: 0, stdout: 1, stderr: 2 } as const;

// ---- files, TCP ------------------------------------------------------------------------------

export const fileQuery = z
  .object({
    path: guestPath,
    /** Reads: refuse files larger than this (FILE_TOO_LARGE). */
    maxBytes: z.coerce.number().int().positive().max(Number.MAX_SAFE_INTEGER).optional(),
    /** Writes: permission bits, octal digits ("644"). */
    mode: z.string().regex(/^[0-7]{1,4}$/, { error: "must be octal permission bits such as 644" }).optional(),
    /** Writes: the owner, as exec's `user`. */
    user: z.string().min(1).max(256).optional(),
  })
  .strict();
export const fileWritten = z.object({ path: z.string(), bytes: z.number() });
export const statQuery = z.object({ path: guestPath, follow: z.enum(["true", "false"]).optional() }).strict();
export const listQuery = z.object({ path: guestPath, depth: z.coerce.number().int().min(1).max(0xffff_ffff).optional() }).strict();
export const removeQuery = z.object({ path: guestPath, recursive: z.enum(["true", "false"]).optional() }).strict();
const ownerId = z.number().int().min(0).max(0xffff_fffe);
export const makeDirBody = z.object({ path: guestPath, parents: z.boolean().optional(), mode: z.number().int().min(0).max(0o7777).optional(), uid: ownerId.optional(), gid: ownerId.optional() }).strict();
export const moveBody = z.object({ from: guestPath, to: guestPath }).strict();
export const fileInfo = z.object({
  path: z.string(),
  name: z.string(),
  type: z.enum(["file", "directory", "symlink", "other"]),
  size: z.number(),
  mode: z.number(),
  uid: z.number(),
  gid: z.number(),
  mtimeMs: z.number(),
  symlinkTarget: z.string().optional(),
});
export const fileList = z.object({ entries: z.array(fileInfo) });
export const madeDir = z.object({ created: z.boolean() });
export const tcpParams = z.object({ id: sandboxId, port: z.coerce.number().int().min(1).max(65535) });

// ---- snapshots, builds -----------------------------------------------------------------------

export const snapshotBody = z.object({ timeoutMs: timeoutMs.optional() }).strict();
export const snapshotInfo = z.object({ id: z.string(), pool: z.string(), createdAt: z.string(), memoryMib: z.number(), vcpus: z.number() });
export const snapshotList = z.object({ snapshots: z.array(snapshotInfo) });
export const snapshotParams = z.object({ snapshot: snapshotId });

export const buildStatus = z.object({
  name: z.string(),
  /** "building" until its end, then the build's outcome (baked, cached, imported, failed, ...). */
  status: z.string(),
  key: z.string().nullable(),
  ms: z.number().nullable(),
  error: z.string().nullable(),
  updatedAt: z.string(),
});
export const buildList = z.object({ images: z.array(buildStatus) });

// ---- the project's images (the serve page) ---------------------------------------------------

const inputChange = z.object({ input: z.string(), before: z.unknown(), after: z.unknown() });
export const imageView = z.object({
  name: z.string(),
  parent: z.string().nullable(),
  children: z.array(z.string()),
  ref: z.string().nullable(),
  /** The module that defines it, relative to the project's root. */
  module: z.string().nullable(),
  key: z.string().nullable(),
  cached: z.boolean(),
  sizeBytes: z.number().nullable(),
  /** The pools that serve it. */
  pools: z.array(z.string()),
  /** Its build's last status on this server (step: what a bake in progress does now). */
  build: z.object({ status: z.string(), step: z.string().nullable(), updatedAt: z.string(), ms: z.number().nullable(), error: z.string().nullable() }).nullable(),
});
export const imageList = z.object({
  project: z.object({ config: z.string(), root: z.string() }).nullable(),
  images: z.array(imageView),
  updatedAt: z.string(),
});
export const imageParams = z.object({ name });
export const whyReport = z.object({
  name: z.string(),
  key: z.string(),
  cached: z.boolean(),
  lastBake: z.object({ key: z.string(), dir: z.string(), created: z.string() }).nullable(),
  changes: z.array(inputChange),
  /** The last time this server saw the image's key change (a watch round), and what changed. */
  lastRebake: z.object({ at: z.string(), from: z.string(), to: z.string(), changes: z.array(inputChange) }).nullable(),
});

// ---- the route table -------------------------------------------------------------------------

export interface RouteSpec {
  method: "GET" | "POST" | "PUT" | "DELETE";
  /** Fastify's form (`:id`); openapi.ts writes it as `{id}`. */
  path: string;
  summary: string;
  params?: z.ZodType;
  query?: z.ZodType;
  body?: z.ZodType;
  /** A raw body (`application/octet-stream`) instead of JSON. */
  rawBody?: boolean;
  /** Status and schema of the answer; `raw` for a byte stream, `sse` for an event stream (described by `sse`), `text` for plain text. */
  response: { status: number; schema?: z.ZodType; raw?: boolean; sse?: string; text?: boolean };
  /** A WebSocket upgrade (GET): the framing is in docs/serve.md. */
  websocket?: boolean;
  /** Needs no key (a node's report for fronts). */
  open?: boolean;
}

const poolReport = z.object({
  name: z.string(),
  image: z.string(),
  key: z.string().nullable(),
  state: z.enum(["open", "closed", "loading", "failed"]),
  origin: z.enum(["cached", "imported", "baked"]).optional(),
  error: z.object({ code: z.string().optional(), message: z.string() }).optional(),
  idle: z.number(),
  inUse: z.number(),
  max: z.number(),
});

/** GET /v1/node (src/server/node.ts). */
export const nodeReport = z.object({
  node: z.object({ name: z.string(), tag: z.string(), version: z.string(), startedAt: z.string() }),
  state: z.enum(["starting", "ready", "draining"]),
  reason: z.string().optional(),
  identity: z.record(z.string(), z.unknown()).nullable(),
  load: z.object({
    sandboxes: z.number(),
    creating: z.number(),
    capacity: z.number(),
    cpu: z.number(),
    cores: z.number(),
    memory: z.object({ totalMib: z.number(), availableMib: z.number() }),
  }),
  pools: z.array(poolReport),
  keys: z.array(z.string()),
});

export const ROUTES: readonly RouteSpec[] = [
  { method: "GET", path: "/v1/node", summary: "This node's name, tag, state, host identity, load and pools, for fronts (no key needed)", response: { status: 200, schema: nodeReport }, open: true },
  { method: "GET", path: "/v1/pools", summary: "The project's pools and their stats", response: { status: 200, schema: poolList } },
  { method: "GET", path: "/v1/pools/:name", summary: "One pool's stats", params: z.object({ name }), response: { status: 200, schema: poolInfo } },
  { method: "POST", path: "/v1/sandboxes", summary: "Acquire a VM from a pool (or from a snapshot) as a sandbox", body: createSandbox, response: { status: 201, schema: sandboxInfo } },
  { method: "GET", path: "/v1/sandboxes", summary: "The key's sandboxes; filter with ?pool= and ?metadata.<key>=<value>", query: listSandboxesQuery, response: { status: 200, schema: sandboxList } },
  { method: "GET", path: "/v1/sandboxes/:id", summary: "One sandbox", params: sandboxParams, response: { status: 200, schema: sandboxInfo } },
  { method: "DELETE", path: "/v1/sandboxes/:id", summary: "Release the sandbox's VM to its pool", params: sandboxParams, response: { status: 204 } },
  { method: "POST", path: "/v1/sandboxes/:id/timeout", summary: "The sandbox lives timeoutMs from now", params: sandboxParams, body: setTimeoutBody, response: { status: 200, schema: sandboxInfo } },
  { method: "POST", path: "/v1/sandboxes/:id/exec", summary: "Run a process to completion (vm.exec)", params: sandboxParams, body: execBody, response: { status: 200, schema: execResult } },
  { method: "GET", path: "/v1/sandboxes/:id/processes", summary: "Processes started through the server (native and E2B)", params: sandboxParams, response: { status: 200, schema: processList } },
  { method: "GET", path: "/v1/sandboxes/:id/processes/spawn", summary: "WebSocket: start a process (first frame: a start message) and stream it", params: sandboxParams, websocket: true, response: { status: 101 } },
  { method: "GET", path: "/v1/sandboxes/:id/processes/:pid", summary: "WebSocket: attach to a running process by pid", params: processParams, websocket: true, response: { status: 101 } },
  { method: "GET", path: "/v1/sandboxes/:id/files", summary: "Read a guest file, streamed", params: sandboxParams, query: fileQuery, response: { status: 200, raw: true } },
  { method: "PUT", path: "/v1/sandboxes/:id/files", summary: "Write a guest file from the streamed body", params: sandboxParams, query: fileQuery, rawBody: true, response: { status: 200, schema: fileWritten } },
  { method: "GET", path: "/v1/sandboxes/:id/files/stat", summary: "A guest file's metadata (vm.stat; a symlink as itself unless ?follow=true)", params: sandboxParams, query: statQuery, response: { status: 200, schema: fileInfo } },
  { method: "GET", path: "/v1/sandboxes/:id/files/list", summary: "A directory's entries to a depth (vm.readDir)", params: sandboxParams, query: listQuery, response: { status: 200, schema: fileList } },
  { method: "POST", path: "/v1/sandboxes/:id/files/mkdir", summary: "Make a directory (vm.makeDir), owned by uid:gid when given", params: sandboxParams, body: makeDirBody, response: { status: 200, schema: madeDir } },
  { method: "POST", path: "/v1/sandboxes/:id/files/move", summary: "Rename or move a guest file (vm.rename)", params: sandboxParams, body: moveBody, response: { status: 204 } },
  { method: "DELETE", path: "/v1/sandboxes/:id/files", summary: "Remove a guest file, or a directory with ?recursive=true (vm.remove)", params: sandboxParams, query: removeQuery, response: { status: 204 } },
  { method: "GET", path: "/v1/sandboxes/:id/tcp/:port", summary: "WebSocket: one TCP connection to the guest's 127.0.0.1:port", params: tcpParams, websocket: true, response: { status: 101 } },
  { method: "POST", path: "/v1/sandboxes/:id/snapshot", summary: "Capture the sandbox's VM (vm.snapshot); sandboxes can then be created from it", params: sandboxParams, body: snapshotBody, response: { status: 201, schema: snapshotInfo } },
  { method: "GET", path: "/v1/snapshots", summary: "The snapshots this server holds", response: { status: 200, schema: snapshotList } },
  { method: "DELETE", path: "/v1/snapshots/:snapshot", summary: "Remove a snapshot (its idle VMs shut down, its files deleted once no sandbox uses it)", params: snapshotParams, response: { status: 204 } },
  { method: "GET", path: "/v1/builds", summary: "Each image's last build status", response: { status: 200, schema: buildList } },
  { method: "GET", path: "/v1/builds/events", summary: "Build events as they happen (Server-Sent Events)", response: { status: 200, sse: "`status` events for each image first, then `start`, `progress` and `done` as they come" } },
  { method: "GET", path: "/v1/images", summary: "The project's image graph: each image's key, whether it is baked, its size, pools and build status", response: { status: 200, schema: imageList } },
  { method: "GET", path: "/v1/images/:name/why", summary: "Why the image would rebake (its key's inputs against its last bake), and its last rebake on this server", params: imageParams, response: { status: 200, schema: whyReport } },
  { method: "GET", path: "/v1/images/:name/log", summary: "The log of the image's last bake (text)", params: imageParams, response: { status: 200, text: true } },
  {
    method: "GET",
    path: "/v1/events",
    summary: "The server's events as they happen (Server-Sent Events): bakes, watch rounds, the key's sandboxes and errors",
    response: { status: 200, sse: "Each message has an `id` and a JSON `data` object `{ id, at, kind, type, ... }`, kind being bake, watch, sandbox or error; the recent ones first (after `Last-Event-ID` when sent)" },
  },
];
