/**
 * Merges the layers of an image into one tar stream, without unpacking anything on the host.
 *
 * Pass 1 (`planFlatten`) reads every layer's headers bottom-up (skipping file data) into an
 * in-memory tree and applies OCI layer semantics: a `.wh.<name>` whiteout deletes `<name>` from
 * lower layers, `.wh..wh..opq` hides all lower content of its directory, a later entry replaces
 * an earlier one at the same path, and a non-directory replacing a directory drops the subtree.
 * What is left in the tree are the surviving (layer, entry) pairs.
 *
 * Pass 2 (`streamFlattened`) reads the layers bottom-up again and emits only the survivors, each
 * path exactly once, with every directory emitted before its contents (sqfstar keeps the first
 * of duplicate paths and needs a hardlink's target to come before the link). Whiteouts are never
 * emitted. Both passes verify each blob's sha256 and size.
 *
 * Limitations: a hardlink whose target did not survive (replaced or whited out by a later layer)
 * is dropped, not materialised as a copy. Extended attributes (pax SCHILY.xattr) are not carried
 * over, since tar-stream decodes pax values as UTF-8 and would corrupt binary ones.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { open } from "node:fs/promises";
import type { Readable } from "node:stream";
import { createGunzip } from "node:zlib";
import tar from "tar-stream";
import { ImageError } from "../errors.js";
import { logger } from "../log.js";
import { digestMismatch, type LayerBlob } from "./oci-layout.js";

const log = logger("image");

/** A header as read (fields may be missing at runtime) or as written. */
type TarHeaders = Partial<Omit<tar.Header, "linkname" | "type">> & { name: string; linkname?: string | null; type?: string | null };
type OutHeader = Partial<tar.Header> & { name: string };
type TarEntry = tar.Extract extends AsyncIterable<infer S> ? S : never;
type EntryType = tar.Header["type"];
interface StreamxReadable {
  pipe(dest: NodeJS.WritableStream, cb: (err: Error | null) => void): unknown;
}

const WHITEOUT_PREFIX = ".wh.";
const OPAQUE_MARKER = ".wh..wh..opq";
const S_IF: Partial<Record<EntryType, number>> = {
  file: 0o100000,
  link: 0o100000,
  directory: 0o040000,
  symlink: 0o120000,
  "character-device": 0o020000,
  "block-device": 0o060000,
  fifo: 0o010000,
};

/** Attributes of the image's root directory (from a `./` entry, if a layer has one). */
export interface RootAttributes {
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
}

/** Result of pass 1: which entries of which layers to emit. */
export interface FlattenPlan {
  layers: readonly LayerBlob[];
  /** Per layer, indexes (in tar order) of the entries to emit. */
  keep: Set<number>[];
  /** Headers of surviving directories, so parents can be emitted before their contents. */
  dirs: Map<string, TarHeaders>;
  root?: RootAttributes;
  /** Number of entries pass 2 will emit (not counting synthesized parent directories). */
  entryCount: number;
}

export interface FlattenOptions {
  /** Image reference, for error messages. */
  ref?: string;
  onLayer?: (event: { pass: 1 | 2; layer: number; layers: number; digest: string }) => void;
}

interface EntryRef {
  layer: number;
  index: number;
  path: string;
  type: EntryType;
  header: TarHeaders;
  /** For hardlinks: the entry the link pointed at when it was applied (null: none). */
  linkTarget?: EntryRef | null;
}

interface TreeNode {
  entry?: EntryRef;
  children?: Map<string, TreeNode>;
}

/** Normalizes a tar path: strips leading `/` and `./`, drops `.` and empty components. */
export function normalizeTarPath(name: string): { path: string; parts: string[]; unsafe: boolean } {
  const parts = name.split("/").filter((p) => p !== "" && p !== ".");
  return { path: parts.join("/"), parts, unsafe: parts.includes("..") };
}

