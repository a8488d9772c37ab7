/**
 * Throwaway Docker registries (Debian's docker-registry, distribution 2.8) on 127.0.0.1 for the
 * registry client tests, in three flavours:
 *
 *   plain  — HTTP, no auth
 *   tls    — HTTPS with a CA made here, htpasswd (bcrypt) Basic auth for user:pass
 *   token  — HTTP, token auth: a small token server here issues RS256 JWTs whose `x5c` header
 *            carries the signing certificate, which is the registry's `rootcertbundle`
 *
 * plus a programmable HTTP proxy for fault injection, and `push()` through skopeo.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { createHash, createPrivateKey, randomBytes, sign, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import http, { type IncomingMessage, type ServerResponse } from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { BlobStore } from "../../src/store/blobs.js";

const execFileP = promisify(execFile);

export const USER = "user";
export const PASS = "pass";
export const REFRESH_TOKEN = "refresh-secret";
const SERVICE = "supermachine-test-registry";
const ISSUER = "supermachine-test-issuer";

/** Everything started here, killed and removed when the process exits even if a test forgot. */
const cleanups = new Set<() => void>();
process.once("exit", () => {
  for (const c of cleanups) {
    try {
      c();
    } catch {
      // best effort
    }
  }
});

export async function freePort(): Promise<number> {
  return (await registryConfig()).freePort();
}

const temps = new Set<string>();
cleanups.add(() => cleanupTemps());

/** A new temp dir, removed by `cleanupTemps()` (call it in afterAll) or at exit. */
export function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  temps.add(dir);
  return dir;
}

