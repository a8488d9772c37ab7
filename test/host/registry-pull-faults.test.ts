import { readdirSync } from "node:fs";
import { createServer, type AddressInfo } from "node:net";
import http from "node:http";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BlobStore } from "../../src/store/blobs.js";
import { parseDockerRef } from "../../src/oci/docker-ref.js";
import { TARGET_PLATFORM } from "../../src/oci/oci-layout.js";
import { pullImage, resolveDigest, type PullProgress, type PullResult } from "../../src/registry/index.js";
import { randomBytes } from "node:crypto";
import { gzipSync } from "node:zlib";
import { cleanupTemps, makeLayout, sha256, corruptBlobs, fixtures, readAll, removeDir, startProxy, startRegistry, tempDir, writeDockerConfig, type Proxy, type ProxyHook, type Registry } from "../helpers/registry.js";

afterAll(() => cleanupTemps());

let reg: Registry;
let reference: PullResult;
const homes: string[] = [];
const proxies: Proxy[] = [];
const fast = { retry: { baseMs: 10, maxDelayMs: 200 } };

function newStore(): BlobStore {
  const home = tempDir("sm-registry-store-");
  homes.push(home);
  return BlobStore.open(home);
}

async function proxy(hook: ProxyHook, target = reg.host): Promise<Proxy> {
  const p = await startProxy(target, hook);
  proxies.push(p);
  return p;
}

const isBlobGet = (req: http.IncomingMessage) => req.method === "GET" && /\/blobs\/sha256:/.test(req.url ?? "");
const isLayerGet = (req: http.IncomingMessage) => isBlobGet(req) && reference.layers.some((l) => req.url!.endsWith(l.digest));

beforeAll(async () => {
  const fx = await fixtures();
  reg = await startRegistry("plain");
  await reg.push(fx.busybox.layout, fx.busybox.tag, "test/busybox", "latest");
  reference = await pullImage(parseDockerRef(`${reg.host}/test/busybox`), { store: newStore() });
});

afterAll(async () => {
  for (const p of proxies) await p.close();
  await reg?.stop();
  for (const h of homes) removeDir(h);
});

describe("retries", () => {
  it("survives 503s on the first requests and a 429 with Retry-After", async () => {
    let failures = 0;
    const p = await proxy((req, res, n) => {
      if (n < 2 || (isLayerGet(req) && failures < 3)) {
        failures++;
        if (n === 1) res.writeHead(429, { "Retry-After": "0" });
        else res.writeHead(503);
        res.end();
        return true;
      }
    });
    const res = await pullImage(parseDockerRef(`${p.host}/test/busybox`), { store: newStore(), ...fast });
    expect(res.manifestDigest).toBe(reference.manifestDigest);
    expect(failures).toBe(3);
  });

  it("downloads a layer again from scratch when the connection breaks mid-blob", async () => {
    let resets = 0;
    const p = await proxy((req) => {
      if (isLayerGet(req) && resets < 2) {
        resets++;
        return { resetAfter: 100_000 };
      }
    });
    const store = newStore();
    const res = await pullImage(parseDockerRef(`${p.host}/test/busybox`), { store, ...fast });
    expect(resets).toBe(2);
    expect(corruptBlobs(store.root, res.layers.map((l) => l.digest))).toEqual([]);
    expect(readdirSync(join(store.root, "tmp"))).toEqual([]);
  });

  it("a registry that keeps answering 503 → REGISTRY_HTTP_ERROR after the retries", async () => {
    const p = await proxy((_req, res) => {
      res.writeHead(503, { "Content-Type": "application/json" });
      res.end(JSON.stringify({ errors: [{ code: "UNAVAILABLE", message: "down for maintenance" }] }));
      return true;
    });
    const err = await pullImage(parseDockerRef(`${p.host}/test/busybox`), { store: newStore(), ...fast }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_HTTP_ERROR" });
    expect((err as Error).message).toMatch(/503 .*after 4 attempts.*down for maintenance/);
    expect(p.seen.length).toBe(4);
  });

  it("a host that accepts connections but never answers → REGISTRY_UNREACHABLE after the retries", async () => {
    const sockets: import("node:net").Socket[] = [];
    const silent = createServer((s) => void sockets.push(s));
    await new Promise<void>((r) => silent.listen(0, "127.0.0.1", r));
    const port = (silent.address() as AddressInfo).port;
    try {
      const err = await resolveDigest(parseDockerRef(`127.0.0.1:${port}/test/busybox`), { ...fast, timeoutMs: 150 }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: "REGISTRY_UNREACHABLE" });
      expect((err as Error).message).toMatch(new RegExp(`^registry unreachable: 127\\.0\\.0\\.1:${port}: .*after 4 attempts`));
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => silent.close(() => r()));
    }
  });

  it("does not retry a 4xx", async () => {
    const p = await proxy((_req, res) => {
      res.writeHead(400);
      res.end();
      return true;
    });
    const err = await resolveDigest(parseDockerRef(`${p.host}/test/busybox`), fast).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_HTTP_ERROR" });
    expect(p.seen.length).toBe(2); // HEAD, then the GET fallback; each once
  });
});

