/**
 * A project's lockfile: `supermachine.lock` beside its config file, meant to be committed. It
 * pins every registry tag a root image's `ref` names (`python:3-bookworm`, for each platform
 * an image selects) to the image manifest it resolved to the first time, so that a build, a
 * cache import and a frozen build know their keys without asking a registry, and two machines
 * key the same project alike. `build --update` re-resolves pins over the network (updatePins).
 *
 * The file is JSON: `{ "version": 1, "pins": [{ ref, platform, digest, resolved }] }`, pins
 * sorted by ref then platform, keys in that order, so that the same pins always write the same
 * bytes. It is read as untrusted input (bounded in size, a regular file only, every entry
 * validated) and written whole, atomically (temp, fsync, rename, fsync of the directory) under
 * a lock beside it, after merging with what is on disk then: concurrent builds that each add a
 * pin keep both. A build writes only when a pin changed.
 */
import { constants } from "node:fs";
import { open, readdir, rename, rm } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { randomBytes } from "node:crypto";
import { z } from "zod";
import { ConfigError } from "../config/errors.js";
import { logger } from "../debug.js";
import { BuildError } from "../errors.js";
import type { ImageGraph } from "../graph/graph.js";
import { parsePlatform, pinnableRef, platformOf, type Pin, type RefPins } from "../image/pins.js";
import { resolveTag } from "../image/resolve.js";
import { fsyncPath } from "../store/durable.js";
import { acquireLock } from "../store/lock.js";

export type { Pin };

const log = logger("lock");

export const LOCK_FILE = "supermachine.lock";
export const LOCK_FORMAT_VERSION = 1;
/** A lockfile holds a line or two per root image: anything near this size is not one. */
export const MAX_LOCK_BYTES = 1024 * 1024;
const MAX_PINS = 4096;

const DIGEST = /^sha256:[0-9a-f]{64}$/;
const PLATFORM = /^[a-z0-9]+\/[a-z0-9_]+(\/[a-z0-9]+)?$/;

const pinSchema = z.strictObject({
  ref: z.string().min(1).max(1024),
  platform: z.string().regex(PLATFORM, "must be os/arch[/variant], e.g. linux/amd64"),
  digest: z.string().regex(DIGEST, "must be sha256:<64 hex digits>"),
  resolved: z.string().min(1).max(1024),
});

/** What a write changed: a pin added, moved to another digest (`before`), or dropped. */
export interface LockChange extends Pin {
  change: "pinned" | "moved" | "dropped";
  before?: string;
}

type Pending = { kind: "add" | "set"; pin: Pin } | { kind: "drop"; pin: Pin };

const keyOf = (ref: string, platform: string) => `${ref}\0${platform}`;

/** The lockfile of the project whose config file is in `root`. */
export function lockPathOf(root: string): string {
  return join(root, LOCK_FILE);
}

/** A project's pins as read from its lockfile, plus what this process will write to it. */
export class ProjectLock implements RefPins {
  private readonly pending = new Map<string, Pending>();
  /** Every change this object has written to the file, in order. */
  readonly written: LockChange[] = [];

  private constructor(
    readonly file: string,
    private pins: Map<string, Pin>,
  ) {}

  /** Reads the lockfile of the project in `root` (no file: no pins yet). Throws CONFIG_LOCK_INVALID. */
  static async open(root: string): Promise<ProjectLock> {
    const file = lockPathOf(root);
    return new ProjectLock(file, (await readLockFile(file))?.pins ?? new Map());
  }

  /** The pins, sorted as the file lists them. */
  get entries(): Pin[] {
    return sortPins(this.pins.values());
  }

  get(ref: string, platform: string): string | undefined {
    const k = keyOf(ref, platform);
    const p = this.pending.get(k);
    if (p) return p.kind === "drop" ? undefined : p.pin.digest;
    return this.pins.get(k)?.digest;
  }

  /** A first resolve: pinned when the file has no pin for it by the time it is written. */
  record(pin: Pin): void {
    const k = keyOf(pin.ref, pin.platform);
    if (!this.pending.has(k) && !this.pins.has(k)) this.pending.set(k, { kind: "add", pin });
  }