/** Pass 1: computes the surviving entries of all layers. */
export async function planFlatten(layers: readonly LayerBlob[], opts: FlattenOptions = {}): Promise<FlattenPlan> {
  const ref = opts.ref ?? "(image)";
  const root: TreeNode = { children: new Map() };
  let rootEntry: EntryRef | undefined;

  for (const [li, layer] of layers.entries()) {
    opts.onLayer?.({ pass: 1, layer: li, layers: layers.length, digest: layer.digest });
    const whiteouts: { dir: string[]; name: string | null }[] = [];
    const entries: EntryRef[] = [];
    let index = 0;
    for await (const entry of layerEntries(layer, ref)) {
      const i = index++;
      const h = entry.header;
      entry.resume();
      const { path, parts, unsafe } = normalizeTarPath(h.name);
      if (unsafe) throw unsafeEntry(ref, layer, h.name, "its path has a '..' component");
      const type = normalizeType(h.type);
      const base = parts[parts.length - 1];
      if (base !== undefined && base.startsWith(WHITEOUT_PREFIX)) {
        const dir = parts.slice(0, -1);
        if (base === OPAQUE_MARKER) whiteouts.push({ dir, name: null });
        else if (base.startsWith(WHITEOUT_PREFIX + WHITEOUT_PREFIX)) log("layer %s: ignoring aufs metadata %s", layer.digest, path);
        else {
          const target = base.slice(WHITEOUT_PREFIX.length);
          if (target === "..") throw unsafeEntry(ref, layer, h.name, "it whites out '..'");
          if (target !== "" && target !== ".") whiteouts.push({ dir, name: target });
        }
        continue;
      }
      if (type === null) {
        log("layer %s: skipping %s of unsupported type %s", layer.digest, h.name, h.type);
        continue;
      }
      const e: EntryRef = { layer: li, index: i, path, type, header: h };
      if (type === "link") {
        const target = normalizeTarPath(h.linkname ?? "");
        if (target.unsafe) throw unsafeEntry(ref, layer, h.name, `its hardlink target ${JSON.stringify(h.linkname)} has a '..' component`);
        if (target.path === "") throw unsafeEntry(ref, layer, h.name, "it is a hardlink without a target");
        h.linkname = target.path;
      }
      entries.push(e);
    }

    // Whiteouts act on lower layers only, so apply them before this layer's own entries.
    // Their directory exists in this layer even if the layer has no entry for it.
    for (const w of whiteouts) {
      const children = ensureDir(root, w.dir);
      if (w.name === null) children.clear();
      else children.delete(w.name);
    }
    for (const e of entries) {
      if (e.path === "") {
        if (e.type === "directory") rootEntry = e;
        continue;
      }
      const parts = e.path.split("/");
      const parent = ensureDir(root, parts.slice(0, -1));
      const name = parts[parts.length - 1]!;
      const existing = parent.get(name);
      if (e.type === "link") e.linkTarget = lookup(root, (e.header.linkname ?? "").split("/"))?.entry ?? null;
      if (e.type === "directory" && existing && (existing.entry === undefined || existing.entry.type === "directory")) {
        existing.entry = e; // directories merge: upper metadata, lower contents stay
        existing.children ??= new Map();
      } else {
        parent.set(name, e.type === "directory" ? { entry: e, children: new Map() } : { entry: e });
      }
    }
  }

  // Collect survivors in global (layer, index) order so hardlink targets are seen first.
  const survivors: EntryRef[] = [];
  const dirs = new Map<string, TarHeaders>();
  const walk = (node: TreeNode) => {
    for (const child of node.children?.values() ?? []) {
      if (child.entry) survivors.push(child.entry);
      walk(child);
    }
  };
  walk(root);
  survivors.sort((a, b) => a.layer - b.layer || a.index - b.index);
  const keep = layers.map(() => new Set<number>());
  const kept = new Set<EntryRef>();
  for (const e of survivors) {
    if (e.type === "link") {
      const t = e.linkTarget;
      if (!t || !kept.has(t) || t.type === "directory") {
        log("layer %s: dropping hardlink %s -> %s: its target did not survive", layers[e.layer]!.digest, e.path, e.header.linkname);
        continue;
      }
    }
    if (e.type === "directory") dirs.set(e.path, e.header);
    kept.add(e);
    keep[e.layer]!.add(e.index);
  }
  const plan: FlattenPlan = { layers, keep, dirs, entryCount: kept.size };
  if (rootEntry) {
    const h = rootEntry.header;
    plan.root = { mode: (h.mode ?? 0o755) & 0o7777, uid: h.uid ?? 0, gid: h.gid ?? 0, mtime: Math.max(0, Math.floor((h.mtime?.getTime() ?? 0) / 1000)) };
  }
  return plan;
}

/**
 * Pass 2: streams the survivors of `plan` as one tar archive. Failures (including a blob that
 * changed since pass 1) destroy the returned stream with the error.
 */
