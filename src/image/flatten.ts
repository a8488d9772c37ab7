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
 * Layers are untrusted. Every entry is checked as it is read, and the first offence fails the
 * whole image with an ImageError naming the image, the layer digest and the entry:
 *
 *   IMAGE_LAYER_UNSAFE           a `..` component (in a name, a hardlink target or a whiteout), a
 *                                NUL byte in a name or link target, an entry (or whiteout) whose
 *                                parent path goes through a symlink in the merged tree, a hardlink
 *                                whose target is not (yet) in the merged tree, or is a directory
 *   IMAGE_LAYER_NAME_TOO_LONG    a name or link target over 4096 bytes, a component over 255
 *   IMAGE_LAYER_TOO_LARGE        more than `maxLayerBytes` of uncompressed tar, or an entry that
 *                                says it is larger; decompression stops right there
 *   IMAGE_LAYER_TOO_MANY_ENTRIES more than `maxLayerEntries` entries in one layer
 *   IMAGE_LAYER_INVALID          a corrupt or truncated gzip/zstd stream or tar archive, absurd
 *                                header fields, malformed pax records
 *   IMAGE_DIGEST_MISMATCH / IMAGE_BLOB_SIZE_MISMATCH   the blob is not what its descriptor says
 *
 * Leading `/` is stripped from names (as docker does); symlinks may point anywhere, since they
 * resolve inside the guest's root.
 *
 * Character and block devices and fifos are kept, as Docker keeps them (mmdebstrap, debootstrap
 * and `docker import` images carry /dev/console, /dev/null and the like). They are safe for the
 * host: nothing is extracted here, the entry only becomes an inode in the squashfs, and a device
 * number there names a *guest* device, opened (if ever) by the guest kernel. In the guest, /dev
 * is a devtmpfs mounted over the image's /dev, so those entries are hidden; a node elsewhere
 * gives nothing root in the guest could not mknod itself, and a non-root user only what its
 * permissions allow, which the image author controls as they do setuid binaries. Skipping them
 * instead would diverge from Docker for no gain in isolation.
 *
 * Limitations: a hardlink whose target did not survive (replaced or whited out by a later layer)
 * is dropped, not materialised as a copy. Extended attributes (pax SCHILY.xattr) are not carried
 * over, since tar-stream decodes pax values as UTF-8 and would corrupt binary ones.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import type { Readable } from "node:stream";
import tar from "tar-stream";
import { ImageError, SupermachineError } from "../errors.js";
import { logger } from "../debug.js";
import { decompressStream, detectCompression, readHead, type Compression } from "./decompress.js";
import { digestMismatch, type LayerBlob } from "../oci/oci-layout.js";

const log = logger("image");

/** A header as read (fields may be missing at runtime) or as written. */
type TarHeaders = Partial<Omit<tar.Header, "linkname" | "type">> & { name: string; linkname?: string | null; type?: string | null };
type OutHeader = Partial<tar.Header> & { name: string };
type TarEntry = tar.Extract extends AsyncIterable<infer S> ? S : never;
type EntryType = tar.Header["type"];
interface StreamxReadable {
  pipe(dest: NodeJS.WritableStream, cb: (err: Error | null) => void): unknown;
}

