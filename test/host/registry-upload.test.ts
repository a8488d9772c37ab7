// Blob uploads in pieces (the distribution spec's PATCH flow) and byte-range reads, against a
// real registry (Debian's docker-registry, distribution 2.8) behind a TCP proxy that adds 10 ms
// each way and can cut a connection mid-upload: pieces resume where the registry stands, within
// one call and, through an upload journal, in a later process.
//
// What distribution 2.8 does with a cut piece matters here: a PATCH it received only part of
// leaves the session at an offset its signed `_state` does not name, and it then refuses and
// cancels the session ("upload resumed at wrong offset"), so a client can only start over. A
// piece cut before its body reached the registry leaves the session intact, and the upload goes
// on from the registry's offset. Both are tested.
import { createHash, randomBytes } from "node:crypto";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { PushClient, DEFAULT_UPLOAD_PIECE_BYTES } from "../../src/registry/push.js";
import { fileUploadJournal, uploadJournalKey } from "../../src/registry/upload-journal.js";
import { clearTokenCache } from "../../src/registry/auth.js";
import { cleanupTemps, PASS, sha256, startProxy, startRegistry, tempDir, USER, writeDockerConfig, type Registry } from "../helpers/registry.js";
import { startWanProxy, type WanProxy } from "../helpers/wan-proxy.js";

const MiB = 1024 * 1024;
const PIECE = DEFAULT_UPLOAD_PIECE_BYTES;
const DELAY = 10;
/** Allowance for request heads, the HTTPS probe and other small traffic. */
const SLACK = 64 * 1024;
const fast = { retry: { baseMs: 10, maxDelayMs: 100 } };

let reg: Registry;
const proxies: WanProxy[] = [];
const clients: PushClient[] = [];

beforeAll(async () => {
  reg = await startRegistry("plain");
});
afterAll(async () => {
  for (const c of clients) c.close();
  for (const p of proxies) await p.close();
  await reg?.stop();
  cleanupTemps();
});

async function wan(cut?: { afterUploadBytes: number; beforeBody?: boolean }): Promise<WanProxy> {
  const p = await startWanProxy({ target: reg.host, delayMs: DELAY, ...(cut ? { cut } : {}) });
  proxies.push(p);
  return p;
}

function client(registry: string, repository: string, opts: ConstructorParameters<typeof PushClient>[1] = fast): PushClient {
  const c = new PushClient({ registry, repository }, opts);
  clients.push(c);
  return c;
}

function blob(size: number): { data: Buffer; digest: string } {
  const data = randomBytes(size);
  return { data, digest: sha256(data) };
}

/** The blob as the registry serves it (directly, not through a proxy), by its digest. */
async function registryHas(repository: string, digest: string, size: number): Promise<boolean> {
  const got = await client(reg.host, repository).getBlob(digest, size + 1, "read back");
  return got !== undefined && got.length === size && `sha256:${createHash("sha256").update(got).digest("hex")}` === digest;
}

const methods = (p: WanProxy) => p.stats.requests.map((r) => r.method);

async function until(cond: () => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error("condition not met in 10 s");
    await new Promise((r) => setTimeout(r, 2));
  }
}

