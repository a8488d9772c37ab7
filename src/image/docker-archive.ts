/**
 * Imports a `docker save` archive (`docker-archive:<file.tar>[:<name:tag>]`) into the shared
 * blob store, as an OCI image: layers and config stored as they are in the archive, plus a
 * synthesized OCI image manifest whose digest names the image from then on.
 *
 * Both archive forms are read:
 *   - legacy (docker < 25, skopeo): `manifest.json`, `<hex>.json` config, `<id>/layer.tar` or
 *     `<hex>.tar` layers (uncompressed), some of them symlinks to others;
 *   - OCI-style (docker >= 25): the same `manifest.json`, with `blobs/sha256/<hex>` paths, whose
 *     content must hash to `<hex>`; layers may be gzip- or zstd-compressed.
 * The archive itself may be gzip- or zstd-compressed (`docker save | gzip`).
 *
 * The archive is read twice, streaming, never unpacked: pass 1 finds `manifest.json` (which
 * docker writes last) and hashes every file; pass 2 streams the config and the selected image's
 * layers into the blob store, which verifies each against its pass-1 digest. Paths inside the
 * archive are checked: an entry name or link target with a `..` that leaves the archive, or an
 * absolute link target, makes the archive invalid.
 *
 * The synthesized manifest carries no name or date, so importing the same image twice (from
 * any archive, under any tag) gives the same manifest digest, and the same cached rootfs.
 *
 * Error codes: IMAGE_ARCHIVE_NOT_FOUND (cannot open the file), IMAGE_ARCHIVE_INVALID (not a
 * tar, truncated, bad manifest.json or config, missing or escaping paths, content that does not
 * match its digest or diff_id), IMAGE_ARCHIVE_AMBIGUOUS (several images and no name given),
 * IMAGE_ARCHIVE_TAG_NOT_FOUND (no image has the given name), IMAGE_LAYER_COMPRESSION_UNSUPPORTED,
 * and the blob store's errors.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { posix } from "node:path";
import type { Readable } from "node:stream";
import tar from "tar-stream";
import { ImageError, SupermachineError } from "../errors.js";
import { logger } from "../debug.js";
import type { BlobStore } from "../store/blobs.js";
import { decompressStream, detectCompression, layerMediaType, MAGIC_BYTES, readHead, type Compression } from "./decompress.js";
import { parseDockerRef } from "../oci/docker-ref.js";
import { MAX_JSON_BYTES, MEDIA_TYPES, parseImageConfig, type ImageConfig } from "../oci/oci-layout.js";

const log = logger("image");

/** Most entries an archive may hold (docker save writes about four per layer). */
const MAX_ARCHIVE_ENTRIES = 1_000_000;
/** Most symlink/hardlink hops followed inside an archive. */
const MAX_LINK_HOPS = 16;
const BLOB_PATH_RE = /^blobs\/sha256\/([a-f0-9]{64})$/;

export interface ImportDockerArchiveOptions {
  /**
   * Which image to import when the archive holds several: a name matched against the RepoTags
   * after normalisation (`busybox` = `busybox:latest` = `docker.io/library/busybox:latest`), or
   * `@<n>`, the n-th image of manifest.json (as skopeo's docker-archive source index).
   */
  name?: string;
  store: BlobStore;
  /** The reference being resolved, for error messages. */
  ref: string;
}

export interface ImportedDockerArchive {
  /** Digest of the synthesized OCI image manifest, now in the blob store. */
  manifestDigest: string;
  config: ImageConfig;
  /** RepoTags of the imported image, as written in the archive. */
  repoTags: string[];
}

/** A regular file of the archive, as seen in pass 1. */
interface ArchiveFile {
  kind: "file";
  /** Position in the archive (0-based entry index). */
  index: number;
  name: string;
  size: number;
  digest: string;
  head: Buffer;
}

interface ArchiveLink {
  kind: "link";
  name: string;
  /** Normalized path of the target inside the archive. */
  target: string;
}

interface ManifestEntry {
  Config: string;
  RepoTags: string[];
  Layers: string[];
}

interface Scan {
  files: Map<string, ArchiveFile | ArchiveLink>;
  manifest: Buffer | undefined;
}

interface LayerPlan {
  file: ArchiveFile;
  compression: Compression;
}

/**
 * Imports the image `opts.name` (or the only image) of the docker archive `file` into
 * `opts.store`; returns the digest of the synthesized OCI manifest, the config and the tags.
 */
