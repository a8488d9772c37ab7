/**
 * Pushing to an OCI distribution registry (and reading back what was pushed): blobs are checked
 * with HEAD; a blob of up to one piece (8 MiB) is uploaded monolithically (POST for a session,
 * PUT with the digest), a larger one in pieces (the distribution spec's PATCH flow) that resume
 * after a cut connection, within the process and, with an upload journal, across processes.
 * Blobs can be read whole or by byte range. Manifests are PUT by tag. Same transport (TLS,
 * insecure and loopback rules, retries, redirects) and credentials as pulls; the token flow asks
 * for `pull,push`.
 */
import { apiHost, type RegistryRef } from "../oci/docker-ref.js";
import { logger } from "../debug.js";
import { Authenticator } from "./auth.js";
import type { RegistryOptions } from "./client.js";
import { RegistryError } from "./errors.js";
import { errorDetail, isTransientNetworkError, parseRetryAfter, readBody, Transport, type HttpResponse } from "./http.js";
import { uploadJournalKey, validLocation, type UploadJournal } from "./upload-journal.js";

const log = logger("registry");

type Method = "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE";

/**
 * Blobs up to this size go up in one request; larger ones in pieces of this size. A piece is
 * what a cut connection can cost again, and one request per piece is a round trip each: 8 MiB
 * keeps both small (a 16 MiB pack is two pieces) and stays far below registries' request limits.
 */
export const DEFAULT_UPLOAD_PIECE_BYTES = 8 * 1024 * 1024;

export interface PushClientOptions extends RegistryOptions {
  /** Ask for pull access only (reading back). */
  pullOnly?: boolean;
  /** Where chunked uploads record their sessions, so that a later process can resume them. */
  journal?: UploadJournal;
}

export interface UploadOptions {
  /** Largest blob sent in one request, and the size of each piece of a larger one. */
  pieceSize?: number;
  signal?: AbortSignal;
}

export interface UploadResult {
  /** HTTP requests the upload sent: retries, redirect hops and authorization rounds included. */
  requests: number;
  /** Request body bytes sent, those of failed requests included. */
  bytesSent: number;
  /** Times the upload went on in a session the registry still held (after a failure, or one a journal named). */
  resumed: number;
  /** Times the registry had dropped the session, so the upload started over in a new one. */
  restarted: number;
}

/** Per-call state: what is counted, and the caller's signal. */
interface CallContext {
  stats: UploadResult;
  signal: AbortSignal | undefined;
}

export interface PushRequestOptions {
  /** Send once; the caller handles a failure (see `HttpRequest.noRetry`). */
  noRetry?: boolean;
  signal?: AbortSignal | undefined;
  stats?: UploadResult;
}

/** An upload session: where to send next, and from which byte. */
interface Session {
  url: URL;
  offset: number;
  /** Bytes of the blob sent in this session so far: the registry cannot hold more. */
  sentUpTo: number;
}

/**
 * A step of an upload that failed in a way the upload can recover from: `lost` when the registry
 * no longer knows the session, else its state is unknown until asked. `error` is what the call
 * throws when no attempt is left.
 */
class Setback {
  constructor(
    readonly error: unknown,
    readonly lost: boolean,
    readonly opts: { retryAfterMs?: number | undefined; rangeRefused?: boolean } = {},
  ) {}
}

const retryableStatus = (status: number) => status >= 500 || status === 429;

/** The offset after a `Range: 0-<last>` header (an upload's bytes so far), or undefined when malformed. */
export function uploadOffset(range: string | undefined): number | undefined {
  const m = /^(?:bytes=)?0-(\d{1,15})$/.exec(range?.trim() ?? "");
  if (!m) return undefined;
  const last = Number(m[1]);
  // "0-0" is what distribution says for an empty upload as well as for one byte: take the safe
  // reading (nothing held); a wrong guess costs one 416 and a fresh session.
  return last === 0 ? 0 : last + 1;
}

/** One repository of a registry, for pushing and for reading back by digest or tag. */
export class PushClient {
  readonly host: string;
  readonly transport: Transport;
  private readonly auth: Authenticator;
  private readonly scope: string;
  private readonly journal: UploadJournal | undefined;
  /** Upload sessions started ahead of the uploads that will use them. */
  private readonly spare: Array<Promise<URL | undefined>> = [];