  /** A re-resolve (`--update`): replaces the pin whatever the file says. */
  set(pin: Pin): void {
    this.pending.set(keyOf(pin.ref, pin.platform), { kind: "set", pin });
  }

  /** Forgets a pin (`--update` of the whole project drops the pins no image uses). */
  drop(ref: string, platform: string): void {
    const k = keyOf(ref, platform);
    const pin = this.pins.get(k) ?? this.pending.get(k)?.pin;
    if (pin) this.pending.set(k, { kind: "drop", pin });
  }

  /**
   * Writes what changed since the file was read, merged with what the file holds now (another
   * build may have written meanwhile: its pins are kept, and a pin it added first wins over one
   * this build only recorded). Resolves with the changes; writes nothing when there are none.
   */
  async save(): Promise<LockChange[]> {
    if (this.pending.size === 0) return [];
    const lock = await acquireLock(join(dirname(this.file), `.${basename(this.file)}.lock`), { what: `lockfile ${this.file}` }).catch((err: unknown) => {
      throw writeFailed(this.file, err);
    });
    try {
      const next = new Map((await readLockFile(this.file))?.pins ?? []);
      const changes: LockChange[] = [];
      for (const [k, p] of this.pending) {
        const cur = next.get(k);
        if (p.kind === "drop") {
          if (cur) {
            next.delete(k);
            changes.push({ ...cur, change: "dropped" });
          }
        } else if (!cur) {
          next.set(k, p.pin);
          changes.push({ ...p.pin, change: "pinned" });
        } else if (p.kind === "set" && (cur.digest !== p.pin.digest || cur.resolved !== p.pin.resolved)) {
          next.set(k, p.pin);
          changes.push({ ...p.pin, change: "moved", before: cur.digest });
        } else if (p.kind === "add" && cur.digest !== p.pin.digest) {
          log("%s (%s): another build pinned %s first; this one resolved %s", p.pin.ref, p.pin.platform, cur.digest, p.pin.digest);
        }
      }
      this.pending.clear();
      this.pins = next;
      if (changes.length) {
        await writeLockFile(this.file, next);
        this.written.push(...changes);
        log("%s: %s", this.file, changes.map((c) => `${c.change} ${c.ref} (${c.platform})`).join(", "));
      }
      return changes;
    } finally {
      await lock.release();
    }
  }
}

/** The project's lockfile, opened for a command on the project at `root`. */
export function openLock(project: { root: string }): Promise<ProjectLock> {
  return ProjectLock.open(project.root);
}

function sortPins(pins: Iterable<Pin>): Pin[] {
  const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
  return [...pins].sort((a, b) => cmp(a.ref, b.ref) || cmp(a.platform, b.platform));
}

/** The file's bytes for `pins`: the same pins always give the same text. */
export function formatLock(pins: Iterable<Pin>): string {
  const list = sortPins(pins).map((p) => ({ ref: p.ref, platform: p.platform, digest: p.digest, resolved: p.resolved }));
  return JSON.stringify({ version: LOCK_FORMAT_VERSION, pins: list }, null, 2) + "\n";
}

const invalid = (file: string, what: string, cause?: unknown) =>
  new ConfigError("CONFIG_LOCK_INVALID", `lockfile ${file}: ${what}`, {
    file,
    ...(cause !== undefined ? { cause } : {}),
    hint: `${LOCK_FILE} is written by supermachine build: restore it from version control, or delete the entry at fault (or the file) and build again to pin the tags anew (supermachine build --update re-resolves every pin)`,
  });

function writeFailed(file: string, err: unknown): ConfigError {
  return new ConfigError("CONFIG_LOCK_WRITE_FAILED", `could not write the lockfile ${file}: ${(err as Error).message}`, {
    file,
    cause: err,
    hint: "the project's directory must be writable by builds that pin new tags; or pin them once where it is (supermachine build), commit the lockfile, and build with --frozen",
  });
}