export function streamFlattened(plan: FlattenPlan, opts: FlattenOptions = {}): Readable {
  const ref = opts.ref ?? "(image)";
  const pack = tar.pack();
  const emitted = new Set<string>();

  const add = (header: OutHeader, data?: Readable): Promise<void> =>
    new Promise((resolve, reject) => {
      const done = (err?: Error | null) => (err ? reject(err) : resolve());
      if (header.type !== "file" || !data) return void pack.entry(header, Buffer.alloc(0), done);
      const sink = pack.entry(header, done);
      // streamx pipe: the callback reports a failure of either side.
      (data as unknown as StreamxReadable).pipe(sink, (err) => {
        if (err) reject(err);
      });
    });

  const ensureParents = async (parts: string[]) => {
    for (let n = 1; n < parts.length; n++) {
      const path = parts.slice(0, n).join("/");
      if (emitted.has(path)) continue;
      emitted.add(path);
      const dir = plan.dirs.get(path);
      await add(dir ? cleanHeader(dir, path) : { name: path, type: "directory", mode: S_IF.directory! | 0o755, uid: 0, gid: 0, mtime: new Date(0) });
    }
  };

  const run = async () => {
    for (const [li, layer] of plan.layers.entries()) {
      opts.onLayer?.({ pass: 2, layer: li, layers: plan.layers.length, digest: layer.digest });
      const keep = plan.keep[li]!;
      let index = 0;
      for await (const entry of layerEntries(layer, ref)) {
        const i = index++;
        if (!keep.has(i)) {
          entry.resume();
          continue;
        }
        const h = entry.header;
        const { path, parts } = normalizeTarPath(h.name);
        await ensureParents(parts);
        if (emitted.has(path)) {
          entry.resume(); // a directory already emitted early as a parent
          continue;
        }
        emitted.add(path);
        await add(cleanHeader(h, path), entry as unknown as Readable);
      }
    }
    pack.finalize();
  };
  run().catch((err: unknown) => pack.destroy(err instanceof Error ? err : new Error(String(err))));
  return pack as unknown as Readable;
}

/** Both passes: plans, then returns the merged tar stream. */
export async function flattenLayers(layers: readonly LayerBlob[], opts: FlattenOptions = {}): Promise<{ plan: FlattenPlan; stream: Readable }> {
  const plan = await planFlatten(layers, opts);
  return { plan, stream: streamFlattened(plan, opts) };
}

/** Header for the output: normalized name, only the fields we mean to keep, no pax records. */
function cleanHeader(h: TarHeaders, path: string): OutHeader {
  const type = normalizeType(h.type) ?? "file";
  // Type bits keep tar-stream from replacing a mode of 0 with its default; it masks them off.
  const out: OutHeader = {
    name: path,
    type,
    mode: (S_IF[type] ?? 0) | ((h.mode ?? 0) & 0o7777),
    uid: h.uid ?? 0,
    gid: h.gid ?? 0,
    mtime: h.mtime ?? new Date(0),
  };
  if (h.uname) out.uname = h.uname;
  if (h.gname) out.gname = h.gname;
  if (type === "file") out.size = h.size ?? 0;
  if (type === "symlink") out.linkname = h.linkname ?? "";
  if (type === "link") out.linkname = normalizeTarPath(h.linkname ?? "").path;
  if (type === "character-device" || type === "block-device") {
    out.devmajor = h.devmajor ?? 0;
    out.devminor = h.devminor ?? 0;
  }
  return out;
}

function normalizeType(type: TarHeaders["type"]): EntryType | null {
  switch (type) {
    case "file":
    case "contiguous-file":
    case undefined:
    case null:
      return "file";
    case "link":
    case "symlink":
    case "directory":
    case "character-device":
    case "block-device":
    case "fifo":
      return type;
    default:
      return null;
  }
}

function lookup(root: TreeNode, parts: readonly string[]): TreeNode | undefined {
  let node: TreeNode | undefined = root;
  for (const p of parts) {
    if (p === "") continue;
    node = node.children?.get(p);
    if (!node) return undefined;
  }
  return node;
}

/** Walks to a directory, creating implicit ones; an implicit dir replaces a lower non-directory. */
function ensureDir(root: TreeNode, parts: readonly string[]): Map<string, TreeNode> {
  let node = root;
  for (const p of parts) {
    const children: Map<string, TreeNode> = (node.children ??= new Map());
    let child = children.get(p);
    if (!child) {
      child = { children: new Map() };
      children.set(p, child);
    } else if (child.entry && child.entry.type !== "directory") {
      delete child.entry;
      child.children = new Map();
    }
    node = child;
  }
  return (node.children ??= new Map());
}