  constructor(
    readonly ref: Pick<RegistryRef, "registry" | "repository">,
    opts: PushClientOptions,
  ) {
    this.host = apiHost(ref.registry);
    this.transport = new Transport(opts);
    this.auth = new Authenticator(this.host, this.transport, { ...opts, registry: ref.registry });
    this.scope = `repository:${ref.repository}:${opts.pullOnly ? "pull" : "pull,push"}`;
    this.journal = opts.journal;
  }

  close(): void {
    this.transport.close();
  }

  get name(): string {
    return `${this.ref.registry}/${this.ref.repository}`;
  }

  /** A request to the registry with authorization (one challenge round). `target` is a path or an absolute URL (upload locations). */
  async request(method: Method, target: string | URL, headers: Record<string, string> = {}, body?: Buffer, opts: PushRequestOptions = {}): Promise<HttpResponse> {
    const url = typeof target === "string" ? this.transport.registryUrl(this.host, target) : target;
    // An upload location on another host (blob storage) gets no credentials.
    const sameHost = url.host === this.transport.registryUrl(this.host, "/").host;
    let authorization = sameHost ? await this.auth.authorization(this.scope) : undefined;
    for (let round = 0; ; round++) {
      if (opts.stats && body) opts.stats.bytesSent += body.length;
      const res = await this.transport.send(
        {
          method,
          url,
          headers: { ...headers, ...(authorization ? { Authorization: authorization } : {}) },
          ...(body ? { body } : {}),
          ...(opts.noRetry ? { noRetry: true } : {}),
          ...(opts.signal ? { signal: opts.signal } : {}),
          ...(opts.stats ? { count: opts.stats } : {}),
        },
        sameHost ? this.host : undefined,
      );
      if (res.status !== 401 || !sameHost) return res;
      const challenge = res.header("www-authenticate");
      res.body.destroy();
      if (round === 0) {
        const next = await this.auth.onChallenge(challenge, this.scope, authorization, true);
        if (next !== undefined) {
          authorization = next;
          continue;
        }
      }
      const creds = this.auth.usedCredentials ?? (await this.auth.getCredentials().catch(() => undefined));
      throw new RegistryError("REGISTRY_UNAUTHORIZED", `registry ${this.host} refused ${method} on repository ${this.ref.repository} (${this.name}): ${res.status} ${res.statusText}`, {
        hint: creds
          ? `the credentials from ${creds.source} were not accepted for pushing to ${this.ref.registry}; run \`docker login ${this.ref.registry}\` again`
          : `no credentials for ${this.ref.registry} were found; run \`docker login ${this.ref.registry}\` (credentials are read from $DOCKER_CONFIG/config.json or ~/.docker/config.json)`,
      });
    }
  }

  private async fail(res: HttpResponse, what: string): Promise<RegistryError> {
    return (await this.failure(res, what)).error;
  }

  /** The error for an unexpected answer, and the registry's error code from its body. */
  private async failure(res: HttpResponse, what: string): Promise<{ error: RegistryError; code: string | undefined }> {
    const detail = await errorDetail(res);
    const error = new RegistryError("REGISTRY_HTTP_ERROR", `registry ${this.host} answered ${res.status} ${res.statusText} for ${what} in ${this.name}${detail.message ? `: ${detail.message}` : ""}`, retryableStatus(res.status) ? { hint: "the registry is failing or overloaded; try again later" } : {});
    return { error, code: detail.code };
  }

  /** The size of blob `digest` when the repository has it. */
  blobSize(digest: string): Promise<number | undefined> {
    return this.headBlob(digest, {});
  }

  private async headBlob(digest: string, opts: PushRequestOptions): Promise<number | undefined> {
    const res = await this.request("HEAD", `/v2/${this.ref.repository}/blobs/${digest}`, {}, undefined, opts);
    res.body.resume();
    if (res.status === 404) return undefined;
    if (res.status !== 200) throw await this.fail(res, `HEAD blob ${digest}`);
    const n = Number(res.header("content-length"));
    return Number.isFinite(n) ? n : undefined;
  }

