// The native API without VMs: the OpenAPI document (3.1, every /v1 route the app registers, and
// no route it does not), and fuzzed requests to every /v1 route, which must get a 4xx (never a
// 5xx, never a crash). The server runs for real (startServer, a key file, HTTP on loopback) on
// a project with no pools: every sandbox, pool and snapshot a request names is then unknown, so
// what is exercised is validation and routing; test/vm/serve-remote.test.ts fuzzes the bodies
// against a live sandbox.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startServer, type SupermachineServer } from "../../src/index.js";
import { KeyStore } from "../../src/server/keys.js";
import { ROUTES } from "../../src/server/native/schemas.js";
import type { Pools } from "../../src/project/pools.js";

let server: SupermachineServer;
let key: string;
let dir: string;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "sm-native-unit-"));
  const keys = new KeyStore(join(dir, "keys.json"));
  key = (await keys.create({ name: "test" })).key;
  // A project without pools, as loadPools returns it (pools by name, and close()).
  const pools = Object.defineProperty({}, "close", { value: async () => {}, enumerable: false }) as Pools;
  server = await startServer({ listen: "127.0.0.1:0", keys: keys.path, logLevel: "silent", pools });
  await server.ready;
});

afterAll(async () => {
  await server?.close();
  rmSync(dir, { recursive: true, force: true });
});

/** Every method and path the app routes under /v1, read from fastify's printed route tree. */
function appRoutes(): string[] {
  const out: string[] = [];
  const stack: string[] = [];
  for (const line of server.app.printRoutes({ commonPrefix: false }).split("\n")) {
    const m = /^([│├└─ ]*?)(\S+) \(([A-Z, ]+)\)$/u.exec(line);
    if (!m) continue;
    const depth = [...m[1]!].length / 4 - 1;
    stack.length = depth;
    const path = (depth > 0 ? stack[depth - 1]! : "") + m[2]!;
    stack.push(path);
    if (!path.startsWith("/v1/")) continue;
    for (const method of m[3]!.split(", ")) if (method !== "HEAD") out.push(`${method} ${path}`);
  }
  return [...new Set(out)].sort();
}