describe("concurrency", () => {
  it("downloads layers 3 at a time and reports each", async () => {
    const layers = Array.from({ length: 7 }, (_, i) => gzipSync(Buffer.concat([Buffer.from(`layer ${i}`), randomBytes(50_000)])));
    const layout = makeLayout(layers, TARGET_PLATFORM.architecture);
    await reg.push(layout, "latest", "test/many", "latest");
    removeDir(layout);
    let inFlight = 0;
    let maxInFlight = 0;
    const p = await proxy((req) => {
      if (!isBlobGet(req) || !layers.some((l) => req.url!.endsWith(sha256(l)))) return;
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      return {
        transform: (b) => b,
        delay: 50,
        onEnd: () => inFlight--,
      };
    });
    const events: PullProgress[] = [];
    const store = newStore();
    const res = await pullImage(parseDockerRef(`${p.host}/test/many`), { store, onProgress: (e) => events.push(e) });
    expect(res.layers.map((l) => l.digest)).toEqual(layers.map((l) => sha256(l)));
    expect(maxInFlight).toBe(3);
    const finals = events.filter((e) => e.type === "layer" && e.bytes === e.total);
    expect(new Set(finals.map((e) => (e.type === "layer" ? e.index : -1)))).toEqual(new Set([0, 1, 2, 3, 4, 5, 6]));
    expect(corruptBlobs(store.root, res.layers.map((l) => l.digest))).toEqual([]);
  });
});

