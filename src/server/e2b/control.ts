/**
 * The E2B profile's control plane (REST + JSON, key in `X-API-KEY`), on the server's sandbox
 * registry: create (`POST /sandboxes`, `/v2/sandboxes`; the template is a pool's name), list
 * (`GET /v2/sandboxes` with metadata filters and `X-Next-Token` pages, and the 1.x `GET
 * /sandboxes`), get, kill, set the timeout, connect (which resumes a paused sandbox), pause. Responses carry every field the spec marks
 * required, with the status codes the generated clients accept (201 on create, 204 on kill), and
 * errors as E2B's `{ code, message }`.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { z } from "zod";
import type { KeyRecord } from "../keys.js";
import type { Sandbox, SandboxRegistry } from "../sandboxes.js";
import { ServerError } from "../errors.js";

/** The envd version this profile claims: what the SDKs may use (see docs/serve.md). */
export const ENVD_VERSION = "0.5.7";
/** `clientID` is required by the spec (deprecated); one value per server. */
const CLIENT_ID = "supermachine";

const metadataRecord = z.record(z.string(), z.string()).optional();
const newSandbox = z
  .object({
    templateID: z.string().min(1),
    timeout: z.number().int().positive().optional(),
    metadata: metadataRecord.nullable(),
    envVars: metadataRecord.nullable(),
  })
  .passthrough();
const timeoutBody = z.object({ timeout: z.number().int().positive() }).passthrough();
const connectBody = z.object({ timeout: z.number().int().positive().optional() }).passthrough().optional().nullable();
const listQuery = z
  .object({
    metadata: z.string().optional(),
    state: z.union([z.string(), z.array(z.string())]).optional(),
    limit: z.coerce.number().int().min(1).max(1000).optional(),
    nextToken: z.string().optional(),
  })
  .passthrough();

function parse<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const r = schema.safeParse(value);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    throw new ServerError("SERVER_BAD_REQUEST", `${what}: ${issue.path.join(".") || "body"}: ${issue.message}`, { hint: "see docs/serve.md for the fields this server takes" });
  }
  return r.data;
}

const iso = (d: Date) => d.toISOString();

function sandboxBody(sb: Sandbox) {
  return { sandboxID: sb.id, templateID: sb.pool, clientID: CLIENT_ID, envdVersion: ENVD_VERSION, envdAccessToken: sb.accessToken, alias: sb.pool };
}

function detailBody(sb: Sandbox) {
  return {
    ...sandboxBody(sb),
    startedAt: iso(sb.startedAt),
    endAt: iso(sb.endAt),
    cpuCount: sb.vcpus,
    memoryMB: sb.memoryMib,
    diskSizeMB: 0,
    state: sb.state,
    metadata: sb.metadata,
  };
}

/** `metadata=k%3Dv%26k2%3Dv2` (URL-encoded `k=v&k2=v2`) as a record. */
function metadataFilter(raw: string | undefined): Record<string, string> | undefined {
  if (!raw) return undefined;
  return Object.fromEntries(new URLSearchParams(raw));
}

export interface ControlDeps {
  registry: () => SandboxRegistry;
  /** The key of an authenticated request (set by the server's auth hook). */
  keyOf: (req: FastifyRequest) => KeyRecord;
}

