/**
 * OCI distribution API v2 client: resolves a reference to a manifest (through an index, by
 * platform), verifies every manifest against its digest, and stores manifests, config and
 * layers in the blob store (which verifies blobs as they stream).
 */
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { Readable } from "node:stream";
import { ImageError, SupermachineError } from "../errors.js";
import type { BlobStore } from "../store/blobs.js";
import { apiHost, type RegistryRef } from "../oci/docker-ref.js";
import { isValidDigest, MAX_JSON_BYTES, MEDIA_TYPES, TARGET_PLATFORM } from "../oci/oci-layout.js";
import { logger } from "../debug.js";
import { Authenticator } from "./auth.js";
import { RegistryError } from "./errors.js";
import { aborted, errorDetail, networkError, readBody, Transport, type HttpResponse } from "./http.js";

const log = logger("registry");


import type { PullProgress } from "../schema/image.js";
import type { Platform, RegistryOptions } from "./options.js";
export type { Platform, PullProgress, RegistryOptions };


export interface PullOptions extends RegistryOptions {
  store: BlobStore;
  onProgress?: (e: PullProgress) => void;
  /** Layers downloaded at once (default 3). */
  concurrency?: number;
}

export interface PulledLayer {
  digest: string;
  size: number;
  mediaType: string;
}

export interface PullResult {
  /** Digest of the image manifest (never of an index). */
  manifestDigest: string;
  /** Digest of the index the manifest was selected from, when the reference named one. */
  indexDigest?: string;
  /** Media type of the image manifest. */
  mediaType: string;
  configDigest: string;
  layers: PulledLayer[];
  registry: string;
  repository: string;
  /** Platform of the image, from its config. */
  platform: Platform;
}

const ACCEPT = [MEDIA_TYPES.ociIndex, MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerList, MEDIA_TYPES.dockerManifest].join(", ");
const INDEX_TYPES = new Set<string>([MEDIA_TYPES.ociIndex, MEDIA_TYPES.dockerList]);
const MANIFEST_TYPES = new Set<string>([MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerManifest]);
const CONFIG_TYPES = new Set<string>([MEDIA_TYPES.ociConfig, MEDIA_TYPES.dockerConfig]);
const SCHEMA1_TYPES = new Set(["application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws"]);
const MAX_INDEX_DEPTH = 4;

interface Desc {
  mediaType: string;
  digest: string;
  size: number;
  platform?: { os?: string; architecture?: string; variant?: string };
}

interface FetchedManifest {
  bytes: Buffer;
  digest: string;
  mediaType: string;
  kind: "index" | "manifest";
  json: Record<string, unknown>;
}

const sha256 = (b: Buffer) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

/** One registry repository, with its transport and authorization state. */
export class RegistryClient {
  readonly host: string;
  readonly transport: Transport;
  private readonly auth: Authenticator;
  private readonly scope: string;

  constructor(
    readonly ref: RegistryRef,
    opts: RegistryOptions,
  ) {
    this.host = apiHost(ref.registry);
    this.transport = new Transport(opts);
    this.auth = new Authenticator(this.host, this.transport, { ...opts, registry: ref.registry });
    this.scope = `repository:${ref.repository}:pull`;
  }

  close(): void {
    this.transport.close();
  }

  /** A request to the registry API with authorization (one challenge round). */
  async request(method: "GET" | "HEAD", path: string, headers: Record<string, string>): Promise<HttpResponse> {
    let authorization = await this.auth.authorization(this.scope);
    for (let round = 0; ; round++) {
      const res = await this.transport.send(
        { method, url: this.transport.registryUrl(this.host, path), headers: { ...headers, ...(authorization ? { Authorization: authorization } : {}) } },
        this.host,
      );
      if (res.status !== 401) return res;
      const challenge = res.header("www-authenticate");
      res.body.destroy();
      if (round === 0) {
        const next = await this.auth.onChallenge(challenge, this.scope, authorization);
        if (next !== undefined) {
          authorization = next;
          continue;
        }
      }
      throw await this.unauthorized(res);
    }
  }

  private async unauthorized(res: HttpResponse): Promise<RegistryError> {
    const creds = this.auth.usedCredentials ?? (await this.auth.getCredentials().catch(() => undefined));
    const name = `${this.ref.registry}/${this.ref.repository}`;
    const hint = creds
      ? `the credentials from ${creds.source} were not accepted for ${this.ref.registry}; run \`docker login ${this.ref.registry}\` again or fix that entry`
      : `no credentials for ${this.ref.registry} were found; run \`docker login ${this.ref.registry}\`, or add auths.${JSON.stringify(this.ref.registry)} to $DOCKER_CONFIG/config.json (~/.docker/config.json). The repository may also not exist`;
    return new RegistryError("REGISTRY_UNAUTHORIZED", `registry ${this.host} refused access to repository ${this.ref.repository} (${name}): ${res.status} ${res.statusText}`, { hint });
  }