/** Removes every temp dir `tempDir` made in this process. */
export function cleanupTemps(): void {
  for (const d of temps) rmSync(d, { recursive: true, force: true });
  temps.clear();
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

export interface TokenRequest {
  method: string;
  user: string | undefined;
  scopes: string[];
  grantType?: string;
}

export interface Registry {
  kind: "plain" | "tls" | "token";
  /** `127.0.0.1:PORT` */
  host: string;
  port: number;
  /** Base URL of the registry API (`http(s)://127.0.0.1:PORT`). */
  url: string;
  dir: string;
  /** CA that signed the TLS certificate (tls flavour). */
  caPem?: string;
  caFile?: string;
  /** Token server requests seen (token flavour). */
  tokenRequests: TokenRequest[];
  /** Pushes `oci:<layout>:<tag>` to `<repo>:<destTag>` (with `--all` when `all`). */
  push(layout: string, tag: string, repo: string, destTag?: string, all?: boolean): Promise<void>;
  stop(): Promise<void>;
}

// openssl and htpasswd run asynchronously: key generation and bcrypt are slow enough on a loaded
// machine to stall the test worker (see test/helpers/run.ts).
async function openssl(args: string[], cwd: string): Promise<void> {
  await execFileP("openssl", args, { cwd });
}

async function makeTlsFiles(dir: string): Promise<{ caFile: string; cert: string; key: string }> {
  await openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=supermachine test CA", "-keyout", "ca.key", "-out", "ca.pem"], dir);
  await openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"], dir);
  writeFileSync(join(dir, "ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n");
  await openssl(["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem"], dir);
  return { caFile: join(dir, "ca.pem"), cert: join(dir, "server.pem"), key: join(dir, "server.key") };
}

const b64url = (b: Buffer | string) => Buffer.from(b).toString("base64url");

/** Token server: anonymous → pull only (not for `private/*`), user:pass or the refresh token → pull+push. */
async function startTokenServer(dir: string, requests: TokenRequest[]): Promise<{ url: string; certFile: string; close: () => Promise<void> }> {
  await openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=supermachine test token signer", "-keyout", "token.key", "-out", "token.pem"], dir);
  const key = createPrivateKey(readFileSync(join(dir, "token.key")));
  const cert = new X509Certificate(readFileSync(join(dir, "token.pem")));
  const x5c = cert.raw.toString("base64"); // standard base64 DER, as distribution expects

  const issue = (user: string | undefined, scopes: string[]) => {
    const access = scopes.flatMap((s) => {
      const [type, name, actions] = s.split(":");
      if (type !== "repository" || !name || !actions) return [];
      const granted = actions.split(",").filter((a) => (user ? a === "pull" || a === "push" || a === "*" : a === "pull" && !name.startsWith("private/")));
      return [{ type, name, actions: granted }];
    });
    const now = Math.floor(Date.now() / 1000);
    const header = { typ: "JWT", alg: "RS256", x5c: [x5c] };
    const claims = { iss: ISSUER, sub: user ?? "", aud: SERVICE, exp: now + 300, nbf: now - 10, iat: now, jti: randomBytes(8).toString("hex"), access };
    const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    return `${input}.${b64url(sign("sha256", Buffer.from(input), key))}`;
  };

  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url ?? "/", "http://x");
    const body = await readAll(req);
    const send = (status: number, json: unknown) => {
      res.writeHead(status, { "Content-Type": "application/json" });
      res.end(JSON.stringify(json));
    };
    if (url.pathname !== "/token") return send(404, { error: "not found" });
    if (req.method === "POST") {
      const form = new URLSearchParams(body.toString("utf8"));
      const scopes = (form.get("scope") ?? "").split(" ").filter(Boolean);
      requests.push({ method: "POST", user: undefined, scopes, grantType: form.get("grant_type") ?? "" });
      if (form.get("grant_type") !== "refresh_token" || form.get("refresh_token") !== REFRESH_TOKEN) return send(401, { error: "invalid_grant" });
      return send(200, { access_token: issue(USER, scopes), expires_in: 300, scope: scopes.join(" ") });
    }
    const scopes = url.searchParams.getAll("scope").flatMap((s) => s.split(" ")).filter(Boolean);
    let user: string | undefined;
    const auth = req.headers.authorization;
    if (auth?.startsWith("Basic ")) {
      const [u, p] = Buffer.from(auth.slice(6), "base64").toString("utf8").split(":");
      if (u !== USER || (p !== PASS && p !== REFRESH_TOKEN)) {
        requests.push({ method: "GET", user: u, scopes });
        return send(401, { errors: [{ code: "UNAUTHORIZED", message: "bad credentials" }] });
      }
      user = u;
    }
    requests.push({ method: "GET", user, scopes });
    // Both names, as Docker Hub does; expires_in so that clients can cache.
    const token = issue(user, scopes);
    send(200, { token, access_token: token, expires_in: 300, issued_at: new Date().toISOString() });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}/token`,
    certFile: join(dir, "token.pem"),
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

export async function readAll(req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of req) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

async function waitReady(url: string, child: ChildProcess, stderr: () => string, caPem?: string): Promise<void> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`docker-registry exited with ${child.exitCode}: ${stderr()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const mod = url.startsWith("https:") ? https : http;
      const req = mod.get(`${url}/v2/`, caPem ? { ca: caPem } : {}, (res) => {
        res.resume();
        resolve(true);
      });
      req.on("error", () => resolve(false));
      req.setTimeout(1000, () => req.destroy());
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`docker-registry did not answer at ${url}/v2/: ${stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

interface RegistryConfigOptions {
  dir: string;
  port: number;
  tls?: { cert: string; key: string };
  htpasswd?: string;
  token?: { realm: string; service: string; issuer: string; rootcertbundle: string };
}

/** The registry config writer shared with the fixture builder (plain JavaScript). */
interface RegistryConfigModule {
  writeRegistryConfig(o: RegistryConfigOptions): string;
  freePort(): Promise<number>;
}
async function registryConfig(): Promise<RegistryConfigModule> {
  // @ts-ignore -- plain JavaScript module without types
  return (await import("../fixtures/registry-config.mjs")) as RegistryConfigModule;
}

/** A blob store in a fresh temporary home, removed with the other temp dirs of the file. */
export function tempStore(homes: string[]): BlobStore {
  const home = tempDir("sm-registry-store-");
  homes.push(home);
  return BlobStore.open(home);
}

/** Starts a registry of the given flavour; `stop()` kills it and removes its directory. */
export async function startRegistry(kind: "plain" | "tls" | "token"): Promise<Registry> {
  const { writeRegistryConfig } = await registryConfig();
  const dir = tempDir(`sm-registry-${kind}-`);
  const port = await freePort();
  const host = `127.0.0.1:${port}`;
  const tokenRequests: TokenRequest[] = [];
  let caPem: string | undefined;
  let caFile: string | undefined;
  let tokenServer: Awaited<ReturnType<typeof startTokenServer>> | undefined;
  const options: RegistryConfigOptions = { dir, port };
  if (kind === "tls") {
    const tls = await makeTlsFiles(dir);
    caFile = tls.caFile;
    caPem = readFileSync(tls.caFile, "utf8");
    writeFileSync(join(dir, "htpasswd"), (await execFileP("htpasswd", ["-Bbn", USER, PASS], { encoding: "utf8" })).stdout);
    options.tls = { cert: tls.cert, key: tls.key };
    options.htpasswd = join(dir, "htpasswd");
  }
  if (kind === "token") {
    tokenServer = await startTokenServer(dir, tokenRequests);
    options.token = { realm: tokenServer.url, service: SERVICE, issuer: ISSUER, rootcertbundle: tokenServer.certFile };
  }
  const config = writeRegistryConfig(options);

  const child = spawn("/usr/bin/docker-registry", ["serve", config], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => {
    err = (err + d).slice(-4000);
  });
  const kill = () => {
    if (child.exitCode === null) child.kill("SIGKILL");
  };
  cleanups.add(kill);
  const url = `${kind === "tls" ? "https" : "http"}://${host}`;
  try {
    await waitReady(url, child, () => err, caPem);
  } catch (e) {
    kill();
    removeDir(dir);
    throw e;
  }

  const registry: Registry = {
    kind,
    host,
    port,
    url,
    dir,
    tokenRequests,
    async push(layout, tag, repo, destTag = tag, all = false) {
      const args = ["copy", "--quiet", "--dest-tls-verify=false"];
      if (kind !== "plain") args.push("--dest-creds", `${USER}:${PASS}`);
      if (all) args.push("--all");
      args.push(`oci:${layout}:${tag}`, `docker://${host}/${repo}:${destTag}`);
      const authDir = tempDir("sm-skopeo-");
      try {
        await execFileP("skopeo", args, { env: { ...process.env, REGISTRY_AUTH_FILE: join(authDir, "auth.json") } });
      } finally {
        removeDir(authDir);
      }
    },
    async stop() {
      // Idempotent: a child killed by a signal has exitCode null but signalCode set.
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise<void>((r) => child.once("exit", () => r()));
        child.kill("SIGTERM");
        const t = setTimeout(() => child.kill("SIGKILL"), 3000);
        await exited;
        clearTimeout(t);
      }
      cleanups.delete(kill);
      await tokenServer?.close();
      removeDir(dir);
    },
  };
  if (caFile !== undefined) registry.caFile = caFile;
  if (caPem !== undefined) registry.caPem = caPem;
  return registry;
}