/**
 * Reads and validates the lockfile at `file`; undefined when there is none. Only a regular file
 * is read (opened without blocking, so a FIFO cannot hang the build), and at most MAX_LOCK_BYTES.
 */
export async function readLockFile(file: string): Promise<{ pins: Map<string, Pin> } | undefined> {
  let fh;
  try {
    fh = await open(file, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOCTTY);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw invalid(file, `cannot be read (${(err as Error).message})`, err);
  }
  let text: string;
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw invalid(file, "is not a regular file");
    if (st.size > MAX_LOCK_BYTES) throw invalid(file, `is ${st.size} bytes, more than the ${MAX_LOCK_BYTES}-byte limit of a lockfile`);
    const buf = Buffer.alloc(Math.min(st.size, MAX_LOCK_BYTES) + 1);
    let n = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, n, buf.length - n, n);
      if (bytesRead === 0) break;
      n += bytesRead;
      if (n === buf.length) throw invalid(file, `grew past ${MAX_LOCK_BYTES} bytes while being read`);
    }
    text = buf.subarray(0, n).toString("utf8");
  } finally {
    await fh.close();
  }
  return { pins: parseLock(file, text) };
}

/** Validates a lockfile's text; throws CONFIG_LOCK_INVALID naming the file and the entry at fault. */
export function parseLock(file: string, text: string): Map<string, Pin> {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw invalid(file, `is not valid JSON (${(err as Error).message})`, err);
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) throw invalid(file, "must be a JSON object with version and pins");
  const doc = raw as Record<string, unknown>;
  const unknown = Object.keys(doc).filter((k) => k !== "version" && k !== "pins");
  if (unknown.length) throw invalid(file, `has unknown field${unknown.length > 1 ? "s" : ""} ${unknown.map((k) => JSON.stringify(k)).join(", ")} (a lockfile has version and pins)`);
  if (doc.version !== LOCK_FORMAT_VERSION) {
    const newer = typeof doc.version === "number" && doc.version > LOCK_FORMAT_VERSION;
    throw new ConfigError("CONFIG_LOCK_INVALID", `lockfile ${file}: version ${JSON.stringify(doc.version ?? null)} is not one this version of supermachine reads (it reads version ${LOCK_FORMAT_VERSION})`, {
      file,
      hint: newer ? "it was written by a newer supermachine: upgrade this one" : `${LOCK_FILE} is written by supermachine build: restore it from version control, or delete it and build again to pin the tags anew`,
    });
  }
  if (!Array.isArray(doc.pins)) throw invalid(file, "pins must be an array");
  if (doc.pins.length > MAX_PINS) throw invalid(file, `has ${doc.pins.length} pins, more than the ${MAX_PINS} a lockfile may hold`);
  const pins = new Map<string, Pin>();
  doc.pins.forEach((entry, i) => {
    const label = describeEntry(entry, i);
    const r = pinSchema.safeParse(entry);
    if (!r.success) {
      const issue = r.error.issues[0]!;
      const field = issue.path.length ? String(issue.path[0]) : "";
      const what = issue.code === "unrecognized_keys" ? `has unknown field${issue.keys.length > 1 ? "s" : ""} ${issue.keys.map((k) => JSON.stringify(k)).join(", ")} (an entry has ref, platform, digest and resolved)` : `${field || "the entry"} ${issue.message}`;
      throw invalid(file, `${label}: ${what}`);
    }
    const pin = r.data;
    const canonical = pinnableRef(pin.ref);
    if (canonical === undefined) throw invalid(file, `${label}: ref ${JSON.stringify(pin.ref)} is not a registry reference with a tag (only those are pinned)`);
    if (canonical !== pin.resolved) throw invalid(file, `${label}: resolved ${JSON.stringify(pin.resolved)} is not the name ref ${JSON.stringify(pin.ref)} stands for (${canonical})`);
    const k = keyOf(pin.ref, pin.platform);
    if (pins.has(k)) throw invalid(file, `${label}: ${pin.ref} is pinned twice for ${pin.platform}`);
    pins.set(k, pin);
  });
  return pins;
}