  private async unexpected(res: HttpResponse, what: string): Promise<RegistryError> {
    const detail = await errorDetail(res);
    const after = res.attempts > 1 ? ` after ${res.attempts} attempts` : "";
    return new RegistryError(
      "REGISTRY_HTTP_ERROR",
      `registry ${res.url.host} answered ${res.status} ${res.statusText}${after} for ${what}${detail.message ? `: ${detail.message}` : ""}`,
      res.status >= 500 || res.status === 429 ? { hint: "the registry is failing or overloaded; try again later" } : {},
    );
  }

  private refString(reference: string): string {
    return `${this.ref.registry}/${this.ref.repository}${reference.startsWith("sha256:") ? "@" : ":"}${reference}`;
  }

  /** GETs a manifest or index and verifies it against `expectedDigest` (and Docker-Content-Digest). */
  async fetchManifest(reference: string, expectedDigest?: string): Promise<FetchedManifest> {
    const what = `manifest ${this.refString(reference)}`;
    let bytes: Buffer;
    let res: HttpResponse;
    for (let attempt = 1; ; attempt++) {
      res = await this.request("GET", `/v2/${this.ref.repository}/manifests/${reference}`, { Accept: ACCEPT });
      if (res.status === 404) throw await this.manifestUnknown(res, reference);
      if (res.status !== 200) throw await this.unexpected(res, what);
      try {
        bytes = await readBody(res, MAX_JSON_BYTES, what);
        break;
      } catch (err) {
        // The body broke off: ask again, like any other transient failure.
        if (err instanceof RegistryError) throw err;
        if (this.transport.signal?.aborted) throw aborted(this.transport.signal, err);
        if (attempt >= this.transport.tries) throw networkError(err, res.url.host, attempt);
        await this.transport.sleep(this.transport.backoff(attempt));
      }
    }
    const digest = sha256(bytes);
    if (expectedDigest !== undefined && digest !== expectedDigest) {
      throw new ImageError("IMAGE_DIGEST_MISMATCH", `${what}: content hashes to ${digest}, expected ${expectedDigest}`, {
        hint: "the registry served corrupt or substituted data; nothing was stored",
      });
    }
    const headerDigest = res.header("docker-content-digest");
    if (expectedDigest === undefined && headerDigest?.startsWith("sha256:") && headerDigest !== digest) {
      throw new ImageError("IMAGE_DIGEST_MISMATCH", `${what}: content hashes to ${digest}, the registry's Docker-Content-Digest says ${headerDigest}`, {
        hint: "the registry (or a proxy) served corrupt or substituted data; nothing was stored",
      });
    }
    let json: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse(bytes.toString("utf8"));
      if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new Error("not a JSON object");
      json = parsed as Record<string, unknown>;
    } catch (cause) {
      throw new RegistryError("REGISTRY_MANIFEST_INVALID", `${what} is not a JSON object`, { cause });
    }
    const contentType = (res.header("content-type") ?? "").split(";")[0]!.trim();
    const mediaType = typeof json.mediaType === "string" ? json.mediaType : contentType;
    if (json.schemaVersion === 1 || SCHEMA1_TYPES.has(mediaType)) {
      throw new RegistryError("REGISTRY_SCHEMA1_UNSUPPORTED", `${what} is a Docker schema 1 manifest, which is not supported`, {
        hint: "schema 1 is deprecated; push the image again with a current Docker or skopeo (they write schema 2 / OCI manifests)",
      });
    }
    let kind: "index" | "manifest";
    if (INDEX_TYPES.has(mediaType) || (!MANIFEST_TYPES.has(mediaType) && Array.isArray(json.manifests))) kind = "index";
    else if (MANIFEST_TYPES.has(mediaType) || (json.config !== undefined && Array.isArray(json.layers))) kind = "manifest";
    else {
      throw new RegistryError("REGISTRY_MANIFEST_INVALID", `${what} has media type ${JSON.stringify(mediaType)}, not an image manifest or index`, {
        hint: `supported: ${ACCEPT}`,
      });
    }
    const known = kind === "index" ? INDEX_TYPES.has(mediaType) : MANIFEST_TYPES.has(mediaType);
    return { bytes, digest, mediaType: known ? mediaType : kind === "index" ? MEDIA_TYPES.ociIndex : MEDIA_TYPES.ociManifest, kind, json };
  }

  /** HEADs a manifest: its digest and media type when the registry says, undefined when HEAD is not usable. */
  async headManifest(reference: string): Promise<{ digest: string; mediaType: string } | undefined> {
    const res = await this.request("HEAD", `/v2/${this.ref.repository}/manifests/${reference}`, { Accept: ACCEPT });
    res.body.resume();
    if (res.status === 404) throw await this.manifestUnknown(res, reference);
    const digest = res.header("docker-content-digest");
    const mediaType = (res.header("content-type") ?? "").split(";")[0]!.trim();
    if (res.status !== 200 || !digest || !isValidDigest(digest)) return undefined;
    return { digest, mediaType };
  }

  private async manifestUnknown(res: HttpResponse, reference: string): Promise<RegistryError> {
    const detail = res.body.readableEnded ? {} : await errorDetail(res);
    const ref = this.refString(reference);
    return new RegistryError("REGISTRY_MANIFEST_UNKNOWN", `manifest unknown: ${ref} not found in registry ${this.host}${detail.message ? ` (${detail.message})` : ""}`, {
      hint: reference.startsWith("sha256:") ? "check the digest" : `check the repository name and tag (${this.ref.repository}:${reference})`,
    });
  }

  /** Opens the stream of blob `digest` (redirects followed). */
  async openBlob(digest: string, what: string): Promise<Readable> {
    const res = await this.request("GET", `/v2/${this.ref.repository}/blobs/${digest}`, {});
    if (res.status === 200) return res.body;
    if (res.status === 404) {
      res.body.destroy();
      throw new RegistryError("REGISTRY_BLOB_UNKNOWN", `blob unknown: ${what} not found in registry ${res.url.host}`, {
        hint: "the registry is missing a blob its manifest refers to; the image may be incomplete there",
      });
    }
    throw await this.unexpected(res, what);
  }
}