describe("GET /openapi.json", () => {
  it("is an OpenAPI 3.1 document, served without a key", async () => {
    const res = await fetch(`${server.url}/openapi.json`);
    expect(res.status).toBe(200);
    const doc = (await res.json()) as { openapi: string; info: { title: string }; paths: Record<string, Record<string, { responses: Record<string, unknown>; operationId: string }>>; components: { schemas: Record<string, unknown> } };
    expect(doc.openapi).toMatch(/^3\.1\.\d+$/);
    expect(doc.info.title).toBeTruthy();
    const ids = new Set<string>();
    for (const [path, ops] of Object.entries(doc.paths)) {
      expect(path.startsWith("/v1/"), path).toBe(true);
      for (const [method, op] of Object.entries(ops)) {
        expect(["get", "post", "put", "delete"]).toContain(method);
        expect(Object.keys(op.responses).length, `${method} ${path}`).toBeGreaterThan(0);
        expect(ids.has(op.operationId), `operationId ${op.operationId} is unique`).toBe(false);
        ids.add(op.operationId);
      }
    }
    expect(Object.keys(doc.components.schemas)).toEqual(expect.arrayContaining(["Error", "StartMessage", "ClientControl", "ServerControl"]));
    // The create body is a real JSON Schema of the zod schema.
    const create = doc.paths["/v1/sandboxes"]!.post as unknown as { requestBody: { content: { "application/json": { schema: { properties: Record<string, unknown> } } } } };
    expect(Object.keys(create.requestBody.content["application/json"].schema.properties)).toEqual(expect.arrayContaining(["pool", "snapshot", "timeoutMs", "metadata", "env"]));
  });

  it("lists exactly the /v1 routes the app registers", async () => {
    const doc = (await (await fetch(`${server.url}/openapi.json`)).json()) as { paths: Record<string, Record<string, unknown>> };
    const documented = Object.entries(doc.paths)
      .flatMap(([path, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${path.replace(/\{(\w+)\}/g, ":$1")}`))
      .sort();
    const routes = appRoutes();
    expect(routes.length).toBeGreaterThanOrEqual(ROUTES.length);
    expect(documented).toEqual(routes);
  });
});

describe("the /v1 routes, fuzzed", () => {
  const id = "abcdefghij0123456789";
  const concrete = (path: string) => path.replace(":id", id).replace(":pid", "42").replace(":port", "8080").replace(":name", "nope").replace(":snapshot", id);
  // Not the event stream, which answers 200 and stays open by design.
  const anyPath = fc.oneof(fc.constantFrom(...ROUTES.filter((r) => !r.websocket && !r.response.sse && !r.open).map((r) => concrete(r.path))), fc.string().map((s) => `/v1/sandboxes/${encodeURIComponent(s)}`));
  const method = fc.constantFrom("GET", "POST", "PUT", "DELETE", "PATCH");
  const body = fc.oneof(
    fc.jsonValue().map((v) => ({ type: "application/json", text: JSON.stringify(v) })),
    fc.string().map((s) => ({ type: "application/json", text: s })),
    fc.record({ pool: fc.oneof(fc.string(), fc.jsonValue()), snapshot: fc.oneof(fc.string(), fc.constant(id)), timeoutMs: fc.jsonValue(), metadata: fc.jsonValue(), env: fc.jsonValue() }, { requiredKeys: [] }).map((v) => ({ type: "application/json", text: JSON.stringify(v) })),
    fc.record({ argv: fc.jsonValue(), stageFiles: fc.jsonValue(), winsize: fc.jsonValue(), limits: fc.jsonValue() }, { requiredKeys: [] }).map((v) => ({ type: "application/json", text: JSON.stringify(v) })),
    fc.uint8Array().map((b) => ({ type: "application/octet-stream", text: Buffer.from(b).toString("latin1") })),
    fc.constant(undefined),
  );
  const query = fc.dictionary(fc.constantFrom("path", "maxBytes", "mode", "user", "pool", "metadata.a", "x"), fc.string(), { maxKeys: 4 });

  it("answers every request with a 4xx and the error body", async () => {
    await fc.assert(
      fc.asyncProperty(method, anyPath, query, body, async (m, path, q, b) => {
        const url = new URL(server.url + path);
        for (const [k, v] of Object.entries(q)) url.searchParams.set(k, v);
        const res = await fetch(url, { method: m, headers: { "x-api-key": key, ...(b && m !== "GET" ? { "content-type": b.type } : {}) }, ...(b && m !== "GET" ? { body: b.text } : {}) });
        const text = await res.text();
        const what = `${m} ${url.pathname}${url.search} ${b?.text.slice(0, 200) ?? ""} -> ${res.status} ${text.slice(0, 300)}`;
        // 200 only for reads that need no sandbox (pools, lists, builds).
        if (res.status < 300) {
          expect(m === "GET" || m === "DELETE", what).toBe(true);
          return;
        }
        expect(res.status, what).toBeGreaterThanOrEqual(400);
        expect(res.status, what).toBeLessThan(500);
        const err = JSON.parse(text) as { code: number; message: string; errorCode?: string };
        expect(err.code, what).toBe(res.status);
        expect(err.message, what).toBeTruthy();
      }),
      { numRuns: 400 },
    );
  });

  it("names the field at fault", async () => {
    const res = await fetch(`${server.url}/v1/sandboxes/${id}/exec`, { method: "POST", headers: { "x-api-key": key, "content-type": "application/json" }, body: JSON.stringify({ argv: ["ls"], winsize: { cols: 0, rows: 3 } }) });
    expect(res.status).toBe(400);
    const err = (await res.json()) as { errorCode: string; message: string };
    expect(err.errorCode).toBe("SERVER_BAD_REQUEST");
    expect(err.message).toContain("winsize.cols");
  });

  it("needs a key on every /v1 route but the node's report", async () => {
    // GET /v1/node is open: test/vm/scale-out.test.ts reads it (it names QEMU's version, which the unit tier never runs).
    for (const r of ROUTES.filter((x) => !x.open)) {
      const res = await fetch(server.url + concrete(r.path), { method: r.method });
      expect(res.status, `${r.method} ${r.path}`).toBe(401);
    }
  });
});