/** Default for `FlattenOptions.maxLayerBytes`: 16 GiB of uncompressed tar per layer. */
export const DEFAULT_MAX_LAYER_BYTES = 16 * 1024 ** 3;
/** Default for `FlattenOptions.maxLayerEntries`. */
export const DEFAULT_MAX_LAYER_ENTRIES = 1_000_000;
/** Longest name or link target accepted, in bytes (Linux PATH_MAX). */
export const MAX_PATH_BYTES = 4096;
/** Longest path component accepted, in bytes (Linux NAME_MAX). */
export const MAX_COMPONENT_BYTES = 255;

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
  /** Refuse a layer whose uncompressed tar exceeds this many bytes (default 16 GiB). */
  maxLayerBytes?: number;
  /** Refuse a layer with more tar entries than this (default 1,000,000). */
  maxLayerEntries?: number;
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
    const whiteouts: { dir: string[]; name: string | null; entry: string }[] = [];
    const entries: EntryRef[] = [];
    let index = 0;
    for await (const entry of layerEntries(layer, ref, opts)) {
      const i = index++;
      const h = entry.header;
      entry.resume();
      const { path, parts } = normalizeTarPath(h.name); // names were checked by layerEntries
      const type = normalizeType(h.type);
      const base = parts[parts.length - 1];
      if (base !== undefined && base.startsWith(WHITEOUT_PREFIX)) {
        const dir = parts.slice(0, -1);
        if (base === OPAQUE_MARKER) whiteouts.push({ dir, name: null, entry: h.name });
        else if (base.startsWith(WHITEOUT_PREFIX + WHITEOUT_PREFIX)) log("layer %s: ignoring aufs metadata %s", layer.digest, path);
        else {
          const target = base.slice(WHITEOUT_PREFIX.length);
          if (target === "..") throw unsafeEntry(ref, layer, h.name, "it whites out '..'");
          if (target !== "" && target !== ".") whiteouts.push({ dir, name: target, entry: h.name });
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
        if (target.path === "") throw unsafeEntry(ref, layer, h.name, "it is a hardlink without a target");
        h.linkname = target.path;
      }
      entries.push(e);
    }

    // Whiteouts act on lower layers only, so apply them before this layer's own entries.
    // Their directory exists in this layer even if the layer has no entry for it.
    for (const w of whiteouts) {
      const children = ensureDir(root, w.dir, (at) => {
        throw unsafeEntry(ref, layer, w.entry, `its parent ${JSON.stringify(at)} is a symlink in the image (it would act through the link)`);
      });
      if (w.name === null) children.clear();
      else children.delete(w.name);
    }
    for (const e of entries) {
      if (e.path === "") {
        if (e.type === "directory") rootEntry = e;
        continue;
      }
      const parts = e.path.split("/");
      const parent = ensureDir(root, parts.slice(0, -1), (at) => {
        throw unsafeEntry(ref, layer, e.header.name, `its parent ${JSON.stringify(at)} is a symlink in the image (it would write through the link)`);
      });
      const name = parts[parts.length - 1]!;
      const existing = parent.get(name);
      if (e.type === "link") e.linkTarget = resolveHardlink(root, e, ref, layer);
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

  let at: { layer: LayerBlob; name?: string } | undefined; // for messages
  const run = async () => {
    for (const [li, layer] of plan.layers.entries()) {
      at = { layer };
      opts.onLayer?.({ pass: 2, layer: li, layers: plan.layers.length, digest: layer.digest });
      const keep = plan.keep[li]!;
      let index = 0;
      for await (const entry of layerEntries(layer, ref, opts)) {
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
        at.name = h.name;
        await add(cleanHeader(h, path), entry as unknown as Readable);
      }
    }
    pack.finalize();
  };
  run().catch((err: unknown) => {
    // Errors met while copying an entry's data surface here, not in layerEntries: add context.
    if (!(err instanceof SupermachineError) && at) {
      const entry = at.name !== undefined ? ` entry ${showName(at.name)} of` : "";
      err = new ImageError("IMAGE_LAYER_INVALID", `image ${JSON.stringify(ref)}: copying${entry} layer ${at.layer.digest} (${at.layer.path}) failed: ${(err as Error).message}`, {
        cause: err,
        hint: "the layer is corrupt or changed while the image was being built",
      });
    }
    pack.destroy(err instanceof Error ? err : new Error(String(err)));
  });
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

/**
 * The entry a hardlink points at in the merged tree so far. Refuses a target that does not
 * exist (also one reached only through a symlink: the walk does not follow links) or that is a
 * directory.
 */
function resolveHardlink(root: TreeNode, e: EntryRef, ref: string, layer: LayerBlob): EntryRef {
  const target = e.header.linkname ?? "";
  let node: TreeNode | undefined = root;
  const parts = target.split("/");
  for (const [i, p] of parts.entries()) {
    const next: TreeNode | undefined = node.children?.get(p);
    if (!next) {
      const via = node.entry && effectiveType(node.entry) === "symlink" ? ` (${JSON.stringify(parts.slice(0, i).join("/"))} is a symlink)` : "";
      throw unsafeEntry(ref, layer, e.header.name, `its hardlink target ${JSON.stringify(target)} does not exist in the image${via}`);
    }
    node = next;
  }
  if (!node.entry || node.children !== undefined || node.entry.type === "directory") {
    throw unsafeEntry(ref, layer, e.header.name, `its hardlink target ${JSON.stringify(target)} is a directory`);
  }
  return node.entry;
}

/** The type of what an entry is on disk: a hardlink is whatever its target is. */
function effectiveType(e: EntryRef): EntryType {
  return e.type === "link" ? (e.linkTarget?.type ?? "file") : e.type;
}

/**
 * Walks to a directory, creating implicit ones; an implicit dir replaces a lower regular file
 * (or fifo, device). A symlink on the way calls `onSymlink` with its path, which must throw:
 * applying the entry would act through the link.
 */
function ensureDir(root: TreeNode, parts: readonly string[], onSymlink: (at: string) => never): Map<string, TreeNode> {
  let node = root;
  for (const [i, p] of parts.entries()) {
    const children: Map<string, TreeNode> = (node.children ??= new Map());
    let child = children.get(p);
    if (!child) {
      child = { children: new Map() };
      children.set(p, child);
    } else if (child.entry && child.entry.type !== "directory") {
      if (effectiveType(child.entry) === "symlink") onSymlink(parts.slice(0, i + 1).join("/"));
      delete child.entry;
      child.children = new Map();
    }
    node = child;
  }
  return (node.children ??= new Map());
}

/** `image "ref": layer sha256:...`, the start of every per-layer message. */
function layerWhat(ref: string, layer: LayerBlob): string {
  return `image ${JSON.stringify(ref)}: layer ${layer.digest}`;
}

/** A name for a message: JSON-quoted, long ones shortened. */
function showName(name: string): string {
  const max = 256;
  return name.length <= max ? JSON.stringify(name) : `${JSON.stringify(name.slice(0, max))}... (${Buffer.byteLength(name)} bytes)`;
}

function unsafeEntry(ref: string, layer: LayerBlob, name: string, why: string): ImageError {
  return new ImageError("IMAGE_LAYER_UNSAFE", `${layerWhat(ref, layer)} has entry ${showName(name)} that is refused because ${why}`, {
    hint: "the layer tries to write outside the root filesystem or through a link; do not use this image",
  });
}

/**
 * Header checks made in both passes, before an entry is used: name and link target syntax,
 * size field sanity. (Tree checks need the plan: see planFlatten.)
 */
function checkHeader(h: TarHeaders, ref: string, layer: LayerBlob, maxBytes: number): void {
  for (const [field, value] of [["name", h.name], ["link target", h.linkname]] as const) {
    if (typeof value !== "string") continue;
    if (value.includes("\0")) throw unsafeEntry(ref, layer, h.name, `its ${field} contains a NUL byte`);
    const bytes = Buffer.byteLength(value);
    if (bytes > MAX_PATH_BYTES) {
      throw new ImageError("IMAGE_LAYER_NAME_TOO_LONG", `${layerWhat(ref, layer)} has entry ${showName(h.name)} whose ${field} is ${bytes} bytes long, more than ${MAX_PATH_BYTES}`, {
        hint: "Linux cannot hold such paths; the layer is corrupt or hostile",
      });
    }
    if (field === "link target" && h.type === "symlink") continue; // any text: it is never walked here
    for (const part of value.split("/")) {
      const n = Buffer.byteLength(part);
      if (n > MAX_COMPONENT_BYTES) {
        throw new ImageError("IMAGE_LAYER_NAME_TOO_LONG", `${layerWhat(ref, layer)} has entry ${showName(h.name)} whose ${field} has a component of ${n} bytes, more than ${MAX_COMPONENT_BYTES}`, {
          hint: "Linux file names are at most 255 bytes; the layer is corrupt or hostile",
        });
      }
    }
  }
  if (normalizeTarPath(h.name).unsafe) throw unsafeEntry(ref, layer, h.name, "its path has a '..' component");
  if (h.type === "link" && normalizeTarPath(h.linkname ?? "").unsafe) {
    throw unsafeEntry(ref, layer, h.name, `its hardlink target ${JSON.stringify(h.linkname)} has a '..' component`);
  }
  const size = h.size ?? 0;
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new ImageError("IMAGE_LAYER_INVALID", `${layerWhat(ref, layer)} has entry ${showName(h.name)} with an invalid size field (${size})`, {
      hint: "the layer is corrupt or hostile",
    });
  }
  if (size > maxBytes) {
    throw new ImageError("IMAGE_LAYER_TOO_LARGE", `${layerWhat(ref, layer)} has entry ${showName(h.name)} of ${size} bytes, more than the ${maxBytes}-byte layer limit`, {
      hint: "raise FlattenOptions.maxLayerBytes if the image is legitimate",
    });
  }
}

/** Detects a layer's compression by magic bytes (decompress.ts); a missing blob is reported as such. */
async function layerCompression(layer: LayerBlob, ref: string): Promise<Compression> {
  let head: Buffer;
  try {
    head = await readHead(layer.path);
  } catch (cause) {
    throw new ImageError("IMAGE_BLOB_MISSING", `image ${JSON.stringify(ref)}: layer blob ${layer.digest} is missing (${layer.path})`, {
      cause,
      hint: "the layout is incomplete; export the image again",
    });
  }
  return detectCompression(head, layerWhat(ref, layer));
}

/**
 * Yields the tar entries of a layer blob, decompressing as needed and enforcing the size and
 * entry-count limits and the header checks; after the last entry, checks that the blob's size
 * and sha256 match its descriptor. Stopping early (or any failure) tears down the decoder,
 * killing a zstd child.
 */
async function* layerEntries(layer: LayerBlob, ref: string, opts: FlattenOptions): AsyncGenerator<TarEntry> {
  const maxBytes = opts.maxLayerBytes ?? DEFAULT_MAX_LAYER_BYTES;
  const maxEntries = opts.maxLayerEntries ?? DEFAULT_MAX_LAYER_ENTRIES;
  const compression = await layerCompression(layer, ref);
  let current: TarHeaders | undefined; // the last entry handed out
  let currentRead = false; // all its data was read
  const where = () => (current ? ` (${currentRead ? "after" : "in"} entry ${showName(current.name)})` : " (before the first entry)");

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
  const body = decompressStream(file, compression, {
    what: layerWhat(ref, layer),
    maxBytes,
    tooLarge: (limit) =>
      new ImageError("IMAGE_LAYER_TOO_LARGE", `${layerWhat(ref, layer)} decompresses to more than ${limit} bytes${where()}; decompression was stopped`, {
        hint: "raise FlattenOptions.maxLayerBytes if the image is legitimate; otherwise it is a decompression bomb",
      }),
  });
  const extract = tar.extract({ allowUnknownFormat: true } as Parameters<typeof tar.extract>[0]);
  body.on("error", (err) => extract.destroy(err));
  body.pipe(extract as unknown as NodeJS.WritableStream);
  const cleanup = () => {
    body.destroy(); // pipeline: also destroys the file and the decoder
    file.destroy();
    extract.destroy();
  };

  let completed = false;
  let count = 0;
  try {
    for await (const entry of extract) {
      const h = entry.header as TarHeaders;
      current = h;
      currentRead = false;
      entry.once("end", () => void (current === h && (currentRead = true)));
      if (++count > maxEntries) {
        throw new ImageError("IMAGE_LAYER_TOO_MANY_ENTRIES", `${layerWhat(ref, layer)} has more than ${maxEntries} entries (the limit was reached at entry ${showName(h.name)})`, {
          hint: "raise FlattenOptions.maxLayerEntries if the image is legitimate",
        });
      }
      checkHeader(h, ref, layer, maxBytes);
      yield entry;
    }
    body.unpipe(extract as unknown as NodeJS.WritableStream);
    body.resume(); // hash whatever follows the end-of-archive marker
    await fileDone;
    completed = true;
  } catch (err) {
    const failing = failingHeader(extract, current);
    cleanup();
    if (err instanceof SupermachineError) throw err;
    // A corrupt blob usually fails to decode first; report it as what it is.
    const actual = await hashFile(layer.path).catch(() => undefined);
    if (actual !== undefined && actual !== layer.digest) throw digestMismatch(ref, layer.digest, actual, layer.path);
    const at = failing ? ` (at entry ${showName(failing.name)})` : where();
    const kind = compression === "none" ? "" : `${compression}-compressed `;
    throw new ImageError("IMAGE_LAYER_INVALID", `${layerWhat(ref, layer)} (${layer.path}) is not a valid ${kind}tar archive: ${(err as Error).message}${at}`, {
      cause: err,
      hint: "the layer is truncated, corrupt or hostile; export the image again",
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

/**
 * The header tar-stream was decoding when it failed, when that is a new one (for messages:
 * tar-stream throws before handing out the entry; for a bad pax or GNU long-name header this is
 * that header, e.g. "PaxHeader/..."). Reads a private field; harmless if absent.
 */
function failingHeader(extract: tar.Extract, last: TarHeaders | undefined): TarHeaders | undefined {
  const h = (extract as unknown as { _header?: TarHeaders | null })._header;
  if (!h || h === last || typeof h.name !== "string" || h.name === "") return undefined;
  return h;
}

async function hashFile(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return `sha256:${hash.digest("hex")}`;
}