function wantedPlatform(opts: RegistryOptions): Platform {
  return opts.platform ?? { os: TARGET_PLATFORM.os, architecture: TARGET_PLATFORM.architecture };
}

export function platformString(p: { os?: string | undefined; architecture?: string | undefined; variant?: string | undefined }): string {
  return `${p.os ?? "?"}/${p.architecture ?? "?"}${p.variant ? `/${p.variant}` : ""}`;
}

const normVariant = (arch: string | undefined, variant: string | undefined) => (arch === "arm64" && (variant === undefined || variant === "") ? "v8" : variant || undefined);

/** Picks the entry of an index for `want`; errors list what is there. */
export function selectPlatform(index: Record<string, unknown>, want: Platform, what: string): Desc {
  const list = Array.isArray(index.manifests) ? index.manifests : undefined;
  if (!list) throw new RegistryError("REGISTRY_MANIFEST_INVALID", `${what} has no "manifests" array`);
  const descs = list.map((m, i) => toDesc(m, `manifests[${i}] of ${what}`));
  const matching = descs.filter((d) => d.platform?.os === want.os && d.platform?.architecture === want.architecture);
  const wantVariant = normVariant(want.architecture, want.variant);
  const exact = matching.filter((d) => normVariant(d.platform?.architecture, d.platform?.variant) === wantVariant);
  const pick = exact[0] ?? (want.variant === undefined ? matching[0] : undefined);
  if (pick) return pick;
  if (descs.length === 1 && descs[0]!.platform === undefined) return descs[0]!;
  const available = descs.filter((d) => d.platform && d.platform.os !== "unknown").map((d) => platformString(d.platform!));
  throw new RegistryError("REGISTRY_PLATFORM_UNAVAILABLE", `${what} has no ${platformString(want)} image; available platforms: ${available.join(", ") || "(none)"}`, {
    hint: "pick one of the available platforms (option `platform`), or use an image built for this one",
  });
}

function toDesc(raw: unknown, what: string): Desc {
  const d = raw as Partial<Desc> | null;
  if (typeof d !== "object" || d === null || typeof d.mediaType !== "string" || typeof d.size !== "number" || !Number.isSafeInteger(d.size) || d.size < 0) {
    throw new RegistryError("REGISTRY_MANIFEST_INVALID", `${what} is not a valid descriptor (needs mediaType, digest, size)`);
  }
  if (!isValidDigest(d.digest)) {
    throw new RegistryError("REGISTRY_MANIFEST_INVALID", `${what} has digest ${JSON.stringify(d.digest)}, which is not of the form sha256:<64 hex>`, {
      hint: "only sha256 digests are supported",
    });
  }
  const out: Desc = { mediaType: d.mediaType, digest: d.digest, size: d.size };
  if (d.platform && typeof d.platform === "object") out.platform = d.platform;
  return out;
}