describe("chunked upload", () => {
  it("uploads a 20 MiB blob in pieces through a 10 ms link: POST, 3 PATCHes, PUT", async () => {
    const { data, digest } = blob(20 * MiB);
    const proxy = await wan();
    const c = client(proxy.host, "up/pieces");
    expect(await c.blobSize(digest)).toBeUndefined(); // settles the scheme (HTTPS probe, then HTTP)
    proxy.reset();
    const t0 = performance.now();
    const r = await c.uploadBlob(digest, data);
    const ms = performance.now() - t0;
    expect(methods(proxy)).toEqual(["POST", "PATCH", "PATCH", "PATCH", "PUT"]);
    expect(proxy.stats.requests.filter((q) => q.method === "PATCH").every((q) => q.path.startsWith("/v2/up/pieces/blobs/uploads/"))).toBe(true);
    expect(r).toEqual({ requests: 5, bytesSent: data.length, resumed: 0, restarted: 0 });
    expect(proxy.stats.bytesUp).toBeGreaterThanOrEqual(data.length);
    expect(proxy.stats.bytesUp).toBeLessThan(data.length + SLACK);
    // Five round trips of 20 ms at least.
    expect(ms).toBeGreaterThanOrEqual(5 * 2 * DELAY);
    console.log(`20 MiB in pieces through the ${DELAY} ms proxy: ${ms.toFixed(0)} ms, ${r.requests} requests, ${proxy.stats.connections} connections`);
    expect(await registryHas("up/pieces", digest, data.length)).toBe(true);
    expect(await c.blobSize(digest)).toBe(data.length);
  });

  it("keeps a blob of one piece or less monolithic: POST, PUT", async () => {
    const { data, digest } = blob(PIECE);
    const proxy = await wan();
    const c = client(proxy.host, "up/whole");
    await c.blobSize(digest);
    proxy.reset();
    const r = await c.uploadBlob(digest, data);
    expect(methods(proxy)).toEqual(["POST", "PUT"]);
    expect(r).toEqual({ requests: 2, bytesSent: data.length, resumed: 0, restarted: 0 });
    expect(await registryHas("up/whole", digest, data.length)).toBe(true);
  });

  it("a connection cut mid-piece: the same call still succeeds, sending the blob at most once more", async () => {
    const { data, digest } = blob(20 * MiB);
    const cutAt = 12 * MiB;
    const proxy = await wan({ afterUploadBytes: cutAt });
    const c = client(proxy.host, "up/cut");
    const r = await c.uploadBlob(digest, data);
    expect(proxy.stats.cuts).toBe(1);
    expect(r.resumed + r.restarted).toBeGreaterThanOrEqual(1);
    expect(await registryHas("up/cut", digest, data.length)).toBe(true);
    console.log(`cut mid-piece: ${JSON.stringify(r)}, ${proxy.stats.bytesUp} bytes up, requests ${methods(proxy).join(" ")}`);
    if (r.resumed > 0 && r.restarted === 0) {
      // A registry that keeps the part of a piece it received: only the rest is sent again.
      expect(proxy.stats.bytesUp).toBeLessThan(data.length + PIECE + SLACK);
    } else {
      // distribution 2.8 drops the session (see the top of the file): one new session, from byte 0.
      expect(r.restarted).toBe(1);
      expect(methods(proxy)).toEqual(["TLS", "POST", "PATCH", "PATCH", "GET", "POST", "PATCH", "PATCH", "PATCH", "PUT"]);
      expect(proxy.stats.bytesUp).toBeLessThan(cutAt + data.length + SLACK);
    }
  });

  it("a piece cut before its body got through: asks the registry where it stands and sends only the rest", async () => {
    const { data, digest } = blob(20 * MiB);
    const proxy = await wan({ afterUploadBytes: 12 * MiB, beforeBody: true });
    const c = client(proxy.host, "up/resume");
    const r = await c.uploadBlob(digest, data);
    expect(proxy.stats.cuts).toBe(1);
    expect(r.resumed).toBe(1);
    expect(r.restarted).toBe(0);
    // POST, the first piece, the cut piece, the status GET, the second and third pieces, PUT.
    expect(methods(proxy)).toEqual(["TLS", "POST", "PATCH", "PATCH", "GET", "PATCH", "PATCH", "PUT"]);
    expect(r.requests).toBe(proxy.stats.requests.length);
    // What the client put on the wire: the blob, plus at most the piece that was cut.
    expect(proxy.stats.bytesUp).toBeLessThan(data.length + PIECE + SLACK);
    expect(r.bytesSent).toBe(data.length + PIECE);
    expect(await registryHas("up/resume", digest, data.length)).toBe(true);
  });
});