function unsafeEntry(ref: string, layer: LayerBlob, name: string, why: string): ImageError {
  return new ImageError("IMAGE_LAYER_UNSAFE", `image ${JSON.stringify(ref)}: layer ${layer.digest} has entry ${JSON.stringify(name)} that is refused because ${why}`, {
    hint: "the layer tries to write outside the root filesystem; do not use this image",
  });
}

type Compression = "gzip" | "none";

/** Detects compression by magic bytes; zstd and others are refused for now. */
async function detectCompression(layer: LayerBlob, ref: string): Promise<Compression> {
  let head: Buffer;
  try {
    const fh = await open(layer.path, "r");
    try {
      const { buffer, bytesRead } = await fh.read(Buffer.alloc(6), 0, 6, 0);
      head = buffer.subarray(0, bytesRead);
    } finally {
      await fh.close();
    }
  } catch (cause) {
    throw new ImageError("IMAGE_BLOB_MISSING", `image ${JSON.stringify(ref)}: layer blob ${layer.digest} is missing (${layer.path})`, {
      cause,
      hint: "the layout is incomplete; export the image again",
    });
  }
  const starts = (...bytes: number[]) => bytes.every((b, i) => head[i] === b);
  if (starts(0x1f, 0x8b)) return "gzip";
  let other: string | undefined;
  if (starts(0x28, 0xb5, 0x2f, 0xfd)) other = "zstd";
  else if (starts(0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00)) other = "xz";
  else if (starts(0x42, 0x5a, 0x68)) other = "bzip2";
  else if (layer.mediaType.includes("zstd")) other = "zstd";
  if (other !== undefined) {
    throw new ImageError("IMAGE_LAYER_COMPRESSION_UNSUPPORTED", `image ${JSON.stringify(ref)}: layer ${layer.digest} is ${other}-compressed, which is not supported yet`, {
      hint: "re-export the image with gzip or uncompressed layers (e.g. skopeo copy --dest-compress-format gzip)",
    });
  }
  return "none";
}

/**
 * Yields the tar entries of a layer blob, decompressing as needed; after the last entry,
 * checks that the blob's size and sha256 match its descriptor.
 */
async function* layerEntries(layer: LayerBlob, ref: string): AsyncGenerator<TarEntry> {
  const compression = await detectCompression(layer, ref);
  const file = createReadStream(layer.path);
  const hash = createHash("sha256");
  let bytes = 0;
  file.on("data", (chunk) => {
    hash.update(chunk as Buffer);
    bytes += chunk.length;
  });
  const fileDone = new Promise<void>((resolve, reject) => {
    file.on("end", resolve);
    file.on("error", reject);
  });
  fileDone.catch(() => {}); // observed below
  const extract = tar.extract({ allowUnknownFormat: true } as Parameters<typeof tar.extract>[0]);
  const gunzip = compression === "gzip" ? createGunzip() : null;
  const body: NodeJS.ReadableStream = gunzip ? file.pipe(gunzip) : file;
  file.on("error", (err) => extract.destroy(err));
  gunzip?.on("error", (err) => extract.destroy(err));
  body.pipe(extract);
  const cleanup = () => {
    file.destroy();
    gunzip?.destroy();
    extract.destroy();
  };

  let completed = false;
  try {
    for await (const entry of extract) yield entry;
    body.unpipe(extract);
    body.resume(); // hash whatever follows the end-of-archive marker
    await fileDone;
    completed = true;
  } catch (err) {
    cleanup();
    if (err instanceof ImageError) throw err;
    // A corrupt blob usually fails to decode first; report it as what it is.
    const actual = await hashFile(layer.path).catch(() => undefined);
    if (actual !== undefined && actual !== layer.digest) throw digestMismatch(ref, layer.digest, actual, layer.path);
    throw new ImageError("IMAGE_LAYER_INVALID", `image ${JSON.stringify(ref)}: layer ${layer.digest} (${layer.path}) is not a valid ${compression === "gzip" ? "gzip-compressed " : ""}tar archive: ${(err as Error).message}`, {
      cause: err,
    });
  } finally {
    if (!completed) cleanup(); // the consumer stopped early
  }
  const actual = `sha256:${hash.digest("hex")}`;
  if (actual !== layer.digest) throw digestMismatch(ref, layer.digest, actual, layer.path);
  if (bytes !== layer.size) {
    throw new ImageError("IMAGE_BLOB_SIZE_MISMATCH", `image ${JSON.stringify(ref)}: layer ${layer.digest} (${layer.path}) is ${bytes} bytes, its descriptor says ${layer.size}`);
  }
}

async function hashFile(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return `sha256:${hash.digest("hex")}`;
}