// ---------------------------------------------------------------------------------------------
// Fault-injecting proxy

export interface ProxyRequest {
  method: string;
  path: string;
  headers: http.IncomingHttpHeaders;
}

/**
 * A hook may answer the request itself (return true) or let it through to the target, where
 * `transform` (if returned) rewrites the response body and `onHeaders` the status/headers.
 */
export type ProxyHook = (
  req: IncomingMessage,
  res: ServerResponse,
  n: number,
) => boolean | {
      transform?: (body: Buffer) => Buffer;
      resetAfter?: number;
      headers?: (h: http.OutgoingHttpHeaders) => void;
      /** Milliseconds to wait before answering. */
      delay?: number;
      /** Called when the answer has been sent. */
      onEnd?: () => void;
    }
  | undefined
  | void;

export interface Proxy {
  host: string;
  port: number;
  url: string;
  seen: ProxyRequest[];
  close(): Promise<void>;
}

/** An HTTP proxy to `target` (`127.0.0.1:PORT`, plain HTTP); `hook` sees each request first. */
export async function startProxy(target: string, hook: ProxyHook = () => undefined): Promise<Proxy> {
  const seen: ProxyRequest[] = [];
  const [thost, tport] = target.split(":");
  const server = http.createServer(async (req, res) => {
    const n = seen.length;
    seen.push({ method: req.method ?? "", path: req.url ?? "", headers: req.headers });
    const h = hook(req, res, n);
    if (h === true) return;
    const action = typeof h === "object" && h ? h : {};
    const body = await readAll(req);
    if (action.delay) await new Promise((r) => setTimeout(r, action.delay));
    if (action.onEnd) res.once("close", action.onEnd);
    const headers = { ...req.headers, host: target };
    delete headers.authorization; // the registry behind the proxy needs none
    const up = http.request({ host: thost, port: Number(tport), method: req.method, path: req.url, headers }, async (ures) => {
      const outHeaders: http.OutgoingHttpHeaders = { ...ures.headers };
      action.headers?.(outHeaders);
      if (action.transform) {
        const data = action.transform(await readAll(ures));
        outHeaders["content-length"] = String(data.length);
        res.writeHead(ures.statusCode ?? 502, outHeaders);
        res.end(data);
      } else if (action.resetAfter !== undefined) {
        const data = await readAll(ures);
        res.writeHead(ures.statusCode ?? 502, outHeaders);
        res.write(data.subarray(0, action.resetAfter), () => setTimeout(() => res.socket?.destroy(), 20));
      } else {
        res.writeHead(ures.statusCode ?? 502, outHeaders);
        ures.pipe(res);
      }
    });
    up.on("error", (e) => {
      res.writeHead(502);
      res.end(String(e));
    });
    up.end(body);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as AddressInfo).port;
  const close = () =>
    new Promise<void>((r) => {
      server.closeAllConnections();
      server.close(() => r());
    });
  return { host: `127.0.0.1:${port}`, port, url: `http://127.0.0.1:${port}`, seen, close };
}

export const sha256 = (b: Buffer | string) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

/** Writes a docker config.json into a new temp dir; returns its path. */
export function writeDockerConfig(content: unknown): string {
  const dir = tempDir("sm-docker-config-");
  const file = join(dir, "config.json");
  writeFileSync(file, JSON.stringify(content));
  return file;
}

/** Writes `docker-credential-<name>` (a shell script printing `json`, logging stdin to `<dir>/requests`) into a temp dir. */
export function writeCredentialHelper(name: string, json: unknown): { dir: string; log: string } {
  const dir = tempDir("sm-cred-helper-");
  const log = join(dir, "requests");
  const script = `#!/bin/sh\n[ "$1" = get ] || exit 2\nread -r server\necho "$server" >> ${JSON.stringify(log)}\ncat <<'EOF'\n${JSON.stringify(json)}\nEOF\n`;
  writeFileSync(join(dir, `docker-credential-${name}`), script, { mode: 0o755 });
  return { dir, log };
}

// ---------------------------------------------------------------------------------------------
// Fixtures and store helpers

export interface Fixtures {
  busybox: { layout: string; tag: string };
  multiarch: { layout: string; tag: string; platforms: string[]; native: string; foreign: string };
}

/** The busybox and multi-arch OCI layouts of test/fixtures/build-fixtures.mjs (built offline, cached). */
export async function fixtures(): Promise<Fixtures> {
  // @ts-ignore -- plain JavaScript module without types
  const { ensureFixtures } = (await import("../fixtures/build-fixtures.mjs")) as {
    ensureFixtures(o: { only: string[]; log: (l: string) => void }): Promise<Fixtures>;
  };
  return ensureFixtures({ only: ["busybox", "multiarch"], log: () => {} });
}

/** Re-hashes blobs in a store directory; returns the digests whose content does not match. */
export function corruptBlobs(storeRoot: string, digests: string[]): string[] {
  return digests.filter((d) => sha256(readFileSync(join(storeRoot, "blobs", "sha256", d.slice(7)))) !== d);
}

/** Writes a single-image OCI layout (tag `latest`) with the given layer blobs (gzip data) for linux/<host arch>. */
export function makeLayout(layers: Buffer[], architecture: string): string {
  const dir = tempDir("sm-layout-");
  const blobs = join(dir, "blobs", "sha256");
  mkdirSync(blobs, { recursive: true });
  const put = (data: Buffer | string) => {
    const d = sha256(data);
    writeFileSync(join(blobs, d.slice(7)), data);
    return { digest: d, size: Buffer.byteLength(data) };
  };
  const config = put(JSON.stringify({ architecture, os: "linux", config: {}, rootfs: { type: "layers", diff_ids: layers.map(() => sha256("x")) } }));
  const manifest = put(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: { mediaType: "application/vnd.oci.image.config.v1+json", ...config },
      layers: layers.map((l) => ({ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", ...put(l) })),
    }),
  );
  writeFileSync(join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(
    join(dir, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ mediaType: "application/vnd.oci.image.manifest.v1+json", ...manifest, annotations: { "org.opencontainers.image.ref.name": "latest" } }],
    }),
  );
  return dir;
}
