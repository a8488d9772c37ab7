/**
 * How a front sends each request on, from its method, path and headers alone:
 * - `create`: a new sandbox (E2B's `POST /sandboxes` and `/v2/sandboxes`, native
 *   `POST /v1/sandboxes`): placed on a node (src/server/front/placement.ts);
 * - `list`: the sandboxes or snapshots of every node, merged;
 * - `tag`: a request for one sandbox or snapshot, by the node tag its id (or, for E2B SDKs that
 *   send no sandbox id, its access token) ends with;
 * - `any`: node-independent reads (pools, builds, the OpenAPI document, a bare `/health`), from
 *   any node that is ready.
 */
import { tagOf } from "../node-tag.js";

export type Route =
  | { kind: "create"; api: "e2b" | "native" }
  | { kind: "list"; api: "e2b" | "e2b-paged" | "native"; field?: "sandboxes" | "snapshots" }
  | { kind: "tag"; tag: string | undefined; id: string | undefined }
  | { kind: "any" };

const ENVD_PREFIXES = ["/process.Process/", "/filesystem.Filesystem/"];

export function classify(method: string, path: string, header: (name: string) => string | undefined): Route {
  if (method === "POST" && (path === "/sandboxes" || path === "/v2/sandboxes")) return { kind: "create", api: "e2b" };
  if (method === "POST" && path === "/v1/sandboxes") return { kind: "create", api: "native" };
  if (method === "GET" && path === "/sandboxes") return { kind: "list", api: "e2b" };
  if (method === "GET" && path === "/v2/sandboxes") return { kind: "list", api: "e2b-paged" };
  if (method === "GET" && path === "/v1/sandboxes") return { kind: "list", api: "native", field: "sandboxes" };
  if (method === "GET" && path === "/v1/snapshots") return { kind: "list", api: "native", field: "snapshots" };
  const m = path.match(/^\/(?:v2\/)?sandboxes\/([^/]+)/) ?? path.match(/^\/v1\/(?:sandboxes|snapshots)\/([^/]+)/);
  if (m) return { kind: "tag", tag: tagOf(m[1]), id: m[1] };
  const sandboxId = header("e2b-sandbox-id");
  const token = header("x-access-token");
  const envd = ENVD_PREFIXES.some((p) => path.startsWith(p)) || path === "/files";
  if (envd || (path === "/health" && (sandboxId || token))) {
    return { kind: "tag", tag: tagOf(sandboxId) ?? tagOf(token), id: sandboxId };
  }
  return { kind: "any" };
}

/** The pool a create body names: E2B's `templateID`, the native `pool`; or the snapshot a native create starts from. */
export function createTarget(api: "e2b" | "native", body: unknown): { pool?: string; snapshot?: string } {
  const b = (body && typeof body === "object" ? body : {}) as Record<string, unknown>;
  if (api === "e2b") return typeof b.templateID === "string" ? { pool: b.templateID } : {};
  if (typeof b.snapshot === "string") return { snapshot: b.snapshot };
  return typeof b.pool === "string" ? { pool: b.pool } : {};
}