  /**
   * Uploads blob `digest` (the caller has checked it is missing). Up to `pieceSize` bytes go in
   * one PUT; more go in PATCH pieces of `pieceSize`, and a piece that fails (connection cut or
   * reset, timeout, 5xx, 429) is not resent blindly: the registry is asked how much of the
   * session it holds and the upload goes on from there, or in a new session when it holds none.
   * Failures are bounded by the transport's retry count, with its backoff.
   */
  async uploadBlob(digest: string, data: Buffer, opts: UploadOptions = {}): Promise<UploadResult> {
    const pieceSize = opts.pieceSize ?? DEFAULT_UPLOAD_PIECE_BYTES;
    if (!Number.isSafeInteger(pieceSize) || pieceSize < 1) throw new RangeError(`upload piece size must be a positive integer, not ${pieceSize}`);
    const ctx: CallContext = { stats: { requests: 0, bytesSent: 0, resumed: 0, restarted: 0 }, signal: opts.signal };
    if (data.length <= pieceSize) await this.uploadWhole(digest, data, ctx);
    else await this.uploadInPieces(digest, data, pieceSize, ctx);
    const s = ctx.stats;
    log("pushed blob %s (%d bytes) to %s: %d requests, %d bytes sent, resumed %d, restarted %d", digest, data.length, this.name, s.requests, s.bytesSent, s.resumed, s.restarted);
    return s;
  }

  /** POST for a new upload session; its location. */
  /**
   * Starts `n` upload sessions now, for the next whole uploads to use: their round trip then
   * overlaps the caller's work (packing what it will upload). Sessions left unused are cancelled
   * by `cancelSpareUploads()`.
   */
  prestartUploads(n: number): void {
    // Tops the spares up to `n`: asking again before they were used starts no more.
    for (let i = this.spare.length; i < n; i++) {
      const p = this.postSession("(a blob to come)", { stats: { requests: 0, bytesSent: 0, resumed: 0, restarted: 0 }, signal: undefined }).catch(() => undefined);
      this.spare.push(p);
    }
  }

  /** Cancels the sessions `prestartUploads` began that no upload took (best effort). */
  async cancelSpareUploads(): Promise<void> {
    const left = this.spare.splice(0);
    await Promise.all(
      left.map(async (p) => {
        const url = await p;
        if (!url) return;
        const res = await this.request("DELETE", url).catch(() => undefined);
        res?.body.resume();
      }),
    );
  }

  private async startSession(digest: string, ctx: CallContext): Promise<URL> {
    const spare = this.spare.shift();
    const ready = spare ? await spare : undefined;
    return ready ?? this.postSession(digest, ctx);
  }

  private async postSession(digest: string, ctx: CallContext): Promise<URL> {
    const res = await this.request("POST", `/v2/${this.ref.repository}/blobs/uploads/`, { "Content-Length": "0" }, undefined, ctx);
    if (res.status !== 202) throw await this.fail(res, `starting the upload of blob ${digest}`);
    res.body.resume();
    const location = res.header("location");
    if (!location) throw new RegistryError("REGISTRY_HTTP_ERROR", `registry ${this.host} started an upload for ${digest} in ${this.name} without a Location`);
    return new URL(location, res.url);
  }

  /** Monolithic: POST, then PUT the bytes with their digest; a failed PUT starts over in a new session. */
  private async uploadWhole(digest: string, data: Buffer, ctx: CallContext): Promise<void> {
    for (let failures = 1; ; failures++) {
      let setback: Setback;
      try {
        const url = await this.startSession(digest, ctx);
        url.searchParams.set("digest", digest);
        const put = await this.sendOnce("PUT", url, { "Content-Type": "application/octet-stream" }, data, ctx);
        if (put.status === 201 || put.status === 204) {
          put.body.resume();
          return;
        }
        setback = await this.setbackOf(put, `uploading blob ${digest} (${data.length} bytes)`);
      } catch (err) {
        if (!(err instanceof Setback)) throw err;
        setback = err;
      }
      await this.afterSetback(setback, failures, ctx);
      // The PUT may have landed though its answer did not.
      if ((await this.headBlob(digest, ctx)) === data.length) return;
      ctx.stats.restarted++;
    }
  }

