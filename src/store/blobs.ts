/**
 * The shared, content-addressed blob store: manifests, configs and layers of every image that
 * came from a registry or an archive, each stored once under its digest, whatever image uses
 * it. The store directory is itself an OCI image layout (`oci-layout`, `blobs/sha256/<hex>`), so
 * the layout reader serves pulled images too.
 *
 * A blob appears only by renaming a fully written, fsynced temp file (in `tmp/`) whose content
 * hashed to its name; two processes ingesting the same digest take turns (a lock in `locks/`)
 * and the second one reuses the first one's result (store/publish.ts).
 */
import { createHash } from "node:crypto";
import { createWriteStream, existsSync, mkdirSync, writeFileSync } from "node:fs";
import { open, readdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { Readable } from "node:stream";
import { ImageError } from "../errors.js";
import { homePaths } from "../paths.js";
import { isValidDigest } from "../oci/oci-layout.js";
import { publish } from "./publish.js";

export interface IngestOptions {
  /** Expected size in bytes, when the descriptor says. */
  size?: number;
  /** Refuse a blob larger than this (defaults to `size` when given). */
  maxBytes?: number;
  /** Called with the byte count as it grows (progress). */
  onBytes?: (bytes: number) => void;
  /** What the blob is, for error messages: "layer sha256:... of docker.io/library/alpine:3". */
  what: string;
  /** Aborts a wait for another process writing the same blob (rejecting with its reason). */
  signal?: AbortSignal;
}

export class BlobStore {
  readonly blobsDir: string;
  private readonly tmpDir: string;
  private readonly locksDir: string;

  constructor(readonly root: string) {
    this.blobsDir = join(root, "blobs", "sha256");
    this.tmpDir = join(root, "tmp");
    this.locksDir = join(root, "locks");
  }

  static open(home?: string): BlobStore {
    const store = new BlobStore(homePaths(home).store);
    store.init();
    return store;
  }

  private init(): void {
    for (const d of [this.blobsDir, this.tmpDir, this.locksDir]) mkdirSync(d, { recursive: true });
    const marker = join(this.root, "oci-layout");
    if (!existsSync(marker)) writeFileSync(marker, JSON.stringify({ imageLayoutVersion: "1.0.0" }) + "\n");
  }

  path(digest: string): string {
    if (!isValidDigest(digest)) throw new ImageError("IMAGE_DIGEST_INVALID", `${JSON.stringify(digest)} is not a sha256 digest`);
    return join(this.blobsDir, digest.slice("sha256:".length));
  }

  /** True when the blob is present (and has `size` bytes, when given). */
  async has(digest: string, size?: number): Promise<boolean> {
    try {
      const st = await stat(this.path(digest));
      return st.isFile() && (size === undefined || st.size === size);
    } catch {
      return false;
    }
  }

  /**
   * Stores the blob `digest`, reading it from `openSource()` only if it is not already here.
   * The content is hashed and counted while it streams; a mismatch or an overrun fails with
   * nothing left behind.
   */
  async ingest(digest: string, openSource: () => Promise<Readable | AsyncIterable<Buffer>>, opts: IngestOptions): Promise<string> {
    const final = this.path(digest);
    const hex = digest.slice("sha256:".length);
    const { value } = await publish({
      target: final,
      kind: "file",
      what: opts.what,
      check: async () => ((await this.has(digest, opts.size)) ? final : undefined),
      write: async (tmp) => {
        await this.writeVerified(tmp, await openSource(), digest, opts);
        return final;
      },
      lockPath: join(this.locksDir, `${hex}.lock`),
      tmpDir: this.tmpDir,
      tmpPrefix: `${hex}-`,
      synced: true, // writeVerified fsyncs
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    return value;
  }

  /** Stores a small blob held in memory (manifests, configs); returns its digest. */
  async putBytes(data: Buffer, what: string): Promise<string> {
    const digest = `sha256:${createHash("sha256").update(data).digest("hex")}`;
    await this.ingest(digest, async () => Readable.from([data]), { size: data.length, what });
    return digest;
  }

  private async writeVerified(tmp: string, source: Readable | AsyncIterable<Buffer>, digest: string, opts: IngestOptions): Promise<void> {
    const limit = opts.maxBytes ?? opts.size ?? Infinity;
    const hash = createHash("sha256");
    let bytes = 0;
    const out = createWriteStream(tmp, { flags: "wx" });
    const closed = new Promise<void>((res, rej) => {
      out.once("close", res);
      out.once("error", rej);
    });
    try {
      for await (const chunk of source as AsyncIterable<Buffer>) {
        bytes += chunk.length;
        if (bytes > limit) {
          throw new ImageError("IMAGE_BLOB_TOO_LARGE", `${opts.what}: more than ${limit} bytes${opts.size !== undefined ? ` (its descriptor says ${opts.size})` : ""}`);
        }
        hash.update(chunk);
        if (!out.write(chunk)) await new Promise<void>((r) => out.once("drain", () => r()));
        opts.onBytes?.(bytes);
      }
    } catch (err) {
      out.destroy();
      await closed.catch(() => {});
      if (err instanceof ImageError) throw err;
      throw new ImageError("IMAGE_BLOB_TRUNCATED", `${opts.what}: transfer failed after ${bytes} bytes: ${(err as Error).message}`, { cause: err });
    }
    out.end();
    await closed;
    if (opts.size !== undefined && bytes !== opts.size) {
      throw new ImageError("IMAGE_BLOB_TRUNCATED", `${opts.what}: got ${bytes} bytes, its descriptor says ${opts.size}`);
    }
    const actual = `sha256:${hash.digest("hex")}`;
    if (actual !== digest) {
      throw new ImageError("IMAGE_DIGEST_MISMATCH", `${opts.what}: content hashes to ${actual}, expected ${digest}`, {
        hint: "the source served corrupt or substituted data; nothing was stored",
      });
    }
    const fh = await open(tmp, "r");
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
  }

  /** Every blob digest in the store. */
  async list(): Promise<string[]> {
    return (await readdir(this.blobsDir)).filter((n) => /^[a-f0-9]{64}$/.test(n)).map((n) => `sha256:${n}`);
  }

  /** Removes temp files older than `ageMs` (left by crashed writers). */
  async sweepTemps(ageMs = 60 * 60_000): Promise<void> {
    const now = Date.now();
    for (const name of await readdir(this.tmpDir)) {
      const p = join(this.tmpDir, name);
      const st = await stat(p).catch(() => undefined);
      if (st && now - st.mtimeMs > ageMs) await rm(p, { force: true });
    }
  }
}
