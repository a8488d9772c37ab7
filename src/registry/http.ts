/**
 * HTTP transport for registry requests: picks HTTPS or plain HTTP per registry, adds extra CA
 * certificates, follows redirects (dropping `Authorization` when the target is another host),
 * and retries what is worth retrying (5xx, 429, connection resets and timeouts) with
 * exponential backoff and jitter. 4xx answers other than 429 are returned to the caller as is.
 * A request that is not safe to resend (an upload piece the registry may have half received)
 * is sent once (`noRetry`) and its caller decides what to do next.
 */
import { readFileSync } from "node:fs";
import http, { type IncomingHttpHeaders, type IncomingMessage } from "node:http";
import https from "node:https";
import { createHash } from "node:crypto";
import { createSecureContext, rootCertificates, type SecureContext } from "node:tls";
import { logger } from "../debug.js";
import { RegistryError } from "./errors.js";

const log = logger("registry");

export interface RetryPolicy {
  /** Attempts in all, including the first (default 4). */
  tries: number;
  /** First backoff delay; doubles each attempt, ±50% jitter (default 200 ms). */
  baseMs: number;
  /** Cap for a backoff delay and for a server's Retry-After (default 10 s). */
  maxDelayMs: number;
}

export interface TransportOptions {
  /** Registries (host[:port]) to reach over plain HTTP or HTTPS without certificate checks. */
  insecureRegistries?: string[];
  /** Extra CA certificates (PEM) trusted for registry TLS, in addition to the system ones. */
  ca?: string | Buffer | (string | Buffer)[];
  /** Environment to read SUPERMACHINE_* settings, DOCKER_CONFIG, HOME and PATH from (default process.env). */
  env?: NodeJS.ProcessEnv;
  retry?: Partial<RetryPolicy>;
  /** Socket idle timeout, connect included (default 30 s). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface HttpRequest {
  method: "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE";
  url: URL;
  headers?: Record<string, string>;
  body?: Buffer;
  /**
   * Send once: no retry on a network error, a 5xx or a 429 (the response or the error goes to
   * the caller). For requests whose effect is unknown after a failure, such as an upload piece.
   */
  noRetry?: boolean;
  /** Cancels this request (besides the transport's own signal). */
  signal?: AbortSignal;
  /** Counts every attempt and redirect hop of this request, as `Transport.requests` does for all. */
  count?: { requests: number };
}

export interface HttpResponse {
  status: number;
  statusText: string;
  headers: IncomingHttpHeaders;
  /** The response body; the caller must consume or `destroy()` it. */
  body: IncomingMessage;
  /** Final URL, after redirects. */
  url: URL;
  /** How many attempts it took. */
  attempts: number;
  header(name: string): string | undefined;
}

type Scheme = "https" | "http" | "https-insecure";

/** What one wire request carries besides method, URL, headers and body. */
interface RawExtra {
  signal: AbortSignal | undefined;
  count: { requests: number } | undefined;
}

const DEFAULT_RETRY: RetryPolicy = { tries: 4, baseMs: 200, maxDelayMs: 10_000 };
const MAX_REDIRECTS = 10;
const RETRYABLE_NET = new Set(["ECONNRESET", "ETIMEDOUT", "EPIPE", "ECONNABORTED", "EAI_AGAIN", "ESOCKETTIMEDOUT", "UND_ERR_SOCKET"]);
const CERT_ERRORS = /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|UNABLE_TO_GET_ISSUER|ALTNAME|HOSTNAME_MISMATCH/;

/** Whether the host part of `host[:port]` is a loopback address. */
export function isLoopback(host: string): boolean {
  const name = hostnameOf(host);
  return name === "localhost" || name === "::1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(name);
}

function hasPort(host: string): boolean {
  return host.startsWith("[") ? /\]:\d+$/.test(host) : /^[^:]+:\d+$/.test(host);
}

/** `host` of `host:port`, `[v6]:port` → `v6`. */
export function hostnameOf(host: string): string {
  if (host.startsWith("[")) return host.slice(1, host.indexOf("]"));
  const colon = host.lastIndexOf(":");
  return colon >= 0 && host.indexOf(":") === colon ? host.slice(0, colon) : host;
}

