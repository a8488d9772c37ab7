import { createHash } from "node:crypto";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import tar from "tar-stream";
import type { LayerBlob } from "../../src/image/oci-layout.js";

export interface TestEntry {
  name: string;
  type?: "file" | "directory" | "symlink" | "link" | "fifo";
  data?: string;
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

export interface LayoutSpec {
  layers: { tar: Buffer; gzip?: boolean }[];
  config?: Record<string, unknown>;
  tag?: string;
  architecture?: string;
}

/** Writes an OCI image layout; returns the manifest digest and blob paths. */
export async function writeLayout(dir: string, spec: LayoutSpec): Promise<{ manifestDigest: string; layerPaths: string[]; manifestPath: string }> {
  const blobs = join(dir, "blobs", "sha256");
  await mkdir(blobs, { recursive: true });
  const put = async (buf: Buffer) => {
    const digest = sha256(buf);
    await writeFile(join(blobs, digest.slice(7)), buf);
    return { digest, size: buf.length, path: join(blobs, digest.slice(7)) };
  };
  const layers = [];
  for (const l of spec.layers) {
    const blob = l.gzip ? gzipSync(l.tar) : l.tar;
    const d = await put(blob);
    layers.push({ ...d, mediaType: `application/vnd.oci.image.layer.v1.tar${l.gzip ? "+gzip" : ""}` });
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
  return { manifestDigest: m.digest, layerPaths: layers.map((l) => l.path), manifestPath: m.path };
}