export async function importDockerArchive(file: string, opts: ImportDockerArchiveOptions): Promise<ImportedDockerArchive> {
  const ctx = new Ctx(file, opts.ref);
  const archiveCompression = await ctx.compression();

  // Pass 1: find manifest.json, hash every file.
  const scan = await ctx.scan(archiveCompression);
  if (!scan.manifest) throw ctx.invalid("it has no manifest.json (is it a `docker save` archive?)");
  const entries = parseManifest(scan.manifest, ctx);
  const { entry, index } = pickEntry(entries, opts.name, ctx);
  const what = entry.RepoTags.length ? entry.RepoTags.join(", ") : `image #${index}`;

  const configFile = ctx.resolve(scan.files, entry.Config, `the config of ${what}`);
  if (configFile.size > MAX_JSON_BYTES) throw ctx.invalid(`the config ${configFile.name} is ${configFile.size} bytes, more than the ${MAX_JSON_BYTES}-byte limit`);
  const layers: LayerPlan[] = entry.Layers.map((path, i) => {
    const f = ctx.resolve(scan.files, path, `layer ${i} of ${what}`);
    const compression = detectCompression(f.head, `${ctx.what}: layer ${f.name}`);
    return { file: f, compression };
  });
  for (const f of [configFile, ...layers.map((l) => l.file)]) {
    const hex = BLOB_PATH_RE.exec(f.name)?.[1];
    if (hex !== undefined && `sha256:${hex}` !== f.digest) {
      throw ctx.invalid(`its blob ${f.name} hashes to ${f.digest}; the archive is corrupt`);
    }
  }

  // Pass 2: stream the config and the layers into the store.
  const configData = await ctx.ingest(archiveCompression, configFile, layers.map((l) => l.file), opts.store);
  const configDigest = `sha256:${createHash("sha256").update(configData).digest("hex")}`;
  if (configDigest !== configFile.digest) throw ctx.invalid(`${configFile.name} changed while it was being read`);
  let raw: unknown;
  try {
    raw = JSON.parse(configData.toString("utf8"));
  } catch (cause) {
    throw ctx.invalid(`its config ${configFile.name} is not valid JSON`, cause);
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw ctx.invalid(`its config ${configFile.name} is not a JSON object`);
  const rawConfig = raw as Record<string, unknown>;
  checkDiffIds(rawConfig, layers, configFile, ctx);
  const config = parseImageConfig(rawConfig.config, opts.ref, `${file}:${configFile.name}`);

  await opts.store.putBytes(configData, `config ${configDigest} of ${ctx.what}`);
  const manifest = {
    schemaVersion: 2,
    mediaType: MEDIA_TYPES.ociManifest,
    config: { mediaType: MEDIA_TYPES.ociConfig, digest: configDigest, size: configData.length },
    layers: layers.map((l) => ({ mediaType: layerMediaType(l.compression), digest: l.file.digest, size: l.file.size })),
  };
  const manifestDigest = await opts.store.putBytes(Buffer.from(JSON.stringify(manifest)), `manifest of ${ctx.what}`);
  log("imported %s (%s) from %s as %s", what, opts.ref, file, manifestDigest);
  return { manifestDigest, config, repoTags: [...entry.RepoTags] };
}

/** Per-import context: the file, error helpers and the two passes. */
class Ctx {
  readonly what: string;
  constructor(
    readonly file: string,
    readonly ref: string,
  ) {
    this.what = `docker archive ${file} (for ${JSON.stringify(ref)})`;
  }

  invalid(why: string, cause?: unknown): ImageError {
    return new ImageError("IMAGE_ARCHIVE_INVALID", `${this.what} is invalid: ${why}`, {
      ...(cause !== undefined ? { cause } : {}),
      hint: "write it again with `docker save` or `skopeo copy ... docker-archive:<file>`",
    });
  }

  /** Compression of the archive file itself. */
  async compression(): Promise<Compression> {
    let head: Buffer;
    try {
      head = await readHead(this.file, MAGIC_BYTES);
    } catch (cause) {
      throw new ImageError("IMAGE_ARCHIVE_NOT_FOUND", `cannot read docker archive ${this.file} (for ${JSON.stringify(this.ref)}): ${(cause as Error).message}`, {
        cause,
        hint: "docker-archive:<file> names a tar written by `docker save` (or `skopeo copy ... docker-archive:<file>`)",
      });
    }
    return detectCompression(head, this.what);
  }

  /**
   * Calls `fn` for each entry of the archive, in order, with its normalized name; tar and
   * decompression errors (also those surfacing while `fn` reads an entry) become
   * IMAGE_ARCHIVE_INVALID. `fn` must consume or resume the entry.
   */
  private async forEach(compression: Compression, fn: (entry: TarEntry, name: string, index: number) => Promise<void>): Promise<void> {
    const body = decompressStream(createReadStream(this.file), compression, { what: this.what });
    const extract = tar.extract();
    body.on("error", (err) => extract.destroy(err));
    body.pipe(extract as unknown as NodeJS.WritableStream);
    let index = 0;
    let last: string | undefined;
    try {
      for await (const entry of extract) {
        if (index >= MAX_ARCHIVE_ENTRIES) throw this.invalid(`it has more than ${MAX_ARCHIVE_ENTRIES} entries`);
        const raw = entry.header.name;
        const name = archivePath(raw);
        if (name === null) throw this.invalid(`its entry ${JSON.stringify(raw)} has a path that leaves the archive`);
        last = name;
        await fn(entry, name, index++);
      }
    } catch (err) {
      body.destroy();
      extract.destroy();
      if (err instanceof SupermachineError) throw err;
      const where = last === undefined ? "before the first entry" : `at or after entry ${JSON.stringify(last)}`;
      throw this.invalid(`it is not a valid ${compression === "none" ? "" : `${compression}-compressed `}tar archive (${(err as Error).message}, ${where})`, err);
    }
  }

  /** Pass 1: every file's size, sha256 and first bytes; the content of manifest.json. */
  async scan(compression: Compression): Promise<Scan> {
    const files = new Map<string, ArchiveFile | ArchiveLink>();
    let manifest: Buffer | undefined;
    await this.forEach(compression, async (entry, name, index) => {
      const h = entry.header;
      if (h.type === "file" || h.type === "contiguous-file") {
        const hash = createHash("sha256");
        const head: Buffer[] = [];
        let headBytes = 0;
        let size = 0;
        const keep = name === "manifest.json" ? ([] as Buffer[]) : undefined;
        for await (const chunk of entry as AsyncIterable<Buffer>) {
          hash.update(chunk);
          size += chunk.length;
          if (headBytes < MAGIC_BYTES) {
            head.push(chunk.subarray(0, MAGIC_BYTES - headBytes));
            headBytes += Math.min(chunk.length, MAGIC_BYTES - headBytes);
          }
          if (keep) {
            if (size > MAX_JSON_BYTES) throw this.invalid(`its manifest.json is larger than ${MAX_JSON_BYTES} bytes`);
            keep.push(chunk);
          }
        }
        if (keep) manifest = Buffer.concat(keep);
        files.set(name, { kind: "file", index, name, size, digest: `sha256:${hash.digest("hex")}`, head: Buffer.concat(head) });
        return;
      }
      entry.resume();
      if (h.type === "symlink" || h.type === "link") {
        const linkname = h.linkname ?? "";
        // A symlink is relative to its directory, a hardlink to the archive root.
        const target = h.type === "symlink" ? (linkname.startsWith("/") ? null : archivePath(posix.join(posix.dirname(name), linkname))) : archivePath(linkname);
        if (target === null || target === "") {
          throw this.invalid(`its entry ${JSON.stringify(name)} links to ${JSON.stringify(linkname)}, outside the archive`);
        }
        files.set(name, { kind: "link", name, target });
      } else {
        files.delete(name); // a directory or special file replaces an earlier file of that name
      }
    });
    return { files, manifest };
  }

  /** Follows links from a manifest.json path to a regular file of the archive. */
  resolve(files: Map<string, ArchiveFile | ArchiveLink>, path: string, what: string): ArchiveFile {
    const start = archivePath(path);
    if (start === null || start === "") throw this.invalid(`manifest.json names ${what} as ${JSON.stringify(path)}, a path outside the archive`);
    let name = start;
    for (let hops = 0; hops <= MAX_LINK_HOPS; hops++) {
      const f = files.get(name);
      if (!f) throw this.invalid(`manifest.json names ${what} as ${JSON.stringify(path)}, which is not in the archive${name !== start ? ` (it links to ${JSON.stringify(name)})` : ""}`);
      if (f.kind === "file") return f;
      name = f.target;
    }
    throw this.invalid(`${JSON.stringify(path)} (${what}) goes through more than ${MAX_LINK_HOPS} links`);
  }

  /** Pass 2: stores the layers in the blob store (verifying each digest); returns the config bytes. */
  async ingest(compression: Compression, config: ArchiveFile, layers: ArchiveFile[], store: BlobStore): Promise<Buffer> {
    const wanted = new Map<number, ArchiveFile>(layers.map((f) => [f.index, f]));
    let configData: Buffer | undefined;
    await this.forEach(compression, async (entry, name, index) => {
      const layer = wanted.get(index);
      if (index === config.index) {
        if (name !== config.name) throw this.invalid("it changed while it was being read");
        const chunks: Buffer[] = [];
        let size = 0;
        for await (const chunk of entry as AsyncIterable<Buffer>) {
          size += chunk.length;
          if (size > MAX_JSON_BYTES) throw this.invalid(`${config.name} changed while it was being read`);
          chunks.push(chunk);
        }
        configData = Buffer.concat(chunks);
      } else if (layer) {
        if (name !== layer.name) throw this.invalid("it changed while it was being read");
        wanted.delete(index);
        let opened = false;
        await store.ingest(
          layer.digest,
          async () => {
            opened = true;
            return entry as unknown as Readable;
          },
          { size: layer.size, what: `layer ${layer.digest} (${layer.name}) of ${this.what}` },
        );
        if (!opened) entry.resume(); // already stored
      } else {
        entry.resume();
      }
    });
    if (configData === undefined || wanted.size > 0) throw this.invalid("it changed while it was being read (entries disappeared)");
    return configData;
  }
}

type TarEntry = tar.Extract extends AsyncIterable<infer S> ? S : never;

/**
 * Normalizes a path inside the archive: strips `./` and leading `/`, resolves `.` and `..`;
 * null when `..` would leave the archive root.
 */
export function archivePath(name: string): string | null {
  const out: string[] = [];
  for (const part of name.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") {
      if (out.length === 0) return null;
      out.pop();
    } else out.push(part);
  }
  return out.join("/");
}

