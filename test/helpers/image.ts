import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import tar from "tar-stream";
import type { LayerBlob } from "../../src/oci/oci-layout.js";

export interface TestEntry {
  name: string;
  type?: "file" | "directory" | "symlink" | "link" | "fifo";
  data?: string | Buffer;
  linkname?: string;
  mode?: number;
}

export const sha256 = (buf: Buffer | string) => `sha256:${createHash("sha256").update(buf).digest("hex")}`;

/** Builds an uncompressed tar from entries, in the given order. */
export async function makeTar(entries: TestEntry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const done = new Promise<void>((resolve, reject) => {
    pack.on("data", (c) => chunks.push(c as Buffer));
    pack.on("end", () => resolve());
    pack.on("error", reject);
  });
  for (const e of entries) {
    const type = e.type ?? "file";
    const header: Partial<tar.Header> & { name: string } = {
      name: e.name,
      type,
      // Type bits keep tar-stream from turning a mode of 0 into its default.
      mode: 0o100000 | (e.mode ?? (type === "directory" ? 0o755 : 0o644)),
      mtime: new Date(1_000_000_000),
    };
    if (e.linkname !== undefined) header.linkname = e.linkname;
    await new Promise<void>((res, rej) => pack.entry(header, e.data ?? "", (err) => (err ? rej(err) : res())));
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

/** Reads a tar stream into a list of entries (in order) with their contents. */
export async function readTar(stream: NodeJS.ReadableStream): Promise<{ name: string; type: string; data: string; linkname: string | null; mode: number }[]> {
  const extract = tar.extract();
  stream.pipe(extract as unknown as NodeJS.WritableStream);
  stream.on("error", (err: Error) => extract.destroy(err));
  const out = [];
  for await (const entry of extract) {
    const chunks: Buffer[] = [];
    for await (const c of entry) chunks.push(c as Buffer);
    const h = entry.header;
    out.push({ name: h.name, type: h.type, data: Buffer.concat(chunks).toString(), linkname: h.linkname ?? null, mode: h.mode });
  }
  return out;
}

export async function tempDir(prefix = "sm-image-test-"): Promise<string> {
  return mkdtemp(join(tmpdir(), prefix));
}

export async function removeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
}

/** Writes raw layer blobs (optionally gzipped) into `dir` and returns their descriptors. */
export async function writeLayerBlobs(dir: string, layers: { tar: Buffer; gzip?: boolean }[]): Promise<LayerBlob[]> {
  await mkdir(dir, { recursive: true });
  const out: LayerBlob[] = [];
  for (const l of layers) {
    const blob = l.gzip ? gzipSync(l.tar) : l.tar;
    const digest = sha256(blob);
    const path = join(dir, digest.slice(7));
    await writeFile(path, blob);
    out.push({ digest, size: blob.length, path, mediaType: `application/vnd.oci.image.layer.v1.tar${l.gzip ? "+gzip" : ""}` });
  }
  return out;
}

/**
 * A layer of a test layout: `tar` gzip-compressed (`gzip`), or compressed as `compression` says
 * (zstd via the zstd CLI), or `raw` bytes used verbatim as the blob; `mediaType` overrides the
 * one derived from the compression.
 */
export interface LayoutLayer {
  tar: Buffer;
  gzip?: boolean;
  compression?: "gzip" | "zstd" | "none";
  raw?: Buffer;
  mediaType?: string;
}

/** zstd-compresses with the zstd CLI. */
export function zstdCompress(data: Buffer, level = 3): Buffer {
  return execFileSync("zstd", ["-q", "-c", `-${level}`], { input: data, maxBuffer: 1024 ** 3 });
}

function layerBlob(l: LayoutLayer): { blob: Buffer; mediaType: string } {
  const compression = l.compression ?? (l.gzip ? "gzip" : "none");
  const blob = l.raw ?? (compression === "gzip" ? gzipSync(l.tar) : compression === "zstd" ? zstdCompress(l.tar) : l.tar);
  return { blob, mediaType: l.mediaType ?? `application/vnd.oci.image.layer.v1.tar${compression === "none" ? "" : `+${compression}`}` };
}

export interface LayoutSpec {
  layers: LayoutLayer[];
  config?: Record<string, unknown>;
  tag?: string;
  architecture?: string;
}

/** Writes an OCI image layout; returns the manifest digest and blob paths. */
export async function writeLayout(
  dir: string,
  spec: LayoutSpec,
): Promise<{ manifestDigest: string; layerPaths: string[]; manifestPath: string; layerDigests: string[]; configDigest: string }> {
  const blobs = join(dir, "blobs", "sha256");
  await mkdir(blobs, { recursive: true });
  const put = async (buf: Buffer) => {
    const digest = sha256(buf);
    await writeFile(join(blobs, digest.slice(7)), buf);
    return { digest, size: buf.length, path: join(blobs, digest.slice(7)) };
  };
  const layers = [];
  for (const l of spec.layers) {
    const { blob, mediaType } = layerBlob(l);
    const d = await put(blob);
    layers.push({ ...d, mediaType });
  }
  const config = Buffer.from(
    JSON.stringify({
      architecture: spec.architecture ?? (process.arch === "arm64" ? "arm64" : "amd64"),
      os: "linux",
      config: spec.config ?? {},
      rootfs: { type: "layers", diff_ids: spec.layers.map((l) => sha256(l.tar)) },
    }),
  );
  const c = await put(config);
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: c.digest, size: c.size },
      layers: layers.map(({ mediaType, digest, size }) => ({ mediaType, digest, size })),
    }),
  );
  const m = await put(manifest);
  const desc: Record<string, unknown> = { mediaType: "application/vnd.oci.image.manifest.v1+json", digest: m.digest, size: m.size };
  if (spec.tag) desc.annotations = { "org.opencontainers.image.ref.name": spec.tag };
  await writeFile(join(dir, "index.json"), JSON.stringify({ schemaVersion: 2, manifests: [desc] }));
  await writeFile(join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  return { manifestDigest: m.digest, layerPaths: layers.map((l) => l.path), manifestPath: m.path, layerDigests: layers.map((l) => l.digest), configDigest: c.digest };
}