describe("other failures", () => {
  it("a 503 on a piece: asks where the session stands and sends the rest", async () => {
    const { data, digest } = blob(20 * MiB);
    let proxyHost = "";
    let patches = 0;
    // An HTTP proxy that refuses the second piece without passing it on, and keeps the upload
    // locations pointing at itself.
    const p = await startProxy(reg.host, (req, res) => {
      if (req.method === "PATCH" && ++patches === 2) {
        res.writeHead(503, { "Retry-After": "0" });
        res.end();
        return true;
      }
      return {
        headers: (h) => {
          if (typeof h.location === "string") h.location = h.location.replace(reg.host, proxyHost);
        },
      };
    });
    proxyHost = p.host;
    try {
      const r = await client(p.host, "up/503").uploadBlob(digest, data);
      expect(p.seen.map((q) => q.method)).toEqual(["POST", "PATCH", "PATCH", "GET", "PATCH", "PATCH", "PUT"]);
      expect(r).toMatchObject({ resumed: 1, restarted: 0, bytesSent: data.length + PIECE });
      expect(await registryHas("up/503", digest, data.length)).toBe(true);
    } finally {
      await p.close();
    }
  });

  it("stops when its signal aborts, leaving the journal entry for a later push", async () => {
    const { data, digest } = blob(20 * MiB);
    const dir = tempDir("sm-upload-journal-");
    const proxy = await wan();
    const c = client(proxy.host, "up/abort", { ...fast, journal: fileUploadJournal(dir) });
    const ac = new AbortController();
    const upload = c.uploadBlob(digest, data, { signal: ac.signal });
    await until(() => methods(proxy).filter((m) => m === "PATCH").length >= 2);
    ac.abort();
    await expect(upload).rejects.toMatchObject({ code: "REGISTRY_ABORTED" });
    expect(await fileUploadJournal(dir).get(uploadJournalKey(proxy.host, "up/abort", digest))).toMatch(/\/blobs\/uploads\//);
    expect(methods(proxy)).not.toContain("PUT");
  });

  it("uploads in pieces to a registry with token auth, no piece sent twice", async () => {
    const tokenReg = await startRegistry("token");
    try {
      clearTokenCache();
      const dockerConfig = writeDockerConfig({ auths: { [tokenReg.host]: { auth: Buffer.from(`${USER}:${PASS}`).toString("base64") } } });
      const { data, digest } = blob(2 * PIECE + 1);
      const c = client(tokenReg.host, "team/pieces", { ...fast, dockerConfig });
      const r = await c.uploadBlob(digest, data);
      expect(r.bytesSent).toBe(data.length);
      expect(await c.blobSize(digest)).toBe(data.length);
      expect(tokenReg.tokenRequests.some((t) => t.user === USER && t.scopes.includes("repository:team/pieces:pull,push"))).toBe(true);
    } finally {
      await tokenReg.stop();
    }
  });
});

describe("upload journal", () => {
  it("a later process resumes the session an interrupted one left, sending only what the registry lacks", async () => {
    const { data, digest } = blob(20 * MiB);
    const dir = join(tempDir("sm-upload-journal-"), "uploads");
    const proxy = await wan({ afterUploadBytes: 12 * MiB, beforeBody: true });
    const key = uploadJournalKey(proxy.host, "up/journal", digest);
    // One try: the first failure ends the call, as a killed push would.
    const first = client(proxy.host, "up/journal", { journal: fileUploadJournal(dir), retry: { tries: 1 } });
    await expect(first.uploadBlob(digest, data)).rejects.toMatchObject({ code: "REGISTRY_UNREACHABLE" });
    expect(await fileUploadJournal(dir).get(key)).toMatch(/\/v2\/up\/journal\/blobs\/uploads\//);
    first.close();

    proxy.reset();
    const second = client(proxy.host, "up/journal", { ...fast, journal: fileUploadJournal(dir) });
    const r = await second.uploadBlob(digest, data);
    expect(r.resumed).toBe(1);
    expect(r.restarted).toBe(0);
    expect(r.bytesSent).toBe(data.length - PIECE);
    expect(r.bytesSent).toBeLessThan(data.length);
    // The session's status, then the two pieces the registry lacks. (No TLS probe: this process
    // learned that the host speaks plain HTTP; another process would probe once more.)
    expect(methods(proxy)).toEqual(["GET", "PATCH", "PATCH", "PUT"]);
    expect(r.requests).toBe(proxy.stats.requests.length);
    expect(await registryHas("up/journal", digest, data.length)).toBe(true);
    // Done uploads leave nothing behind.
    expect(await fileUploadJournal(dir).get(key)).toBeUndefined();
    expect(readdirSync(dir)).toEqual([]);
  });

  it("a journaled session the registry no longer knows costs one GET, then the upload starts afresh", async () => {
    const { data, digest } = blob(PIECE + 1);
    const dir = tempDir("sm-upload-journal-");
    const proxy = await wan();
    const c = client(proxy.host, "up/stale", { ...fast, journal: fileUploadJournal(dir) });
    await c.blobSize(digest);
    const key = uploadJournalKey(proxy.host, "up/stale", digest);
    await fileUploadJournal(dir).set(key, `http://${proxy.host}/v2/up/stale/blobs/uploads/6f0b7e56-3f0a-4c5e-9d55-0d6c4f1f0a11?_state=bogus`);
    proxy.reset();
    const r = await c.uploadBlob(digest, data);
    expect(methods(proxy)).toEqual(["GET", "POST", "PATCH", "PATCH", "PUT"]);
    expect(r).toMatchObject({ resumed: 0, restarted: 0, bytesSent: data.length });
    expect(await registryHas("up/stale", digest, data.length)).toBe(true);
    expect(await fileUploadJournal(dir).get(key)).toBeUndefined();
  });

  it("a journal entry naming another host is not followed", async () => {
    const { data, digest } = blob(PIECE + 1);
    const dir = tempDir("sm-upload-journal-");
    const proxy = await wan();
    const c = client(proxy.host, "up/elsewhere", { ...fast, journal: fileUploadJournal(dir) });
    await c.blobSize(digest);
    await fileUploadJournal(dir).set(uploadJournalKey(proxy.host, "up/elsewhere", digest), `http://${reg.host}/v2/up/elsewhere/blobs/uploads/x?_state=y`);
    proxy.reset();
    await c.uploadBlob(digest, data);
    expect(methods(proxy)).toEqual(["POST", "PATCH", "PATCH", "PUT"]);
  });
});

describe("range reads", () => {
  let digest: string;
  let data: Buffer;
  beforeAll(async () => {
    ({ data, digest } = blob(3 * MiB + 123));
    await client(reg.host, "up/range").uploadBlob(digest, data);
  });

  it("returns exact slices (206)", async () => {
    const c = client(reg.host, "up/range");
    for (const [s, e] of [[0, 0], [1000, 1999], [MiB - 1, 2 * MiB], [data.length - 10, data.length - 1]] as const) {
      const got = await c.getBlobRange(digest, s, e, data.length, "a slice");
      expect(got?.start).toBe(s);
      expect(got?.bytes.equals(data.subarray(s, e + 1))).toBe(true);
    }
    // Past the end: what there is.
    const tail = await c.getBlobRange(digest, data.length - 5, data.length + 100, data.length, "the tail");
    expect(tail?.bytes.equals(data.subarray(data.length - 5))).toBe(true);
    expect(await c.getBlobRange(sha256("absent"), 0, 10, 100, "an absent blob")).toBeUndefined();
  });

  it("falls back to the whole blob, start 0, where Range is ignored", async () => {
    const strip = await startProxy(reg.host, (req) => {
      delete req.headers.range;
    });
    try {
      const got = await client(strip.host, "up/range").getBlobRange(digest, 1000, 1999, data.length, "a slice");
      expect(got?.start).toBe(0);
      expect(got?.bytes.equals(data)).toBe(true);
      await expect(client(strip.host, "up/range").getBlobRange(digest, 1000, 1999, MiB, "a slice")).rejects.toMatchObject({ code: "REGISTRY_MANIFEST_TOO_LARGE" });
    } finally {
      await strip.close();
    }
  });

  it("keeps Range across a redirect to blob storage", async () => {
    const redirect = await startProxy(reg.host, (req, res) => {
      if (req.method === "GET" && req.url?.includes("/blobs/sha256:")) {
        res.writeHead(307, { Location: `${reg.url}${req.url}` });
        res.end();
        return true;
      }
      return undefined;
    });
    try {
      const got = await client(redirect.host, "up/range").getBlobRange(digest, 5000, 5999, data.length, "a slice");
      expect(got?.start).toBe(5000);
      expect(got?.bytes.equals(data.subarray(5000, 6000))).toBe(true);
      expect(redirect.seen.filter((r) => r.path.includes("/blobs/sha256:"))).toHaveLength(1);
    } finally {
      await redirect.close();
    }
  });
});

describe("the WAN proxy", () => {
  it("delays each direction: a HEAD takes at least two delays", async () => {
    const delayMs = 25;
    const p = await startWanProxy({ target: reg.host, delayMs });
    proxies.push(p);
    const c = client(p.host, "up/pieces");
    await c.blobSize(sha256("x")); // connection and scheme settled
    const t0 = performance.now();
    await c.blobSize(sha256("y"));
    const ms = performance.now() - t0;
    expect(ms).toBeGreaterThanOrEqual(2 * delayMs);
    expect(p.stats.requests.filter((r) => r.method === "HEAD")).toHaveLength(2);
    expect(p.stats.bytesDown).toBeGreaterThan(0);
  });
});
