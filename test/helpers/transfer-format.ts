// Reading and rewriting a directory cache in the tests: its index, manifests, the zstd JSON of
// configs and file indexes, and blobs written back under their digests.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { decompressBounded, compress } from "../../src/transfer/zstd.js";
import { digestOf } from "../../src/transfer/format.js";
import { keyOf, type SnapshotInputs } from "../../src/schema/key.js";
import { SIGNATURE_ANNOTATION, signManifest, type SigningKey } from "../../src/transfer/sign.js";

export { digestOf };
export const keyOfConfig = (c: { inputs: SnapshotInputs }): string => keyOf(c.inputs);

export interface LayoutIndex {
  manifests: { digest: string; size: number; artifactType?: string; annotations: Record<string, string> }[];
}
export interface Layer {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}
export interface Manifest {
  artifactType: string;
  config: Layer;
  layers: Layer[];
  annotations: Record<string, string>;
}
/** A file index as the tests read it: packs table and [offset, pack#, at, size, sha256] tuples. */
export interface FileIndexJson {
  version: number;
  file: string;
  size: number;
  sha256?: string;
  packs: string[];
  chunks: [number, number, number, number, string][];
}
export interface ConfigJson {
  version: number;
  snapshot: { hash: string; inputs: SnapshotInputs & { engine: Record<string, string> }; image: Record<string, unknown>; files: { ram: { size: number } } } & Record<string, unknown>;
  state: { pack: string; at: number; size: number; length: number; sha256: string };
  ram: FileIndexJson;
}

export const blobPath = (cache: string, d: string): string => join(cache, "blobs", "sha256", d.slice(7));
export const blob = (cache: string, d: string): Buffer => readFileSync(blobPath(cache, d));
export const readIndex = (cache: string): LayoutIndex => JSON.parse(readFileSync(join(cache, "index.json"), "utf8")) as LayoutIndex;
export const zjson = <T>(b: Buffer): T => JSON.parse(decompressBounded(b, "test", { max: 1 << 30 }).toString()) as T;

export function entryOf(cache: string, key: string): LayoutIndex["manifests"][number] {
  const e = readIndex(cache).manifests.find((m) => m.annotations["dev.supermachine.key"] === key);
  if (!e) throw new Error(`no entry for ${key} in ${cache}`);
  return e;
}
export const manifestOf = (cache: string, key: string): Manifest => JSON.parse(blob(cache, entryOf(cache, key).digest).toString()) as Manifest;
/** A file index's JSON with its base64 records (48 bytes: chunk#, pack#, at, size as u32 LE, sha256) as tuples. */
export function tuples(raw: Omit<FileIndexJson, "chunks"> & { chunks: string }): FileIndexJson {
  const b = Buffer.from(raw.chunks, "base64");
  const chunks: FileIndexJson["chunks"] = [];
  for (let o = 0; o < b.length; o += 48) chunks.push([b.readUInt32LE(o) * 16384, b.readUInt32LE(o + 4), b.readUInt32LE(o + 8), b.readUInt32LE(o + 12), b.toString("hex", o + 16, o + 48)]);
  return { ...raw, chunks };
}
export function configOf(cache: string, key: string): ConfigJson {
  const c = zjson<ConfigJson & { ram: { chunks: string } }>(blob(cache, manifestOf(cache, key).config.digest));
  return { ...c, ram: tuples(c.ram as never) };
}
export function rootfsIndexOf(cache: string, key: string): FileIndexJson {
  const l = manifestOf(cache, key).layers.find((x) => x.mediaType.includes("file-index"))!;
  return tuples(zjson(blob(cache, l.digest)));
}

/** Writes `b` as a blob of the cache; its descriptor's digest and size. */
export function putBlob(cache: string, b: Buffer): { digest: string; size: number } {
  const d = digestOf(b);
  writeFileSync(blobPath(cache, d), b);
  return { digest: d, size: b.length };
}

/**
 * Rewrites the entry of `key`: `edit` changes its config JSON and manifest in place, and the new
 * config, manifest and index entry are written (under `newKey` when given).
 */
export function rewriteEntry(cache: string, key: string, edit: (config: ConfigJson, manifest: Manifest) => string | void, sign?: SigningKey): string {
  const idx = readIndex(cache);
  const entry = idx.manifests.find((m) => m.annotations["dev.supermachine.key"] === key)!;
  const m = JSON.parse(blob(cache, entry.digest).toString()) as Manifest;
  const config = zjson<ConfigJson>(blob(cache, m.config.digest));
  const newKey = edit(config, m) ?? key;
  m.config = { ...m.config, ...putBlob(cache, compress(Buffer.from(JSON.stringify(config)))) };
  m.annotations["dev.supermachine.key"] = newKey;
  delete m.annotations[SIGNATURE_ANNOTATION];
  const signedM = sign ? signManifest(m, sign) : m;
  Object.assign(entry, putBlob(cache, Buffer.from(JSON.stringify(signedM))));
  entry.annotations["dev.supermachine.key"] = newKey;
  entry.annotations["org.opencontainers.image.ref.name"] = `sm-${newKey}`;
  writeFileSync(join(cache, "index.json"), JSON.stringify(idx));
  return newKey;
}