  /**
   * What a failed upload request means: a Setback when the upload can go on (the session's state
   * is asked for, or it is replaced when the registry says it is gone), else the error to throw.
   */
  private async setbackOf(res: HttpResponse, what: string, opts: { resumed?: boolean } = {}): Promise<Setback> {
    const retryAfterMs = parseRetryAfter(res.header("retry-after"));
    const status = res.status;
    const { error, code } = await this.failure(res, what);
    if (retryableStatus(status)) return new Setback(error, false, { retryAfterMs });
    if (status === 416) return new Setback(error, false, { rangeRefused: true });
    if (status === 404) return new Setback(error, true);
    // A session resumed from elsewhere may hold bytes that are not ours: start clean.
    if (status === 400 && opts.resumed && code === "DIGEST_INVALID") return new Setback(error, true);
    throw error;
  }

  /** Counts a failure; throws its error when none is left, else waits the backoff. */
  private async afterSetback(setback: Setback, failures: number, ctx: CallContext): Promise<void> {
    if (failures >= this.transport.tries) throw setback.error;
    const ms = Math.min(setback.opts.retryAfterMs ?? this.transport.backoff(failures), 10_000);
    log("upload to %s: %s; trying again in %d ms", this.name, (setback.error as Error).message, ms);
    await this.transport.sleep(ms, ctx.signal);
  }

  /** A network failure of a request sent once, as a Setback; anything else is rethrown. */
  private async sendOnce(method: Method, url: URL, headers: Record<string, string>, body: Buffer | undefined, ctx: CallContext): Promise<HttpResponse> {
    try {
      return await this.request(method, url, headers, body, { ...ctx, noRetry: true });
    } catch (err) {
      if (isTransientNetworkError(err)) throw new Setback(err, false);
      throw err;
    }
  }

  /** Chunked: POST (or a journaled session), PATCH pieces, PUT with the digest; resumes after failures. */
  private async uploadInPieces(digest: string, data: Buffer, pieceSize: number, ctx: CallContext): Promise<void> {
    const key = uploadJournalKey(this.ref.registry, this.ref.repository, digest);
    let session = await this.journaledSession(key, data.length, ctx);
    let resumed = session !== undefined;
    if (resumed) ctx.stats.resumed++;
    let started = false;
    for (let failures = 1; ; failures++) {
      let committing = false;
      try {
        if (!session) {
          if (started) ctx.stats.restarted++;
          started = true;
          resumed = false;
          session = { url: await this.startSession(digest, ctx), offset: 0, sentUpTo: 0 };
          await this.record(key, session.url);
        }
        while (session.offset < data.length) {
          await this.sendPiece(digest, data, session, pieceSize, ctx);
          await this.record(key, session.url);
        }
        committing = true;
        const url = new URL(session.url);
        url.searchParams.set("digest", digest);
        const put = await this.sendOnce("PUT", url, { "Content-Length": "0" }, undefined, ctx);
        if (put.status === 201 || put.status === 204) {
          put.body.resume();
          await this.forget(key);
          return;
        }
        throw await this.setbackOf(put, `completing the upload of blob ${digest} (${data.length} bytes)`, { resumed });
      } catch (err) {
        if (!(err instanceof Setback)) throw err;
        await this.afterSetback(err, failures, ctx);
        // A commit whose answer was lost may have made the blob.
        if (committing && (await this.headBlob(digest, ctx)) === data.length) {
          await this.forget(key);
          return;
        }
        const status = err.lost || !session ? undefined : await this.sessionStatus(session.url, ctx);
        // A registry that refused a piece's range but claims the offset it started at is confused.
        const confused = err.opts.rangeRefused && status?.offset === session?.offset;
        if (status && status.offset <= session!.sentUpTo && !confused) {
          session = { url: status.url, offset: status.offset, sentUpTo: session!.sentUpTo };
          ctx.stats.resumed++;
          resumed = true;
          log("upload of %s to %s resumes at byte %d", digest, this.name, status.offset);
        } else {
          if (session) log("upload of %s to %s: the registry dropped the session, starting over", digest, this.name);
          session = undefined;
          await this.forget(key);
        }
      }
    }
  }