/** A tar entry written byte by byte, for headers tar-stream refuses to produce. */
export interface RawTarEntry {
  name: string;
  /** Type flag character: "0" file, "1" hardlink, "2" symlink, "3" char dev, "4" block dev, "5" dir, "6" fifo. */
  typeflag?: string;
  data?: Buffer | string;
  linkname?: string;
  mode?: number;
  devmajor?: number;
  devminor?: number;
  /** Raw 12 bytes for the size field (e.g. base-256 encodings), instead of the data length. */
  sizeField?: Buffer;
  /** Pax records, emitted as a preceding `x` header; values may hold any bytes. */
  pax?: Record<string, string | Buffer>;
  /** Raw pax data, used verbatim instead of `pax`. */
  paxRaw?: Buffer;
}

const octal = (n: number, width: number) => n.toString(8).padStart(width - 1, "0") + "\0";

/** One 512-byte ustar header; `name` and `linkname` are truncated to their 100-byte fields. */
export function rawTarHeader(e: RawTarEntry, size: number): Buffer {
  const h = Buffer.alloc(512);
  Buffer.from(e.name).copy(h, 0, 0, 100);
  h.write(octal(e.mode ?? 0o644, 8), 100, "latin1");
  h.write(octal(0, 8), 108, "latin1");
  h.write(octal(0, 8), 116, "latin1");
  if (e.sizeField) e.sizeField.copy(h, 124, 0, 12);
  else h.write(octal(size, 12), 124, "latin1");
  h.write(octal(1_000_000, 12), 136, "latin1");
  h.write(e.typeflag ?? "0", 156, "latin1");
  if (e.linkname !== undefined) Buffer.from(e.linkname).copy(h, 157, 0, 100);
  h.write("ustar\0", 257, "latin1");
  h.write("00", 263, "latin1");
  h.write(octal(e.devmajor ?? 0, 8), 329, "latin1");
  h.write(octal(e.devminor ?? 0, 8), 337, "latin1");
  h.fill(" ", 148, 156);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(octal(sum, 7) + " ", 148, "latin1");
  return h;
}

/** Pax extended-header data: `<len> <key>=<value>\n` records. */
export function paxData(records: Record<string, string | Buffer>): Buffer {
  const out: Buffer[] = [];
  for (const [k, v] of Object.entries(records)) {
    const body = Buffer.concat([Buffer.from(` ${k}=`), Buffer.from(v), Buffer.from("\n")]);
    let len = body.length + 1;
    while (String(len).length + body.length !== len) len = String(len).length + body.length;
    out.push(Buffer.from(String(len)), body);
  }
  return Buffer.concat(out);
}

const pad512 = (b: Buffer) => Buffer.concat([b, Buffer.alloc((512 - (b.length % 512)) % 512)]);

/** A tar archive from raw entries, with the end-of-archive marker unless `end` is false. */
export function rawTar(entries: RawTarEntry[], end = true): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const pax = e.paxRaw ?? (e.pax ? paxData(e.pax) : undefined);
    if (pax) parts.push(rawTarHeader({ name: "PaxHeader/x", typeflag: "x" }, pax.length), pad512(pax));
    const data = e.data === undefined ? Buffer.alloc(0) : Buffer.from(e.data);
    parts.push(rawTarHeader(e, data.length), pad512(data));
  }
  if (end) parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

