// Request bodies, queries and headers from fast-check against the server's routes (the E2B control
// plane, the envd REST and Connect calls): every answer is a 4xx (a list, a valid request, 200),
// never a 5xx, a hang or a crash.
// One deliberate exception: a data-plane request for a sandbox that does not exist (any more) gets
// 502 SERVER_SANDBOX_GONE, the status E2B's proxy gives and the SDKs read as "not running".
// The server has keys but no pools (no VM is needed to refuse bad input); a valid create would
// name a pool, and there is none, so it too is a 4xx.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startServer, type SupermachineServer } from "../../src/index.js";
import { KeyStore } from "../../src/server/keys.js";
import type { Pools } from "../../src/project/pools.js";

let server: SupermachineServer;
let key: string;
const dir = mkdtempSync(join(tmpdir(), "sm-serve-fuzz-"));

beforeAll(async () => {
  const keys = new KeyStore(join(dir, "keys.json"));
  key = (await keys.create()).key;
  const pools = { close: async () => {}, [Symbol.asyncDispose]: async () => {} } as unknown as Pools;
  server = await startServer({ pools, listen: "127.0.0.1:0", keys: keys.path, logLevel: "silent" });
  await server.ready;
});

afterAll(async () => {
  await server?.close();
  rmSync(dir, { recursive: true, force: true });
});

const json = fc.jsonValue({ maxDepth: 3 });
const routes = fc.constantFrom(
  ["POST", "/sandboxes"],
  ["POST", "/v2/sandboxes"],
  ["GET", "/v2/sandboxes"],
  ["GET", "/sandboxes"],
  ["GET", "/sandboxes/abc"],
  ["DELETE", "/sandboxes/abc"],
  ["POST", "/sandboxes/abc/timeout"],
  ["POST", "/sandboxes/abc/connect"],
  ["POST", "/v2/sandboxes/abc/connect"],
  ["POST", "/sandboxes/abc/pause"],
  ["GET", "/files"],
  ["POST", "/files"],
  ["POST", "/process.Process/Start"],
  ["POST", "/process.Process/List"],
  ["POST", "/process.Process/SendInput"],
  ["POST", "/filesystem.Filesystem/Stat"],
  ["GET", "/nowhere"],
);
const contentTypes = fc.constantFrom("application/json", "application/connect+json", "application/octet-stream", "multipart/form-data; boundary=x", "text/plain", undefined);

/** The last envelope of a Connect stream: 1 flag byte, a 4-byte big-endian length, JSON. */
function lastEnvelope(b: Buffer): { flags: number; message: { error?: { code: string } } } {
  let last = { flags: 0, message: {} };
  for (let i = 0; i + 5 <= b.length; ) {
    const len = b.readUInt32BE(i + 1);
    last = { flags: b[i]!, message: JSON.parse(b.subarray(i + 5, i + 5 + len).toString("utf8") || "{}") as { error?: { code: string } } };
    i += 5 + len;
  }
  return last;
}

describe("serve under fuzzed requests", () => {
  it("answers every request with a 4xx", async () => {
    await fc.assert(
      fc.asyncProperty(
        routes,
        fc.oneof(json.map((v) => JSON.stringify(v)), fc.string({ maxLength: 200 }), fc.constant("")),
        fc.dictionary(fc.constantFrom("metadata", "state", "limit", "nextToken", "path", "username"), fc.string({ maxLength: 40 }), { maxKeys: 3 }),
        contentTypes,
        fc.record({ key: fc.boolean(), sandbox: fc.boolean(), token: fc.boolean() }),
        async ([method, path], body, query, type, h) => {
          const headers: Record<string, string> = {};
          if (type) headers["content-type"] = type;
          if (h.key) headers["x-api-key"] = key;
          if (h.sandbox) headers["e2b-sandbox-id"] = "abcdefghij0123456789";
          if (h.token) headers["x-access-token"] = "0".repeat(48);
          const qs = new URLSearchParams(query).toString();
          const res = await fetch(`${server.url}${path}${qs ? `?${qs}` : ""}`, { method, headers, ...(method === "GET" || method === "DELETE" ? {} : { body }), signal: AbortSignal.timeout(10_000) });
          const bytes = Buffer.from(await res.arrayBuffer());
          const text = bytes.toString("utf8");
          if (res.headers.get("content-type")?.startsWith("application/connect+json")) {
            // A Connect stream reports its failure in its end-of-stream message, with HTTP 200.
            expect(res.status).toBe(200);
            const end = lastEnvelope(bytes);
            expect(end.flags & 2, text).toBe(2);
            expect(end.message.error?.code, text).toBeDefined();
            expect(["internal", "unknown", "data_loss"], text).not.toContain(end.message.error?.code);
            return;
          }
          // Listing with a valid key is a valid request (200); nothing else here can succeed.
          if (!(method === "GET" && /^\/(v2\/)?sandboxes$/.test(path) && h.key)) {
            expect(res.status, `${method} ${path} ${JSON.stringify(headers)} ${body.slice(0, 80)} → ${res.status} ${text.slice(0, 200)}`).toBeGreaterThanOrEqual(400);
          }
          if (res.status === 502) expect(JSON.parse(text), text).toMatchObject({ errorCode: "SERVER_SANDBOX_GONE" });
          else expect(res.status, `${method} ${path} → ${res.status} ${text.slice(0, 200)}`).toBeLessThan(500);
        },
      ),
      { numRuns: 1500, seed: 19, endOnFailure: true },
    );
  });
});