  /** PATCHes the piece at the session's offset; on 202 moves the session on. */
  private async sendPiece(digest: string, data: Buffer, session: Session, pieceSize: number, ctx: CallContext): Promise<void> {
    const start = session.offset;
    const end = Math.min(start + pieceSize, data.length) - 1;
    session.sentUpTo = Math.max(session.sentUpTo, end + 1);
    const what = `uploading bytes ${start}-${end} of blob ${digest} (${data.length} bytes)`;
    const res = await this.sendOnce("PATCH", session.url, { "Content-Type": "application/octet-stream", "Content-Range": `${start}-${end}` }, data.subarray(start, end + 1), ctx);
    if (res.status !== 202) throw await this.setbackOf(res, what);
    res.body.resume();
    const range = res.header("range");
    const offset = uploadOffset(range);
    // The registry holds something else than what was just sent: ask it where it stands.
    if (range !== undefined && offset !== end + 1) throw new Setback(new RegistryError("REGISTRY_HTTP_ERROR", `registry ${this.host} answered ${what} in ${this.name} with Range ${JSON.stringify(range)}, expected 0-${end}`), false);
    const location = res.header("location");
    if (location) session.url = new URL(location, res.url);
    session.offset = end + 1;
  }

  /** Where an upload session stands (GET on its location), or undefined when the registry no longer has it. */
  private async sessionStatus(url: URL, ctx: CallContext): Promise<{ url: URL; offset: number } | undefined> {
    const res = await this.request("GET", url, {}, undefined, ctx);
    if (res.status === 404 || res.status === 400) {
      res.body.resume();
      return undefined;
    }
    if (res.status !== 204 && res.status !== 200) throw await this.fail(res, `the status of upload ${url.pathname}`);
    res.body.resume();
    const offset = uploadOffset(res.header("range"));
    if (offset === undefined) return undefined;
    const location = res.header("location");
    return { url: location ? new URL(location, res.url) : url, offset };
  }

  /** A session a journal recorded for this blob, when the registry still has it at a sane offset. */
  private async journaledSession(key: string, size: number, ctx: CallContext): Promise<Session | undefined> {
    if (!this.journal) return undefined;
    const location = await this.journal.get(key).catch(() => undefined);
    if (location === undefined) return undefined;
    // Only on this registry's own host: a tampered entry must not send the blob elsewhere.
    const url = validLocation(location) ? new URL(location) : undefined;
    let status: { url: URL; offset: number } | undefined;
    if (url && url.host === this.transport.registryUrl(this.host, "/").host) {
      try {
        status = await this.sessionStatus(url, ctx);
      } catch (err) {
        if (ctx.signal?.aborted || (err as RegistryError).code === "REGISTRY_ABORTED") throw err;
        log("upload journal: %s no longer usable: %s", location, (err as Error).message);
      }
    }
    if (!status || status.offset > size) {
      await this.forget(key);
      return undefined;
    }
    log("upload of %s resumes a journaled session at byte %d", key, status.offset);
    return { url: status.url, offset: status.offset, sentUpTo: size };
  }

  /** Records a session's location in the journal; a journal that cannot be written only costs resumability. */
  private async record(key: string, url: URL): Promise<void> {
    await this.journal?.set(key, url.href).catch((err: unknown) => log("upload journal: cannot record %s: %s", key, (err as Error).message));
  }

  private async forget(key: string): Promise<void> {
    await this.journal?.delete(key).catch((err: unknown) => log("upload journal: cannot remove %s: %s", key, (err as Error).message));
  }

  /** Reads a whole blob, refusing more than `limit` bytes. The caller verifies the digest. */
  async getBlob(digest: string, limit: number, what: string): Promise<Buffer | undefined> {
    const res = await this.request("GET", `/v2/${this.ref.repository}/blobs/${digest}`);
    if (res.status === 404) {
      res.body.destroy();
      return undefined;
    }
    if (res.status !== 200) throw await this.fail(res, what);
    return readBody(res, limit, what);
  }