/** `pins[2] (python:3-bookworm, linux/amd64)`: the entry's index, and its names when it has them. */
function describeEntry(entry: unknown, i: number): string {
  const e = (entry !== null && typeof entry === "object" ? entry : {}) as Record<string, unknown>;
  const names = [e.ref, e.platform].filter((v): v is string => typeof v === "string" && v.length <= 200);
  return `pins[${i}]${names.length ? ` (${names.join(", ")})` : ""}`;
}

/** Replaces the file atomically: a temp beside it, fsynced, renamed over it, the directory fsynced. */
async function writeLockFile(file: string, pins: Map<string, Pin>): Promise<void> {
  const dir = dirname(file);
  const prefix = `.${basename(file)}.tmp-`;
  try {
    // Temps of writers that crashed (we hold the lock, so none is being written).
    for (const n of await readdir(dir)) if (n.startsWith(prefix) && /^[0-9a-f]+$/.test(n.slice(prefix.length))) await rm(join(dir, n), { force: true });
    const tmp = join(dir, `${prefix}${randomBytes(6).toString("hex")}`);
    try {
      // 0666 less the umask, as any file a user creates in a checkout: it is meant to be committed.
      const fh = await open(tmp, "wx", 0o666);
      try {
        await fh.writeFile(formatLock(pins.values()));
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(tmp, file);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
    await fsyncPath(dir);
  } catch (err) {
    throw writeFailed(file, err);
  }
}

/**
 * Re-resolves over the network the tags of `names` (their root images; every image without
 * names) and sets their pins (`build --update`). Without names, pins that no image of the
 * project uses any more are dropped. Nothing is written until the lock is saved.
 */
export async function updatePins(lock: ProjectLock, graph: ImageGraph, names: string[] = [], opts: { signal?: AbortSignal } = {}): Promise<void> {
  const roots = (order: string[]) => order.map((n) => graph.spec(n)).filter((s) => s.parent === null);
  const done = new Set<string>();
  for (const spec of roots(names.length ? graph.withAncestors(names) : graph.order)) {
    if (pinnableRef(spec.ref) === undefined) continue;
    const platform = platformOf(spec.platform);
    if (done.has(keyOf(spec.ref, platform))) continue;
    done.add(keyOf(spec.ref, platform));
    const { digest, canonical } = await resolveTag(spec.ref, {
      platform: parsePlatform(platform),
      ...(spec.insecureRegistries ? { insecureRegistries: spec.insecureRegistries } : {}),
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    log("%s (%s) resolves to %s", spec.ref, platform, digest);
    lock.set({ ref: spec.ref, platform, digest, resolved: canonical });
  }
  if (names.length) return;
  const used = new Set(roots(graph.order).filter((s) => pinnableRef(s.ref) !== undefined).map((s) => keyOf(s.ref, platformOf(s.platform))));
  for (const p of lock.entries) if (!used.has(keyOf(p.ref, p.platform))) lock.drop(p.ref, p.platform);
}

/**
 * A frozen build resolves no tag: every root image of `order` whose `ref` is a registry tag
 * must be pinned. Throws BUILD_FROZEN_UNPINNED naming each ref, its image and the lockfile.
 */
export function requirePins(lock: ProjectLock, graph: ImageGraph, order: string[]): void {
  const missing = order
    .map((n) => graph.spec(n))
    .filter((s) => s.parent === null && pinnableRef(s.ref) !== undefined && lock.get(s.ref, platformOf(s.platform)) === undefined);
  if (missing.length === 0) return;
  const what = missing.map((s) => `${JSON.stringify(s.ref)} (image ${s.name}, ${platformOf(s.platform)})`).join(", ");
  throw new BuildError("BUILD_FROZEN_UNPINNED", `frozen build: ${lock.file} does not pin ${what}`, {
    hint: `pin ${missing.length > 1 ? "them" : "it"} with a build that may resolve tags (supermachine build --update ${missing.map((s) => s.name).join(" ")}) and commit ${LOCK_FILE}, or build without --frozen`,
  });
}
