/**
 * Pushing to an OCI distribution registry (and reading back what was pushed): blobs are checked
 * with HEAD and uploaded only when missing (monolithic upload: POST for a session, PUT with the
 * digest), manifests are PUT by tag. Same transport (TLS, insecure and loopback rules, retries,
 * redirects) and credentials as pulls; the token flow asks for `pull,push`.
 */
import { apiHost, type RegistryRef } from "../oci/docker-ref.js";
import { logger } from "../debug.js";
import { Authenticator } from "./auth.js";
import type { RegistryOptions } from "./client.js";
import { RegistryError } from "./errors.js";
import { errorDetail, readBody, Transport, type HttpResponse } from "./http.js";

const log = logger("registry");

type Method = "GET" | "HEAD" | "POST" | "PUT";

/** One repository of a registry, for pushing and for reading back by digest or tag. */
export class PushClient {
  readonly host: string;
  readonly transport: Transport;
  private readonly auth: Authenticator;
  private readonly scope: string;

  constructor(
    readonly ref: Pick<RegistryRef, "registry" | "repository">,
    opts: RegistryOptions & { pullOnly?: boolean },
  ) {
    this.host = apiHost(ref.registry);
    this.transport = new Transport(opts);
    this.auth = new Authenticator(this.host, this.transport, { ...opts, registry: ref.registry });
    this.scope = `repository:${ref.repository}:${opts.pullOnly ? "pull" : "pull,push"}`;
  }

  close(): void {
    this.transport.close();
  }

  get name(): string {
    return `${this.ref.registry}/${this.ref.repository}`;
  }

  /** A request to the registry with authorization (one challenge round). `target` is a path or an absolute URL (upload locations). */
  async request(method: Method, target: string | URL, headers: Record<string, string> = {}, body?: Buffer): Promise<HttpResponse> {
    const url = typeof target === "string" ? this.transport.registryUrl(this.host, target) : target;
    // An upload location on another host (blob storage) gets no credentials.
    const sameHost = url.host === this.transport.registryUrl(this.host, "/").host;
    let authorization = sameHost ? await this.auth.authorization(this.scope) : undefined;
    for (let round = 0; ; round++) {
      const res = await this.transport.send(
        { method, url, headers: { ...headers, ...(authorization ? { Authorization: authorization } : {}) }, ...(body ? { body } : {}) },
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
    const detail = await errorDetail(res);
    return new RegistryError("REGISTRY_HTTP_ERROR", `registry ${this.host} answered ${res.status} ${res.statusText} for ${what} in ${this.name}${detail.message ? `: ${detail.message}` : ""}`, res.status >= 500 || res.status === 429 ? { hint: "the registry is failing or overloaded; try again later" } : {});
  }

  /** The size of blob `digest` when the repository has it. */
  async blobSize(digest: string): Promise<number | undefined> {
    const res = await this.request("HEAD", `/v2/${this.ref.repository}/blobs/${digest}`);
    res.body.resume();
    if (res.status === 404) return undefined;
    if (res.status !== 200) throw await this.fail(res, `HEAD blob ${digest}`);
    const n = Number(res.header("content-length"));
    return Number.isFinite(n) ? n : undefined;
  }

  /** Uploads a blob in one piece (POST a session, PUT the bytes with their digest). */
  async uploadBlob(digest: string, data: Buffer): Promise<void> {
    const start = await this.request("POST", `/v2/${this.ref.repository}/blobs/uploads/`, { "Content-Length": "0" });
    if (start.status !== 202) throw await this.fail(start, `starting the upload of blob ${digest}`);
    start.body.resume();
    const location = start.header("location");
    if (!location) throw new RegistryError("REGISTRY_HTTP_ERROR", `registry ${this.host} started an upload for ${digest} in ${this.name} without a Location`);
    const url = new URL(location, start.url);
    url.searchParams.set("digest", digest);
    const put = await this.request("PUT", url, { "Content-Type": "application/octet-stream" }, data);
    if (put.status !== 201 && put.status !== 204) throw await this.fail(put, `uploading blob ${digest} (${data.length} bytes)`);
    put.body.resume();
    log("pushed blob %s (%d bytes) to %s", digest, data.length, this.name);
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

  /** TEMP: bytes start..end of a blob (whole blob when the registry ignores Range). */
  async getBlobRange(digest: string, start: number, end: number, limit: number, what: string): Promise<{ bytes: Buffer; start: number } | undefined> {
    const res = await this.request("GET", `/v2/${this.ref.repository}/blobs/${digest}`, { Range: `bytes=${start}-${end}` });
    if (res.status === 404) {
      res.body.destroy();
      return undefined;
    }
    if (res.status === 206) return { bytes: await readBody(res, end - start + 1, what), start };
    if (res.status !== 200) throw await this.fail(res, what);
    return { bytes: await readBody(res, limit, what), start: 0 };
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