  /**
   * Bytes `start`..`endInclusive` of a blob. A registry that honours Range answers 206 and those
   * bytes come back with `start`; one that ignores it answers 200 with the whole blob (at most
   * `limit` bytes), returned with start 0 for the caller to slice. The Range header survives the
   * redirect to blob storage that registries often answer with. The caller verifies the bytes.
   */
  async getBlobRange(digest: string, start: number, endInclusive: number, limit: number, what: string): Promise<{ bytes: Buffer; start: number } | undefined> {
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(endInclusive) || start < 0 || endInclusive < start) {
      throw new RangeError(`invalid byte range ${start}-${endInclusive} for ${what}`);
    }
    const res = await this.request("GET", `/v2/${this.ref.repository}/blobs/${digest}`, { Range: `bytes=${start}-${endInclusive}` });
    if (res.status === 404) {
      res.body.destroy();
      return undefined;
    }
    if (res.status === 200) return { bytes: await readBody(res, limit, what), start: 0 };
    if (res.status !== 206) throw await this.fail(res, `${what} (bytes ${start}-${endInclusive})`);
    const contentRange = res.header("content-range");
    const m = /^bytes (\d{1,15})-(\d{1,15})\/(\d{1,15}|\*)$/.exec(contentRange?.trim() ?? "");
    const total = m?.[3] === "*" ? undefined : Number(m?.[3]);
    // A range past the end comes back cut at the end of the blob.
    const expectedEnd = total !== undefined && endInclusive >= total ? total - 1 : endInclusive;
    if (!m || Number(m[1]) !== start || Number(m[2]) !== expectedEnd) {
      res.body.destroy();
      throw new RegistryError("REGISTRY_HTTP_ERROR", `registry ${this.host} answered ${what} (bytes ${start}-${endInclusive}) in ${this.name} with Content-Range ${JSON.stringify(contentRange ?? "")}`, {
        hint: "the registry (or a proxy in front of it) does not serve byte ranges correctly",
      });
    }
    const bytes = await readBody(res, expectedEnd - start + 1, what);
    if (bytes.length !== expectedEnd - start + 1) {
      throw new RegistryError("REGISTRY_HTTP_ERROR", `registry ${this.host} sent ${bytes.length} bytes for ${what} (bytes ${start}-${expectedEnd}) in ${this.name}`, {
        hint: "the connection was cut or the registry is misbehaving; try again",
      });
    }
    return { bytes, start };
  }

  /** A manifest by tag or digest, or undefined when there is none. */
  async getManifest(reference: string, accept: string, limit: number): Promise<{ bytes: Buffer; contentDigest: string | undefined } | undefined> {
    const res = await this.request("GET", `/v2/${this.ref.repository}/manifests/${reference}`, { Accept: accept });
    if (res.status === 404) {
      res.body.destroy();
      return undefined;
    }
    if (res.status !== 200) throw await this.fail(res, `manifest ${reference}`);
    return { bytes: await readBody(res, limit, `manifest ${this.name}:${reference}`), contentDigest: res.header("docker-content-digest") };
  }

  /** Whether a tag (or digest) exists, and the digest the registry reports for it. */
  async headManifest(reference: string, accept: string): Promise<{ digest: string | undefined } | undefined> {
    const res = await this.request("HEAD", `/v2/${this.ref.repository}/manifests/${reference}`, { Accept: accept });
    res.body.resume();
    if (res.status === 404) return undefined;
    if (res.status !== 200) throw await this.fail(res, `HEAD manifest ${reference}`);
    return { digest: res.header("docker-content-digest") };
  }

  async putManifest(reference: string, bytes: Buffer, mediaType: string): Promise<void> {
    const res = await this.request("PUT", `/v2/${this.ref.repository}/manifests/${reference}`, { "Content-Type": mediaType }, bytes);
    if (res.status !== 201 && res.status !== 200) throw await this.fail(res, `PUT manifest ${reference}`);
    res.body.resume();
    log("pushed manifest %s to %s", reference, this.name);
  }
}