export function insecureRegistriesFrom(opts: TransportOptions): string[] {
  const env = opts.env ?? process.env;
  const fromEnv = (env.SUPERMACHINE_INSECURE_REGISTRIES ?? "").split(",").map((s) => s.trim()).filter(Boolean);
  return [...(opts.insecureRegistries ?? []), ...fromEnv].map((s) => s.replace(/^[a-z]+:\/\//, "").replace(/\/.*$/, "").toLowerCase());
}

export class Transport {
  private readonly retry: RetryPolicy;
  /** Requests sent so far (every attempt and redirect hop), for transfer reports. */
  requests = 0;
  /** Hosts whose scheme is being found out, and when that ends. */
  private readonly probes = new Map<string, Promise<void>>();
  private readonly timeoutMs: number;
  private readonly insecure: string[];
  private readonly schemes = new Map<string, Scheme>();
  private readonly httpAgent: http.Agent;
  private readonly httpsAgent: https.Agent;
  private readonly httpsInsecureAgent: https.Agent;
  readonly signal: AbortSignal | undefined;

  constructor(opts: TransportOptions = {}) {
    this.retry = { ...DEFAULT_RETRY, ...opts.retry };
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.insecure = insecureRegistriesFrom(opts);
    this.signal = opts.signal;
    const ca = extraCAs(opts);
    this.httpAgent = new http.Agent({ keepAlive: true });
    const secureContext = secureContextFor(ca);
    this.httpsAgent = new https.Agent({ keepAlive: true, secureContext });
    this.httpsInsecureAgent = new https.Agent({ keepAlive: true, rejectUnauthorized: false, secureContext });
  }

  /** Releases pooled connections. */
  close(): void {
    this.httpAgent.destroy();
    this.httpsAgent.destroy();
    this.httpsInsecureAgent.destroy();
  }

  isInsecure(host: string): boolean {
    const h = host.toLowerCase();
    return this.insecure.some((e) => (hasPort(e) ? e === h : hostnameOf(e) === hostnameOf(h)));
  }

  /** URL of `path` on registry `host`; the scheme may change on the first request (see `send`). */
  registryUrl(host: string, path: string): URL {
    const scheme = this.schemes.get(host) ?? "https";
    return new URL(`${scheme === "http" ? "http" : "https"}://${host}${path}`);
  }

  /**
   * Sends a request, following redirects and retrying transient failures. Returns the last
   * response even when it is a 5xx or 429 after the retries (the caller turns it into an error).
   * `registryHost` marks a request to the registry API itself: for loopback and insecure
   * registries the first one decides between HTTPS and plain HTTP.
   */
  async send(req: HttpRequest, registryHost?: string): Promise<HttpResponse> {
    let lastErr: unknown;
    const tries = req.noRetry ? 1 : this.retry.tries;
    const signal = this.signalFor(req.signal);
    for (let attempt = 1; attempt <= tries; attempt++) {
      this.throwIfAborted(signal);
      let res: HttpResponse;
      try {
        res = await this.sendFollowing(req, registryHost, signal);
      } catch (err) {
        if (signal?.aborted) throw aborted(signal, err);
        if (err instanceof RegistryError) throw err;
        lastErr = err;
        const code = errCode(err);
        if (!RETRYABLE_NET.has(code) || attempt === tries) break;
        log("%s %s: %s, retrying (attempt %d)", req.method, req.url.href, code, attempt);
        await this.sleep(this.backoff(attempt), signal);
        continue;
      }
      res.attempts = attempt;
      if ((res.status >= 500 || res.status === 429) && attempt < tries) {
        const retryAfter = parseRetryAfter(res.header("retry-after"));
        res.body.destroy();
        log("%s %s: %d, retrying (attempt %d)", req.method, res.url.href, res.status, attempt);
        await this.sleep(Math.min(retryAfter ?? this.backoff(attempt), this.retry.maxDelayMs), signal);
        continue;
      }
      return res;
    }
    throw networkError(lastErr, (lastErr as { host?: string })?.host ?? req.url.host, tries > 1 ? tries : undefined);
  }

  /** The transport's signal and a request's own, combined. */
  private signalFor(own: AbortSignal | undefined): AbortSignal | undefined {
    if (!own) return this.signal;
    return this.signal ? AbortSignal.any([this.signal, own]) : own;
  }

  private async sendFollowing(req: HttpRequest, registryHost: string | undefined, signal: AbortSignal | undefined): Promise<HttpResponse> {
    let url = req.url;
    let method = req.method;
    let body = req.body;
    const headers = { ...req.headers };
    const origin = url.host;
    for (let hop = 0; hop <= MAX_REDIRECTS; hop++) {
      const res = await this.sendOnce(method, url, headers, body, { signal, count: req.count }, hop === 0 ? registryHost : undefined);
      const location = res.headers.location;
      if (![301, 302, 303, 307, 308].includes(res.status) || !location) return res;
      res.body.destroy();
      // Relative to the URL actually requested (its scheme may have been settled just now).
      const next = new URL(location, res.url);
      log("%s %s redirected (%d) to %s", method, res.url.href, res.status, next.origin);
      if (next.host !== origin || (res.url.protocol === "https:" && next.protocol === "http:")) {
        delete headers.Authorization;
        delete headers.authorization;
      }
      if (res.status === 303 || ((res.status === 301 || res.status === 302) && method === "POST")) {
        method = "GET";
        body = undefined;
      }
      url = next;
    }
    throw new RegistryError("REGISTRY_TOO_MANY_REDIRECTS", `${req.method} ${req.url.href}: more than ${MAX_REDIRECTS} redirects`);
  }

  /** One request; for a registry host of unknown scheme, HTTPS first then plain HTTP when allowed. */
  private async sendOnce(method: string, url: URL, headers: Record<string, string>, body: Buffer | undefined, extra: RawExtra, registryHost?: string): Promise<HttpResponse> {
    const known = registryHost !== undefined && !this.schemes.has(registryHost) ? learnedSchemes.get(registryHost) : undefined;
    if (known && Date.now() - known.at < LEARNED_TTL_MS && (isLoopback(registryHost!) || this.isInsecure(registryHost!))) {
      // What an earlier transport of this process found: used without a probe, and forgotten
      // (then probed again) if the host no longer answers in that scheme.
      try {
        const res = await this.raw(method, withScheme(url, known.scheme), headers, body, known.scheme, extra);
        this.schemes.set(registryHost!, known.scheme);
        return res;
      } catch (err) {
        if (extra.signal?.aborted) throw err;
        learnedSchemes.delete(registryHost!);
        log("%s no longer answers %s (%s): probing again", registryHost, known.scheme, errCode(err));
      }
    }
    if (registryHost === undefined || this.schemes.has(registryHost)) {
      const scheme = registryHost !== undefined ? this.schemes.get(registryHost)! : url.protocol === "http:" ? "http" : "https";
      return this.raw(method, withScheme(url, scheme), headers, body, scheme, extra);
    }
    const mayDowngrade = isLoopback(registryHost) || this.isInsecure(registryHost);
    if (!mayDowngrade) {
      this.schemes.set(registryHost, "https");
      return this.raw(method, withScheme(url, "https"), headers, body, "https", extra);
    }
    // One probe per host: requests that start while it runs wait for its answer.
    const probing = this.probes.get(registryHost);
    if (probing) {
      await probing.catch(() => undefined);
      return this.sendOnce(method, url, headers, body, extra, registryHost);
    }
    let settle!: () => void;
    this.probes.set(registryHost, new Promise<void>((r) => (settle = r)));
    // The waiting requests go on as soon as the scheme is known, not when this request ends.
    const settled = () => {
      if (this.probes.get(registryHost) !== undefined) this.probes.delete(registryHost);
      settle();
    };
    try {
      return await this.probe(method, url, headers, body, extra, registryHost, settled);
    } finally {
      settled();
    }
  }

  private async probe(method: string, url: URL, headers: Record<string, string>, body: Buffer | undefined, extra: RawExtra, registryHost: string, known: () => void): Promise<HttpResponse> {
    const first: Scheme = this.isInsecure(registryHost) ? "https-insecure" : "https";
    try {
      const res = await this.raw(method, withScheme(url, "https"), headers, body, first, extra);
      this.schemes.set(registryHost, first);
      known();
      return res;
    } catch (err) {
      const code = errCode(err);
      const notTls = code === "EPROTO" || code === "ECONNRESET" || code.startsWith("ERR_SSL_");
      if (!notTls || extra.signal?.aborted) throw err;
      log("%s does not speak TLS (%s), using plain HTTP", registryHost, code);
      this.schemes.set(registryHost, "http");
      learnedSchemes.set(registryHost, { scheme: "http", at: Date.now() });
      known();
      return this.raw(method, withScheme(url, "http"), headers, body, "http", extra);
    }
  }

  private raw(method: string, url: URL, headers: Record<string, string>, body: Buffer | undefined, scheme: Scheme, extra: RawExtra): Promise<HttpResponse> {
    const mod = scheme === "http" ? http : https;
    const agent = scheme === "http" ? this.httpAgent : scheme === "https" ? this.httpsAgent : this.httpsInsecureAgent;
    const signal = extra.signal;
    this.requests++;
    if (extra.count) extra.count.requests++;
    const t0 = performance.now();
    return new Promise<HttpResponse>((resolve, reject) => {
      const req = mod.request(
        url,
        {
          method,
          agent,
          headers: { "User-Agent": "supermachine", ...headers, ...(body ? { "Content-Length": String(body.length) } : {}) },
          timeout: this.timeoutMs,
          ...(signal ? { signal } : {}),
        },
        (res) => {
          log("%s %s%s: %d after %d ms", method, url.host, url.pathname, res.statusCode ?? 0, Math.round(performance.now() - t0));
          resolve({
            status: res.statusCode ?? 0,
            statusText: res.statusMessage ?? "",
            headers: res.headers,
            body: res,
            url,
            attempts: 1,
            header: (name) => {
              const v = res.headers[name.toLowerCase()];
              return Array.isArray(v) ? v.join(", ") : v;
            },
          });
        },
      );
      req.on("timeout", () => {
        const err = Object.assign(new Error(`no data from ${url.host} for ${this.timeoutMs} ms`), { code: "ETIMEDOUT" });
        req.destroy(err);
      });
      req.on("error", (err) => {
        Object.assign(err, { host: url.host });
        reject(err);
      });
      req.end(body);
    });
  }

  backoff(attempt: number): number {
    const d = Math.min(this.retry.maxDelayMs, this.retry.baseMs * 2 ** (attempt - 1));
    return Math.round(d * (0.5 + Math.random()));
  }

  get tries(): number {
    return this.retry.tries;
  }

  /** Waits `ms`, or rejects when the transport's signal (or `own`) aborts. */
  sleep(ms: number, own?: AbortSignal): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const signal = this.signalFor(own);
      if (signal?.aborted) return reject(aborted(signal));
      const onAbort = () => {
        clearTimeout(t);
        reject(aborted(signal!));
      };
      const t = setTimeout(() => {
        signal?.removeEventListener("abort", onAbort);
        resolve();
      }, ms);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  throwIfAborted(signal = this.signal): void {
    if (signal?.aborted) throw aborted(signal);
  }
}

function withScheme(url: URL, scheme: Scheme): URL {
  const proto = scheme === "http" ? "http:" : "https:";
  if (url.protocol === proto) return url;
  const u = new URL(url.href);
  u.protocol = proto;
  return u;
}

/**
 * The scheme a loopback or insecure registry turned out to speak (plain HTTP), for the process:
 * the next transport to it skips the probe (a round trip). Kept a few minutes, and dropped when a
 * request in that scheme fails to connect (another server on that port now).
 */
const learnedSchemes = new Map<string, { scheme: Scheme; at: number }>();
const LEARNED_TTL_MS = 5 * 60_000;

/**
 * One TLS context per set of trusted CAs, for the whole process. Without it every new connection
 * builds its own (Node does so when given `ca`), parsing the ~150 root certificates again: about
 * 80 ms of CPU per connection, on the critical path of every push and pull.
 */
const secureContexts = new Map<string, SecureContext>();
function secureContextFor(extra: (string | Buffer)[]): SecureContext {
  const id = createHash("sha256");
  for (const c of extra) id.update(c).update("\0");
  const key = id.digest("hex");
  let ctx = secureContexts.get(key);
  if (!ctx) {
    ctx = createSecureContext(extra.length ? { ca: [...rootCertificates, ...extra] } : {});
    secureContexts.set(key, ctx);
  }
  return ctx;
}

function extraCAs(opts: TransportOptions): (string | Buffer)[] {
  const env = opts.env ?? process.env;
  const out: (string | Buffer)[] = [];
  if (opts.ca !== undefined) out.push(...(Array.isArray(opts.ca) ? opts.ca : [opts.ca]));
  for (const [name, required] of [["SUPERMACHINE_REGISTRY_CA", true], ["NODE_EXTRA_CA_CERTS", false]] as const) {
    const path = env[name];
    if (!path) continue;
    try {
      out.push(readFileSync(path));
    } catch (cause) {
      if (required) {
        throw new RegistryError("REGISTRY_TLS_ERROR", `cannot read the CA certificate file ${path} named by ${name}: ${(cause as Error).message}`, {
          cause,
          hint: `${name} must be the path of a PEM file with one or more CA certificates`,
        });
      }
    }
  }
  return out;
}

export function parseRetryAfter(v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  if (/^\d+$/.test(v.trim())) return Number(v.trim()) * 1000;
  const t = Date.parse(v);
  return Number.isNaN(t) ? undefined : Math.max(0, t - Date.now());
}

/**
 * Whether `err` (from `send`) is a connection that failed in a way worth trying again: reset,
 * cut or timed out, as opposed to a TLS failure, a refusal by name or an abort.
 */
export function isTransientNetworkError(err: unknown): boolean {
  return err instanceof RegistryError && err.code === "REGISTRY_UNREACHABLE" && RETRYABLE_NET.has(errCode(err.cause));
}

export function errCode(err: unknown): string {
  const e = err as { code?: unknown; message?: unknown } | null;
  if (typeof e?.code === "string") return e.code;
  if (typeof e?.message === "string" && /socket hang up/.test(e.message)) return "ECONNRESET";
  return "";
}

/** The error for a request that never got an answer (after the retries, when retried). */
export function networkError(err: unknown, host: string, tries?: number): RegistryError {
  const code = errCode(err);
  const msg = (err as Error | undefined)?.message ?? String(err);
  if (CERT_ERRORS.test(code) || /certificate/i.test(msg)) {
    return new RegistryError("REGISTRY_TLS_ERROR", `TLS connection to registry ${host} failed: ${msg}`, {
      cause: err,
      hint: "if the registry uses a private CA, set SUPERMACHINE_REGISTRY_CA to its PEM file (or pass `ca`); for a test registry without valid TLS, list it in SUPERMACHINE_INSECURE_REGISTRIES",
    });
  }
  const after = tries && RETRYABLE_NET.has(code) ? ` (after ${tries} attempts)` : "";
  return new RegistryError("REGISTRY_UNREACHABLE", `registry unreachable: ${host}: ${msg}${after}`, {
    cause: err,
    hint: "check the registry address, that it is running and that this machine can reach it (DNS, proxy, firewall)",
  });
}

export function aborted(signal: AbortSignal, cause?: unknown): RegistryError {
  return new RegistryError("REGISTRY_ABORTED", "registry operation cancelled", { cause: signal.reason ?? cause });
}

/** Reads a whole body, refusing more than `limit` bytes. */
export async function readBody(res: HttpResponse, limit: number, what: string): Promise<Buffer> {
  const declared = Number(res.header("content-length"));
  if (Number.isFinite(declared) && declared > limit) {
    res.body.destroy();
    throw new RegistryError("REGISTRY_MANIFEST_TOO_LARGE", `${what} is ${declared} bytes, more than the ${limit}-byte limit`);
  }
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of res.body as AsyncIterable<Buffer>) {
    n += c.length;
    if (n > limit) {
      res.body.destroy();
      throw new RegistryError("REGISTRY_MANIFEST_TOO_LARGE", `${what} is more than the ${limit}-byte limit`);
    }
    chunks.push(c);
  }
  return Buffer.concat(chunks);
}

/** Reads a (small) error body and returns the registry's error message when it has one. */
export async function errorDetail(res: HttpResponse): Promise<{ code?: string; message?: string }> {
  try {
    const data = await readBody(res, 64 * 1024, "error body");
    const json = JSON.parse(data.toString("utf8")) as { errors?: { code?: unknown; message?: unknown }[] };
    const first = json.errors?.[0];
    const out: { code?: string; message?: string } = {};
    if (typeof first?.code === "string") out.code = first.code;
    if (typeof first?.message === "string") out.message = first.message;
    return out;
  } catch {
    res.body.destroy();
    return {};
  }
}