function parseManifest(data: Buffer, ctx: Ctx): ManifestEntry[] {
  let raw: unknown;
  try {
    raw = JSON.parse(data.toString("utf8"));
  } catch (cause) {
    throw ctx.invalid("its manifest.json is not valid JSON", cause);
  }
  if (!Array.isArray(raw) || raw.length === 0) throw ctx.invalid("its manifest.json is not a non-empty array of images");
  return raw.map((e: unknown, i): ManifestEntry => {
    const o = e as Partial<Record<keyof ManifestEntry, unknown>> | null;
    const strings = (v: unknown) => Array.isArray(v) && v.every((s) => typeof s === "string");
    if (typeof o !== "object" || o === null || typeof o.Config !== "string" || !strings(o.Layers) || !(o.RepoTags == null || strings(o.RepoTags))) {
      throw ctx.invalid(`entry ${i} of its manifest.json is not of the form {"Config": string, "RepoTags": [string], "Layers": [string]}`);
    }
    return { Config: o.Config, Layers: o.Layers as string[], RepoTags: (o.RepoTags as string[] | null | undefined) ?? [] };
  });
}

/** Canonical form of an image name for comparison; the text itself when it does not parse. */
function canonicalName(name: string): string {
  try {
    return parseDockerRef(name).canonical;
  } catch {
    return name;
  }
}