describe("redirects and integrity", () => {
  it("follows a blob redirect to another host without sending it the Authorization header", async () => {
    // "cdn": another host that serves blobs (it forwards to the registry) and records headers.
    const cdn = await proxy(() => undefined);
    // Front: asks for Basic credentials like a private registry, redirects blob GETs to the cdn.
    const front = await proxy((req, res) => {
      if (!req.headers.authorization) {
        res.writeHead(401, { "WWW-Authenticate": 'Basic realm="test"', "Content-Type": "application/json" });
        res.end(JSON.stringify({ errors: [{ code: "UNAUTHORIZED", message: "authentication required" }] }));
        return true;
      }
      if (isBlobGet(req)) {
        res.writeHead(307, { Location: `${cdn.url}${req.url}?X-Amz-Signature=abc` });
        res.end();
        return true;
      }
    });
    const dockerConfig = writeDockerConfig({ auths: { [front.host]: { auth: Buffer.from("someone:secret").toString("base64") } } });
    const store = newStore();
    const res = await pullImage(parseDockerRef(`${front.host}/test/busybox`), { store, dockerConfig });
    expect(res.manifestDigest).toBe(reference.manifestDigest);
    expect(cdn.seen.length).toBe(1 + res.layers.length); // config + layers
    for (const r of cdn.seen) expect(r.headers.authorization).toBeUndefined();
    const authed = front.seen.filter((r) => r.headers.authorization);
    expect(authed.length).toBeGreaterThan(0);
    expect(authed[0]!.headers.authorization).toBe(`Basic ${Buffer.from("someone:secret").toString("base64")}`);
    expect(corruptBlobs(store.root, res.layers.map((l) => l.digest))).toEqual([]);
  });

  it("follows a relative redirect on the registry itself (keeping its plain-HTTP scheme)", async () => {
    const p = await proxy((req, res) => {
      if (!(req.url ?? "").includes("redirected=1")) {
        res.writeHead(307, { Location: `${req.url}?redirected=1` });
        res.end();
        return true;
      }
    });
    const res = await pullImage(parseDockerRef(`${p.host}/test/busybox`), { store: newStore() });
    expect(res.manifestDigest).toBe(reference.manifestDigest);
    expect(p.seen.filter((r) => r.path.includes("redirected=1")).length).toBe(p.seen.length / 2);
  });

  it("a corrupted layer → IMAGE_DIGEST_MISMATCH and nothing of it stored", async () => {
    const p = await proxy((req) => {
      if (isLayerGet(req)) {
        return {
          transform: (b) => {
            const c = Buffer.from(b);
            c[c.length >> 1] = c[c.length >> 1]! ^ 0xff;
            return c;
          },
        };
      }
    });
    const store = newStore();
    const err = await pullImage(parseDockerRef(`${p.host}/test/busybox`), { store, ...fast }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "IMAGE_DIGEST_MISMATCH" });
    for (const l of reference.layers) expect(await store.has(l.digest)).toBe(false);
    expect(readdirSync(join(store.root, "tmp"))).toEqual([]);
  });

  it("a manifest whose Docker-Content-Digest does not match → IMAGE_DIGEST_MISMATCH", async () => {
    const p = await proxy((req) => {
      if (/\/manifests\//.test(req.url ?? "")) return { headers: (h) => void (h["docker-content-digest"] = `sha256:${"0".repeat(64)}`) };
    });
    const err = await pullImage(parseDockerRef(`${p.host}/test/busybox`), { store: newStore() }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "IMAGE_DIGEST_MISMATCH" });
  });

  it("a manifest that does not hash to the requested digest → IMAGE_DIGEST_MISMATCH", async () => {
    const p = await proxy((req) => {
      if (/\/manifests\//.test(req.url ?? "")) return { transform: (b) => Buffer.concat([b, Buffer.from(" ")]) };
    });
    const err = await pullImage(parseDockerRef(`${p.host}/test/busybox@${reference.manifestDigest}`), { store: newStore() }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "IMAGE_DIGEST_MISMATCH" });
  });

  it("a Docker schema 1 manifest → REGISTRY_SCHEMA1_UNSUPPORTED", async () => {
    const p = await proxy((req, res) => {
      if (/\/manifests\//.test(req.url ?? "")) {
        res.writeHead(200, { "Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws" });
        res.end(JSON.stringify({ schemaVersion: 1, name: "test/busybox", tag: "latest", fsLayers: [], history: [] }));
        return true;
      }
    });
    const err = await pullImage(parseDockerRef(`${p.host}/test/busybox`), { store: newStore() }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_SCHEMA1_UNSUPPORTED" });
    expect((err as { hint?: string }).hint).toMatch(/schema 2|OCI/);
  });

  it("a manifest over 4 MiB is refused", async () => {
    const p = await proxy((req, res) => {
      if (/\/manifests\//.test(req.url ?? "")) {
        res.writeHead(200, { "Content-Type": "application/vnd.oci.image.manifest.v1+json" });
        res.end(Buffer.alloc(4 * 1024 * 1024 + 1, 0x20));
        return true;
      }
    });
    const err = await pullImage(parseDockerRef(`${p.host}/test/busybox`), { store: newStore() }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_MANIFEST_TOO_LARGE" });
  });

  it("a blob the registry does not have → REGISTRY_BLOB_UNKNOWN", async () => {
    const p = await proxy((req, res) => {
      if (isLayerGet(req)) {
        void readAll(req);
        res.writeHead(404, { "Content-Type": "application/json" });
        res.end(JSON.stringify({ errors: [{ code: "BLOB_UNKNOWN", message: "blob unknown to registry" }] }));
        return true;
      }
    });
    const err = await pullImage(parseDockerRef(`${p.host}/test/busybox`), { store: newStore() }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_BLOB_UNKNOWN" });
    expect((err as Error).message).toContain(reference.layers[0]!.digest);
  });
});
