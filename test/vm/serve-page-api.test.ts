// The routes behind the serve page, on real VMs: the image graph with keys, sizes and pools,
// why and the bake log, pools' acquire series and cycles, sandboxes' exec counts (native and
// E2B), and the event feed (each key sees its own sandboxes, a reconnect gets what it missed).
import { createServer } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { testServer, type TestServer } from "../helpers/serve.js";

let t: TestServer;
let other: string;
beforeAll(async () => {
  t = await testServer();
  other = (await t.keys.create({ name: "other" })).key;
});
afterAll(async () => t?.close());

const api = (path: string, init: RequestInit = {}, key = t.key) => fetch(`${t.server.url}${path}`, { ...init, headers: { "x-api-key": key, ...(init.body ? { "content-type": "application/json" } : {}), ...init.headers } });

/** Reads the event stream for `ms` and returns the events' data, each with its SSE id. */
async function events(key: string, ms: number, lastId?: string): Promise<{ id: number; sseId: string; kind: string; type: string; [k: string]: unknown }[]> {
  const ctl = new AbortController();
  const res = await fetch(`${t.server.url}/v1/events`, { headers: { "x-api-key": key, ...(lastId ? { "last-event-id": lastId } : {}) }, signal: ctl.signal });
  expect(res.status).toBe(200);
  expect(res.headers.get("content-type")).toContain("text/event-stream");
  let text = "";
  const timer = setTimeout(() => ctl.abort(), ms);
  try {
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) text += Buffer.from(chunk).toString("utf8");
  } catch {
    // aborted
  }
  clearTimeout(timer);
  return text.split("\n\n").flatMap((block) => {
    const lines = block.split("\n");
    const data = lines.find((l) => l.startsWith("data: "));
    const id = lines.find((l) => l.startsWith("id: "));
    return data && id ? [{ ...JSON.parse(data.slice(6)), sseId: id.slice(4) }] : [];
  });
}