/** Follows indexes from `reference` down to an image manifest for the wanted platform. */
async function resolveManifest(
  client: RegistryClient,
  reference: string,
  expected: string | undefined,
  want: Platform,
  onIndex?: (m: FetchedManifest) => Promise<void>,
): Promise<{ manifest: FetchedManifest; indexDigest?: string }> {
  let m = await client.fetchManifest(reference, expected);
  let indexDigest: string | undefined;
  for (let depth = 0; m.kind === "index"; depth++) {
    if (depth >= MAX_INDEX_DEPTH) throw new RegistryError("REGISTRY_MANIFEST_INVALID", `${client.ref.canonical}: image indexes nest deeper than ${MAX_INDEX_DEPTH} levels`);
    indexDigest ??= m.digest;
    await onIndex?.(m);
    const desc = selectPlatform(m.json, want, `index ${m.digest} of ${client.ref.canonical}`);
    m = await client.fetchManifest(desc.digest, desc.digest);
  }
  return indexDigest !== undefined ? { manifest: m, indexDigest } : { manifest: m };
}

function describeCause(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Runs `fn` over `items` with at most `limit` at a time; the first failure aborts the rest. */
async function pool<T>(items: T[], limit: number, fn: (item: T, i: number) => Promise<void>): Promise<void> {
  let next = 0;
  let failed: { err: unknown } | undefined;
  const worker = async () => {
    while (!failed && next < items.length) {
      const i = next++;
      try {
        await fn(items[i]!, i);
      } catch (err) {
        failed ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  if (failed) throw failed.err;
}

/**
 * Pulls `ref` into `opts.store`: the manifest (and index), the config and the layers, each
 * verified. Blobs already in the store are not downloaded again.
 */
export async function pullImage(ref: RegistryRef, opts: PullOptions): Promise<PullResult> {
  const inner = new AbortController();
  const client = new RegistryClient(ref, { ...opts, signal: inner.signal });
  const onAbort = () => inner.abort(opts.signal?.reason);
  if (opts.signal?.aborted) onAbort();
  opts.signal?.addEventListener("abort", onAbort, { once: true });
  const store = opts.store;
  const want = wantedPlatform(opts);
  const progress = opts.onProgress ?? (() => {});
  let downloaded = 0;
  try {
    const reference = ref.digest ?? ref.tag ?? "latest";
    progress({ type: "manifest", ref: ref.canonical });
    const { manifest, indexDigest } = await resolveManifest(client, reference, ref.digest, want, async (index) => {
      await store.putBytes(index.bytes, `index ${index.digest} of ${ref.canonical}`);
    });
    const what = `manifest ${manifest.digest} of ${ref.canonical}`;
    const config = toDesc(manifest.json.config, `config of ${what}`);
    if (!CONFIG_TYPES.has(config.mediaType)) {
      throw new RegistryError("REGISTRY_MANIFEST_INVALID", `${ref.canonical}: config ${config.digest} has media type ${JSON.stringify(config.mediaType)}, not a container image config`, {
        hint: "this looks like an OCI artifact rather than a runnable image",
      });
    }
    if (config.size > MAX_JSON_BYTES) {
      throw new RegistryError("REGISTRY_MANIFEST_INVALID", `${ref.canonical}: config ${config.digest} is ${config.size} bytes, more than the ${MAX_JSON_BYTES}-byte limit`);
    }
    if (!Array.isArray(manifest.json.layers)) throw new RegistryError("REGISTRY_MANIFEST_INVALID", `${what} has no "layers" array`);
    const layers = manifest.json.layers.map((l, i) => toDesc(l, `layer ${i} of ${what}`));
    await store.putBytes(manifest.bytes, what);

    // Config first: it says which platform the image is for.
    const configWhat = `config ${config.digest} of ${ref.canonical}`;
    const configCached = await store.has(config.digest, config.size);
    if (!configCached) downloaded += await fetchBlob(client, store, config, configWhat, inner.signal);
    progress({ type: "config", digest: config.digest, cached: configCached });
    const platform = await readPlatform(store, config.digest, configWhat);
    // A config without os/architecture is taken to be what was asked for.
    if (platform.os === "") platform.os = want.os;
    if (platform.architecture === "") platform.architecture = want.architecture;
    if (platform.os !== want.os || platform.architecture !== want.architecture) {
      throw new RegistryError("REGISTRY_PLATFORM_UNAVAILABLE", `${ref.canonical} has no ${platformString(want)} image; available platforms: ${platformString(platform)}`, {
        hint: "pick the image's platform (option `platform`), or use an image built for this one",
      });
    }

    const count = layers.length;
    const pullLayer = async (layer: Desc, index: number): Promise<void> => {
      const base = { type: "layer" as const, digest: layer.digest, index, count, total: layer.size };
      if (await store.has(layer.digest, layer.size)) {
        progress({ ...base, bytes: layer.size, cached: true });
        return;
      }
      progress({ ...base, bytes: 0, cached: false });
      downloaded += await fetchBlob(client, store, layer, `layer ${layer.digest} of ${ref.canonical}`, inner.signal, (bytes) =>
        progress({ ...base, bytes, cached: false }),
      );
    };
    await pool(layers, opts.concurrency ?? 3, async (layer, index) => {
      try {
        await pullLayer(layer, index);
      } catch (err) {
        inner.abort(err); // stop the other downloads: the pull has failed
        throw err;
      }
    });
    progress({ type: "done", bytes: downloaded });
    const result: PullResult = {
      manifestDigest: manifest.digest,
      mediaType: manifest.mediaType,
      configDigest: config.digest,
      layers: layers.map((l) => ({ digest: l.digest, size: l.size, mediaType: l.mediaType })),
      registry: ref.registry,
      repository: ref.repository,
      platform,
    };
    if (indexDigest !== undefined) result.indexDigest = indexDigest;
    return result;
  } catch (err) {
    inner.abort(err);
    if (opts.signal?.aborted) throw err instanceof RegistryError && err.code === "REGISTRY_ABORTED" ? err : aborted(opts.signal, err);
    throw err;
  } finally {
    opts.signal?.removeEventListener("abort", onAbort);
    client.close();
  }
}

/** Downloads one blob into the store, retrying from scratch when the transfer breaks off. Returns the bytes fetched. */
async function fetchBlob(client: RegistryClient, store: BlobStore, desc: Desc, what: string, signal: AbortSignal, onBytes?: (n: number) => void): Promise<number> {
  const tries = client.transport.tries;
  for (let attempt = 1; ; attempt++) {
    try {
      await store.ingest(desc.digest, () => client.openBlob(desc.digest, what), {
        size: desc.size,
        what,
        signal,
        ...(onBytes ? { onBytes } : {}),
      });
      return desc.size;
    } catch (err) {
      if (signal.aborted) throw err;
      const broken = err instanceof SupermachineError && err.code === "IMAGE_BLOB_TRUNCATED";
      if (!broken || attempt >= tries) throw err;
      log("%s: %s; downloading again (attempt %d)", what, describeCause(err), attempt + 1);
      onBytes?.(0);
      await client.transport.sleep(client.transport.backoff(attempt));
    }
  }
}

async function readPlatform(store: BlobStore, digest: string, what: string): Promise<Platform> {
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(store.path(digest), "utf8"));
  } catch (cause) {
    throw new RegistryError("REGISTRY_MANIFEST_INVALID", `${what} is not valid JSON`, { cause });
  }
  const c = (typeof raw === "object" && raw !== null ? raw : {}) as Record<string, unknown>;
  const p: Platform = { os: typeof c.os === "string" ? c.os : "", architecture: typeof c.architecture === "string" ? c.architecture : "" };
  if (typeof c.variant === "string" && c.variant) p.variant = c.variant;
  return p;
}

/**
 * The digest of the image manifest `ref` points at now, for the wanted platform — what a pull
 * would fetch. Uses HEAD when the registry answers it with a digest, GET otherwise.
 */
export async function resolveDigest(ref: RegistryRef, opts: RegistryOptions = {}): Promise<string> {
  const client = new RegistryClient(ref, opts);
  const want = wantedPlatform(opts);
  try {
    const reference = ref.digest ?? ref.tag ?? "latest";
    const head = await client.headManifest(reference);
    if (head && MANIFEST_TYPES.has(head.mediaType) && (ref.digest === undefined || head.digest === ref.digest)) return head.digest;
    let m = await client.fetchManifest(reference, ref.digest);
    for (let depth = 0; m.kind === "index"; depth++) {
      const desc = selectPlatform(m.json, want, `index ${m.digest} of ${ref.canonical}`);
      if (depth + 1 >= MAX_INDEX_DEPTH || !INDEX_TYPES.has(desc.mediaType)) return desc.digest;
      m = await client.fetchManifest(desc.digest, desc.digest);
    }
    return m.digest;
  } catch (err) {
    if (opts.signal?.aborted && !(err instanceof RegistryError && err.code === "REGISTRY_ABORTED")) throw aborted(opts.signal, err);
    throw err;
  } finally {
    client.close();
  }
}
