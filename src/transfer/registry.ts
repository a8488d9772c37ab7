/**
 * A snapshot cache in a registry repository: one tag per snapshot (`sm-<key>`), and for every
 * image whose root filesystem a snapshot carries, a tag `sm-image-<manifest hex>` on one such
 * snapshot (so a machine can restore the image before it knows any snapshot key), and a tag
 * `sm-recipe-<recipe key>` on the snapshot last exported for that recipe (so a machine whose key
 * misses can tell that the cache has the image for another host). Credentials,
 * TLS and the insecure/loopback rules are those of pulls (src/registry/).
 */
import type { RegistryOptions } from "../registry/client.js";
import { join } from "node:path";
import { homePaths } from "../paths.js";
import { PushClient } from "../registry/push.js";
import { fileUploadJournal } from "../registry/upload-journal.js";
import type { CacheBackend } from "./backend.js";
import { ANNOTATIONS, imageTagOf, LIMITS, MEDIA, recipeTagOf, tagOf, type ArtifactManifest } from "./format.js";

export class RegistryBackend implements CacheBackend {
  readonly kind = "registry" as const;
  readonly parallelism = 4;
  readonly location: string;
  private readonly client: PushClient;

  private readonly signal: AbortSignal | undefined;

  constructor(registry: string, repository: string, opts: RegistryOptions & { signal?: AbortSignal }) {
    // Upload sessions are remembered in the home for a day: a push killed mid-pack and run again
    // goes on with the same session where the registry still holds it.
    this.client = new PushClient({ registry, repository }, { ...opts, journal: fileUploadJournal(join(homePaths().home, "transfer", "uploads")) });
    this.signal = opts.signal;
    this.location = `${registry}/${repository}`;
  }

  close(): void {
    this.client.close();
  }

  blobSize(digest: string): Promise<number | undefined> {
    return this.client.blobSize(digest);
  }

  async writeBlob(digest: string, data: Buffer): Promise<void> {
    await this.client.uploadBlob(digest, data, this.signal ? { signal: this.signal } : {});
  }

  readBlob(digest: string, limit: number, what: string): Promise<Buffer | undefined> {
    return this.client.getBlob(digest, limit, what);
  }

  readRange(digest: string, start: number, end: number, limit: number, what: string): Promise<{ bytes: Buffer; start: number } | undefined> {
    return this.client.getBlobRange(digest, start, end, limit, what);
  }

  prepareUploads(n: number): void {
    this.client.prestartUploads(n);
  }

  finish(): Promise<void> {
    return this.client.cancelSpareUploads();
  }

  get requests(): number {
    return this.client.transport.requests;
  }

  async readManifest(key: string): Promise<Buffer | undefined> {
    return (await this.client.getManifest(tagOf(key), MEDIA.manifest, LIMITS.manifestBytes))?.bytes;
  }

  async readImageManifest(imageDigest: string): Promise<Buffer | undefined> {
    return (await this.client.getManifest(imageTagOf(imageDigest), MEDIA.manifest, LIMITS.manifestBytes))?.bytes;
  }

  async readRecipeManifest(recipeKey: string): Promise<Buffer | undefined> {
    return (await this.client.getManifest(recipeTagOf(recipeKey), MEDIA.manifest, LIMITS.manifestBytes))?.bytes;
  }

  async writeManifest(key: string, bytes: Buffer, manifest: ArtifactManifest, opts: { tagImage: boolean; recipeKey?: string | undefined }): Promise<void> {
    await this.client.putManifest(tagOf(key), bytes, MEDIA.manifest);
    if (opts.recipeKey) await this.client.putManifest(recipeTagOf(opts.recipeKey), bytes, MEDIA.manifest);
    const image = manifest.annotations[ANNOTATIONS.image];
    // Always (re)pointed at a current artifact: an older one may be of an earlier format.
    if (opts.tagImage && image) {
      await this.client.putManifest(imageTagOf(image), bytes, MEDIA.manifest);
    }
  }
}