export function registerControlPlane(app: FastifyInstance, deps: ControlDeps): void {
  const { keyOf } = deps;

  const create = async (req: FastifyRequest, reply: FastifyReply) => {
    const body = parse(newSandbox, req.body ?? {}, `POST ${req.url}`);
    const sb = await deps.registry().create({
      pool: body.templateID,
      key: keyOf(req),
      timeoutMs: body.timeout === undefined ? undefined : body.timeout * 1000,
      metadata: body.metadata ?? undefined,
      env: body.envVars ?? undefined,
    });
    req.log.info({ sandbox: sb.id, pool: sb.pool }, "sandbox created");
    return reply.code(201).send(sandboxBody(sb));
  };
  app.post("/sandboxes", create);
  app.post("/v2/sandboxes", create);

  const list = (paged: boolean) => async (req: FastifyRequest, reply: FastifyReply) => {
    const key = keyOf(req);
    const q = parse(listQuery, req.query, `GET ${req.url}`);
    const states = (Array.isArray(q.state) ? q.state : q.state?.split(",") ?? []).map((s) => s.trim()).filter(Boolean);
    let found = deps.registry().list(key, metadataFilter(q.metadata)).filter((s) => states.length === 0 || states.includes(s.state));
    // Pages in order of start, then id: a token is the last item's position, so items created
    // between pages neither repeat nor shift the next page.
    const position = (s: Sandbox) => `${s.startedAt.toISOString()}_${s.id}`;
    found.sort((a, b) => (position(a) < position(b) ? -1 : 1));
    if (paged) {
      if (q.nextToken) found = found.filter((s) => position(s) > q.nextToken!);
      const limit = q.limit ?? 100;
      if (found.length > limit) {
        void reply.header("x-next-token", position(found[limit - 1]!));
        found = found.slice(0, limit);
      }
    }
    return found.map(detailBody);
  };
  app.get("/v2/sandboxes", list(true));
  app.get("/sandboxes", list(false));

  app.get<{ Params: { id: string } }>("/sandboxes/:id", async (req) => detailBody(deps.registry().require(req.params.id, keyOf(req), `GET /sandboxes/${req.params.id}`)));

  app.delete<{ Params: { id: string } }>("/sandboxes/:id", async (req, reply) => {
    if (!(await deps.registry().kill(req.params.id, keyOf(req)))) deps.registry().require(req.params.id, keyOf(req), `DELETE /sandboxes/${req.params.id}`);
    req.log.info({ sandbox: req.params.id }, "sandbox killed");
    return reply.code(204).send();
  });

  app.post<{ Params: { id: string } }>("/sandboxes/:id/timeout", async (req, reply) => {
    const sb = deps.registry().require(req.params.id, keyOf(req), `POST /sandboxes/${req.params.id}/timeout`);
    const body = parse(timeoutBody, req.body ?? {}, `POST ${req.url}`);
    sb.setTimeout(deps.registry().checkTimeout(body.timeout * 1000, "timeout"));
    return reply.code(204).send();
  });

  // Connect resumes a paused sandbox (201) or returns a running one (200).
  const connect = async (req: FastifyRequest<{ Params: { id: string } }>, reply: FastifyReply) => {
    const sb = deps.registry().require(req.params.id, keyOf(req), `POST ${req.url}`);
    const body = parse(connectBody, req.body, `POST ${req.url}`);
    const ms = deps.registry().checkTimeout(body?.timeout === undefined ? undefined : body.timeout * 1000, "timeout");
    if (await deps.registry().resume(sb.id, keyOf(req), ms)) {
      req.log.info({ sandbox: sb.id }, "sandbox resumed");
      return reply.code(201).send(sandboxBody(sb));
    }
    // Connecting never shortens a sandbox's life.
    if (sb.endAt.getTime() < Date.now() + ms) sb.setTimeout(ms);
    return reply.code(200).send(sandboxBody(sb));
  };
  app.post("/sandboxes/:id/connect", connect);
  app.post("/v2/sandboxes/:id/connect", connect);

  app.post<{ Params: { id: string } }>("/sandboxes/:id/pause", async (req, reply) => {
    await deps.registry().pause(req.params.id, keyOf(req));
    req.log.info({ sandbox: req.params.id }, "sandbox paused");
    return reply.code(204).send();
  });
  // The 2.0-2.6 SDKs' resume.
  app.post<{ Params: { id: string } }>("/sandboxes/:id/resume", async (req, reply) => {
    const body = parse(connectBody, req.body, `POST ${req.url}`);
    const ms = deps.registry().checkTimeout(body?.timeout === undefined ? undefined : body.timeout * 1000, "timeout");
    if (!(await deps.registry().resume(req.params.id, keyOf(req), ms))) {
      throw new ServerError("SERVER_CONFLICT", `sandbox ${req.params.id} is not paused`, { hint: "only a paused sandbox can be resumed" });
    }
    return reply.code(201).send(sandboxBody(deps.registry().require(req.params.id, keyOf(req), `POST ${req.url}`)));
  });

  app.get<{ Params: { id: string } }>("/sandboxes/:id/metrics", async (req) => {
    deps.registry().require(req.params.id, keyOf(req), `GET ${req.url}`);
    return [];
  });

}