describe("the page's routes", () => {
  it("list the project's images with key, cached, size and pools, their why and bake log", async () => {
    const list = (await (await api("/v1/images")).json()) as { project: { config: string }; images: { name: string; key: string; cached: boolean; sizeBytes: number; pools: string[]; build: { status: string } }[] };
    expect(list.project.config).toBe(`${t.dir}/supermachine.config.ts`);
    expect(list.images).toHaveLength(1);
    expect(list.images[0]).toMatchObject({ name: "box", cached: true, pools: ["base", "nobody"], key: expect.stringMatching(/^[0-9a-f]{64}$/) });
    expect(list.images[0]!.sizeBytes).toBeGreaterThan(0);
    expect(["baked", "cached"]).toContain(list.images[0]!.build.status);

    const why = (await (await api("/v1/images/box/why")).json()) as { cached: boolean; changes: unknown[]; lastRebake: unknown };
    expect(why).toMatchObject({ cached: true, changes: [], lastRebake: null });
    const log = await api("/v1/images/box/log");
    expect(log.headers.get("content-type")).toContain("text/plain");
    expect(await log.text()).toContain(`key ${list.images[0]!.key}`);
    const missing = await api("/v1/images/nope/why");
    expect(missing.status).toBe(404);
    expect(await missing.json()).toMatchObject({ errorCode: "SERVER_NOT_FOUND", message: expect.stringContaining('"box"') });
  });

  it("count a sandbox's processes from the native API and the E2B SDK, and report pools' acquires and cycles", async () => {
    const created = (await (await api("/v1/sandboxes", { method: "POST", body: JSON.stringify({ pool: "base" }) })).json()) as { id: string; execs: number; state: string; egressBytes: number };
    expect(created).toMatchObject({ execs: 0, state: "running", egressBytes: 0 });
    for (let i = 0; i < 2; i++) await api(`/v1/sandboxes/${created.id}/exec`, { method: "POST", body: JSON.stringify({ argv: ["true"] }) });
    const { Sandbox } = await import("e2b");
    const e2b = await Sandbox.connect(created.id, { apiKey: t.key, apiUrl: t.server.url, sandboxUrl: t.server.url } as never);
    await e2b.commands.run("true");
    expect(((await (await api(`/v1/sandboxes/${created.id}`)).json()) as { execs: number }).execs).toBe(3);
    expect((await api(`/v1/sandboxes/${created.id}`, { method: "DELETE" })).status).toBe(204);

    const pools = (await (await api("/v1/pools")).json()) as { pools: { name: string; image: string; acquire: { bucketSeconds: number; buckets: { count: number; p50Ms: number; p99Ms: number }[] }; cyclesPerSecond: number }[] };
    const base = pools.pools.find((p) => p.name === "base")!;
    expect(base.image).toBe("box");
    expect(base.acquire.bucketSeconds).toBe(10);
    expect(base.acquire.buckets.reduce((n, b) => n + b.count, 0)).toBeGreaterThanOrEqual(1);
    const last = base.acquire.buckets.filter((b) => b.count > 0).at(-1)!;
    expect(last.p99Ms).toBeGreaterThanOrEqual(last.p50Ms);
    expect(base.cyclesPerSecond).toBeGreaterThan(0);
  });

  it("feed each key its own sandboxes' events, everyone the bakes, and a reconnect what it missed", async () => {
    const mine = (await (await api("/v1/sandboxes", { method: "POST", body: JSON.stringify({ pool: "base" }) })).json()) as { id: string };
    expect((await api(`/v1/sandboxes/${mine.id}`, { method: "DELETE" })).status).toBe(204);

    const seen = await events(t.key, 500);
    expect(seen.filter((e) => e.kind === "bake" && e.image === "box").map((e) => e.type)).toEqual(expect.arrayContaining(["start", "done"]));
    const own = seen.filter((e) => e.kind === "sandbox" && e.sandbox === mine.id);
    expect(own.map((e) => e.type)).toEqual(["created", "killed"]);
    expect(own[0]).toMatchObject({ pool: "base", at: expect.any(String) });

    const theirs = await events(other, 500);
    expect(theirs.some((e) => e.kind === "sandbox" && e.sandbox === mine.id)).toBe(false);
    expect(theirs.some((e) => e.kind === "bake")).toBe(true);

    // After the created event, only the kill is replayed.
    // An id of another feed (the server restarted since): everything kept.
    expect((await events(t.key, 300, "0badfeed.999999")).length).toBe(seen.length);
    const again = await events(t.key, 500, own[0]!.sseId);
    expect(again.filter((e) => e.kind === "sandbox" && e.sandbox === mine.id).map((e) => e.type)).toEqual(["killed"]);
    expect((await fetch(`${t.server.url}/v1/events`)).status).toBe(401);
  });

  it("serve the page without a key, with a strict Content-Security-Policy", async () => {
    const res = await fetch(`${t.server.url}/`);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/html");
    expect(res.headers.get("content-security-policy")).toMatch(/default-src 'self'.*script-src 'self'/);
    const html = await res.text();
    for (const asset of ["/ui/app.js", "/ui/app.css"]) {
      expect(html).toContain(asset);
      const a = await fetch(`${t.server.url}${asset}`);
      expect(a.status, asset).toBe(200);
    }
    // Only the built page: no way out of its directory.
    for (const path of ["/ui/%2e%2e/package.json", "/ui/..%2fpackage.json", "/ui/%2e%2e%2f%2e%2e%2fpackage.json"]) {
      const res = await fetch(`${t.server.url}${path}`);
      expect(res.status, path).toBeGreaterThanOrEqual(400);
      expect(await res.text(), path).not.toContain('"name": "supermachine"');
    }
  });
});

describe("the graph's listing", () => {
  it("never pulls: an image no pool needs, whose root is not here, is listed without a key and its registry is never asked", async () => {
    let connections = 0;
    const registry = createServer((socket) => {
      connections++;
      socket.destroy();
    });
    await new Promise<void>((resolve) => registry.listen(0, "127.0.0.1", resolve));
    const port = (registry.address() as { port: number }).port;
    const s = await testServer(
      {},
      `import { defineConfig, defineImage } from "supermachine/config";
export default defineConfig({
  images: { box: defineImage({ ref: "builtin:busybox" }), remote: defineImage({ ref: "127.0.0.1:${port}/never/pulled:1" }) },
  pools: { base: { image: "box", min: 1, max: 2 } },
});
`,
    );
    try {
      const res = await fetch(`${s.server.url}/v1/images`, { headers: { "x-api-key": s.key } });
      const list = (await res.json()) as { images: { name: string; key: string | null; cached: boolean }[] };
      expect(list.images.find((i) => i.name === "box")).toMatchObject({ cached: true, key: expect.stringMatching(/^[0-9a-f]{64}$/) });
      expect(list.images.find((i) => i.name === "remote")).toMatchObject({ cached: false, key: null });
      const why = await fetch(`${s.server.url}/v1/images/remote/why`, { headers: { "x-api-key": s.key } });
      expect(why.status).toBe(409);
      expect(await why.json()).toMatchObject({ errorCode: "SERVER_CONFLICT", message: expect.stringContaining("cannot be keyed"), hint: expect.stringContaining("supermachine build") });
      expect(connections).toBe(0);
    } finally {
      await s.close();
      registry.close();
    }
  });
});