function pickEntry(entries: ManifestEntry[], name: string | undefined, ctx: Ctx): { entry: ManifestEntry; index: number } {
  const listing = () => entries.map((e, i) => (e.RepoTags.length ? e.RepoTags.join(", ") : `@${i} (untagged)`)).join("; ");
  if (name === undefined) {
    if (entries.length === 1) return { entry: entries[0]!, index: 0 };
    throw new ImageError("IMAGE_ARCHIVE_AMBIGUOUS", `${ctx.what} holds ${entries.length} images; say which one: ${listing()}`, {
      hint: `add the name to the reference, e.g. docker-archive:${ctx.file}:${entries.find((e) => e.RepoTags.length)?.RepoTags[0] ?? "@0"}`,
    });
  }
  const at = /^@(\d+)$/.exec(name)?.[1];
  if (at !== undefined) {
    const entry = entries[Number(at)];
    if (entry) return { entry, index: Number(at) };
  } else {
    const want = canonicalName(name);
    const index = entries.findIndex((e) => e.RepoTags.some((t) => t === name || canonicalName(t) === want));
    if (index >= 0) return { entry: entries[index]!, index };
  }
  throw new ImageError("IMAGE_ARCHIVE_TAG_NOT_FOUND", `${ctx.what} has no image named ${JSON.stringify(name)}; it holds: ${listing()}`, {
    hint: "use one of the names listed (or @<n> for the n-th image)",
  });
}

/** An uncompressed layer's digest is its diff_id; a config that disagrees does not match the archive. */
function checkDiffIds(config: Record<string, unknown>, layers: LayerPlan[], configFile: ArchiveFile, ctx: Ctx): void {
  const rootfs = config.rootfs as { diff_ids?: unknown } | undefined;
  const ids = rootfs?.diff_ids;
  if (ids === undefined) return;
  if (!Array.isArray(ids) || ids.length !== layers.length) {
    throw ctx.invalid(`its config ${configFile.name} lists ${Array.isArray(ids) ? ids.length : "no valid"} diff_ids for ${layers.length} layers`);
  }
  for (const [i, l] of layers.entries()) {
    if (l.compression === "none" && ids[i] !== l.file.digest) {
      throw ctx.invalid(`layer ${i} (${l.file.name}) hashes to ${l.file.digest}, but the config says its diff_id is ${JSON.stringify(ids[i])}`);
    }
  }
}
