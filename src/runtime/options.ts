/**
 * Public option types (names and defaults follow @supermachine/core) and their validation.
 * Unknown keys are rejected with the list of accepted ones, so a typo never silently falls
 * back to a default; options that this version does not implement yet are rejected by name.
 */
import { resolve as resolvePath } from "node:path";
import { OptionError, listAccepted } from "../errors.js";
import type { ImageProgress } from "../image/store.js";

export interface ExtraFile {
  hostPath: string;
  guestPath: string;
}

export interface BuildOptions {
  ref: string;
  name?: string;
  memoryMib?: number;
  vcpus?: number;
  pullPolicy?: "always" | "missing" | "never";
  cmd?: string[];
  env?: Record<string, string>;
  guestPort?: number;
  listenerRequired?: boolean;
  extraFiles?: ExtraFile[];
  warmupTag?: string;
  warmup?: (vm: unknown) => Promise<void>;
  snapshotsDir?: string;
  /** Platform to pick from a multi-platform image, `os/arch[/variant]` (default: linux/<host arch>). */
  platform?: string;
  /** Registries (host[:port]) reached over plain HTTP; loopback ones always are. */
  insecureRegistries?: string[];
  /** Progress of pulls and image conversion (layer bytes, phases). */
  onProgress?: (p: ImageProgress) => void;
}

export interface PoolOptions {
  min?: number;
  max?: number;
  acquireTimeoutMs?: number;
  idleTimeoutMs?: number;
  restoreOnRelease?: boolean;
  memoryMib?: number;
  vcpus?: number;
  restoreTimeoutMs?: number;
}

export interface StagedFileMode {
  path: string;
  bytes: Buffer;
  mode: number;
}

export interface ExecOptions {
  argv: string[];
  stageFiles?: Record<string, Buffer>;
  stageFilesMode?: StagedFileMode[];
  timeoutMs?: number;
  env?: Record<string, string>;
  cwd?: string;
  chain?: string[];
  tty?: boolean;
  winsize?: { cols: number; rows: number };
  /** Aborting kills the process (its whole process group) and rejects the call. */
  signal?: AbortSignal;
}

export interface ExecOutput {
  stdout: Buffer;
  stderr: Buffer;
  /** Exit status; -1 when the process was killed by a signal or the timeout. */
  exitCode: number;
}

export const BUILD_DEFAULTS = { memoryMib: 256, vcpus: 1, pullPolicy: "missing", guestPort: 80, warmupTag: "default" } as const;
export const POOL_DEFAULTS = { min: 1, max: 1, acquireTimeoutMs: 60_000, restoreOnRelease: true, restoreTimeoutMs: 30_000 } as const;
export const EXEC_DEFAULT_TIMEOUT_MS = 60_000;
/** Cap of each direction of vm.writeFile / vm.readFile and of each staged file. */
export const FILE_LIMIT = 4 * 1024 * 1024;

const BUILD_KEYS = [
  "ref", "name", "memoryMib", "vcpus", "pullPolicy", "cmd", "env", "guestPort", "listenerRequired",
  "extraFiles", "warmupTag", "warmup", "snapshotsDir", "platform", "insecureRegistries", "onProgress",
] as const;
/** Accepted by the type but not implemented by this version: refused by name rather than ignored. */
const BUILD_NOT_YET: Record<string, string> = {
  warmup: "warmup closures arrive with the declarative layer; bake state with a workload (cmd) for now",
  extraFiles: "extraFiles arrive with the declarative layer; stage files with vm.writeFile or exec's stageFiles",
};
const POOL_KEYS = [
  "min", "max", "acquireTimeoutMs", "idleTimeoutMs", "restoreOnRelease", "memoryMib", "vcpus", "restoreTimeoutMs",
] as const;
const EXEC_KEYS = ["argv", "stageFiles", "stageFilesMode", "timeoutMs", "env", "cwd", "chain", "tty", "winsize", "signal"] as const;

function checkKeys(what: string, obj: object, accepted: readonly string[]): void {
  for (const k of Object.keys(obj)) {
    if (!accepted.includes(k)) {
      throw new OptionError("OPTION_UNKNOWN", `${what}: unknown option ${JSON.stringify(k)}`, {
        hint: `accepted options: ${listAccepted(accepted)}`,
      });
    }
  }
}

function checkObject(what: string, v: unknown): asserts v is Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new OptionError("OPTION_INVALID", `${what} must be an object, got ${v === null ? "null" : typeof v}`);
  }
}

export function positiveInt(what: string, v: unknown, { min = 1, max = Number.MAX_SAFE_INTEGER } = {}): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
    throw new OptionError("OPTION_INVALID", `${what} must be an integer from ${min} to ${max}, got ${JSON.stringify(v)}`);
  }
  return v;
}

function stringArray(what: string, v: unknown, nonEmpty: boolean): string[] {
  if (!Array.isArray(v) || (nonEmpty && v.length === 0) || v.some((a) => typeof a !== "string")) {
    throw new OptionError("OPTION_INVALID", `${what} must be ${nonEmpty ? "a non-empty" : "an"} array of strings, got ${JSON.stringify(v)}`);
  }
  return v as string[];
}

export function stringRecord(what: string, v: unknown): Record<string, string> {
  checkObject(what, v);
  for (const [k, val] of Object.entries(v)) {
    if (typeof val !== "string") throw new OptionError("OPTION_INVALID", `${what}.${k} must be a string, got ${typeof val}`);
    if (!k || k.includes("=") || k.includes("\0")) {
      throw new OptionError("OPTION_INVALID", `${what}: ${JSON.stringify(k)} is not a valid environment variable name`);
    }
  }
  return v as Record<string, string>;
}

export interface ResolvedBuild {
  ref: string;
  name: string | undefined;
  guestPort: number;
  listenerRequired: boolean;
  warmupTag: string;
  snapshotsDir: string | undefined;
  memoryMib: number;
  vcpus: number;
  pullPolicy: "always" | "missing" | "never";
  cmd: string[] | undefined;
  env: Record<string, string>;
  platform: { os: string; architecture: string; variant?: string } | undefined;
  insecureRegistries: string[] | undefined;
  onProgress: ((p: ImageProgress) => void) | undefined;
}

function parsePlatform(v: unknown): ResolvedBuild["platform"] {
  if (v === undefined) return undefined;
  const m = typeof v === "string" ? /^([a-z0-9]+)\/([a-z0-9_]+)(?:\/([a-z0-9]+))?$/.exec(v) : null;
  if (!m) {
    throw new OptionError("OPTION_INVALID", `Image.build: platform ${JSON.stringify(v)} is not of the form os/arch[/variant]`, {
      hint: 'for example "linux/amd64" or "linux/arm64/v8"',
    });
  }
  return m[3] ? { os: m[1]!, architecture: m[2]!, variant: m[3] } : { os: m[1]!, architecture: m[2]! };
}

export function resolveBuildOptions(o: unknown): ResolvedBuild {
  checkObject("Image.build options", o);
  checkKeys("Image.build", o, BUILD_KEYS);
  for (const [k, why] of Object.entries(BUILD_NOT_YET)) {
    if (o[k] !== undefined && o[k] !== false) {
      throw new OptionError("OPTION_NOT_SUPPORTED_YET", `Image.build: option ${JSON.stringify(k)} is not supported by this version`, { hint: why });
    }
  }
  if (typeof o.ref !== "string" || o.ref.trim() === "") {
    throw new OptionError("OPTION_REF_REQUIRED", "Image.build: `ref` is required (an image reference such as \"builtin:busybox\" or \"oci:./layout:tag\")");
  }
  const pullPolicy = o.pullPolicy ?? BUILD_DEFAULTS.pullPolicy;
  const policies = ["always", "missing", "never"];
  if (typeof pullPolicy !== "string" || !policies.includes(pullPolicy)) {
    throw new OptionError("OPTION_INVALID", `Image.build: pullPolicy ${JSON.stringify(pullPolicy)} is not valid`, {
      hint: `accepted values: ${listAccepted(policies)}`,
    });
  }
  if (o.name !== undefined && (typeof o.name !== "string" || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(o.name))) {
    throw new OptionError("OPTION_INVALID", `Image.build: name ${JSON.stringify(o.name)} must match [A-Za-z0-9][A-Za-z0-9._-]*`);
  }
  if (o.warmupTag !== undefined && typeof o.warmupTag !== "string") {
    throw new OptionError("OPTION_INVALID", `Image.build: warmupTag must be a string, got ${JSON.stringify(o.warmupTag)}`);
  }
  if (o.snapshotsDir !== undefined && (typeof o.snapshotsDir !== "string" || o.snapshotsDir === "")) {
    throw new OptionError("OPTION_INVALID", `Image.build: snapshotsDir must be a directory path, got ${JSON.stringify(o.snapshotsDir)}`);
  }
  return {
    ref: o.ref.trim(),
    name: o.name as string | undefined,
    guestPort: positiveInt("Image.build: guestPort", o.guestPort ?? BUILD_DEFAULTS.guestPort, { max: 65535 }),
    listenerRequired: o.listenerRequired === true,
    warmupTag: (o.warmupTag as string | undefined) ?? BUILD_DEFAULTS.warmupTag,
    snapshotsDir: o.snapshotsDir === undefined ? undefined : resolvePath(o.snapshotsDir as string),
    memoryMib: positiveInt("Image.build: memoryMib", o.memoryMib ?? BUILD_DEFAULTS.memoryMib, { min: 64, max: 1 << 20 }),
    vcpus: positiveInt("Image.build: vcpus", o.vcpus ?? BUILD_DEFAULTS.vcpus, { max: 255 }),
    pullPolicy: pullPolicy as ResolvedBuild["pullPolicy"],
    cmd: o.cmd === undefined ? undefined : stringArray("Image.build: cmd", o.cmd, true),
    env: o.env === undefined ? {} : stringRecord("Image.build: env", o.env),
    platform: parsePlatform(o.platform),
    insecureRegistries: o.insecureRegistries === undefined ? undefined : stringArray("Image.build: insecureRegistries", o.insecureRegistries, false),
    onProgress: typeof o.onProgress === "function" ? (o.onProgress as ResolvedBuild["onProgress"]) : undefined,
  };
}

export interface ResolvedPool {
  min: number;
  max: number;
  acquireTimeoutMs: number;
  idleTimeoutMs: number | undefined;
  restoreOnRelease: boolean;
  memoryMib: number | undefined;
  vcpus: number | undefined;
  restoreTimeoutMs: number;
}

export function resolvePoolOptions(o: unknown = {}): ResolvedPool {
  checkObject("pool options", o);
  checkKeys("image.pool", o, POOL_KEYS);
  const min = positiveInt("image.pool: min", o.min ?? POOL_DEFAULTS.min, { min: 0, max: 4096 });
  const max = positiveInt("image.pool: max", o.max ?? Math.max(POOL_DEFAULTS.max, min), { min: 1, max: 4096 });
  if (min > max) throw new OptionError("OPTION_INVALID", `image.pool: min (${min}) is larger than max (${max})`);
  if (o.restoreOnRelease !== undefined && typeof o.restoreOnRelease !== "boolean") {
    throw new OptionError("OPTION_INVALID", `image.pool: restoreOnRelease must be a boolean`);
  }
  return {
    min,
    max,
    acquireTimeoutMs: positiveInt("image.pool: acquireTimeoutMs", o.acquireTimeoutMs ?? POOL_DEFAULTS.acquireTimeoutMs, { min: 0 }),
    idleTimeoutMs: o.idleTimeoutMs === undefined ? undefined : positiveInt("image.pool: idleTimeoutMs", o.idleTimeoutMs),
    restoreOnRelease: (o.restoreOnRelease as boolean | undefined) ?? POOL_DEFAULTS.restoreOnRelease,
    memoryMib: o.memoryMib === undefined ? undefined : positiveInt("image.pool: memoryMib", o.memoryMib, { min: 64, max: 1 << 20 }),
    vcpus: o.vcpus === undefined ? undefined : positiveInt("image.pool: vcpus", o.vcpus, { max: 255 }),
    restoreTimeoutMs: positiveInt("image.pool: restoreTimeoutMs", o.restoreTimeoutMs ?? POOL_DEFAULTS.restoreTimeoutMs),
  };
}

export interface ResolvedExec {
  argv: string[];
  files: StagedFileMode[];
  timeoutMs: number;
  env: Record<string, string>;
  cwd: string | undefined;
  chain: string[] | undefined;
  signal: AbortSignal | undefined;
}

export function resolveExecOptions(o: unknown): ResolvedExec {
  checkObject("vm.exec options", o);
  checkKeys("vm.exec", o, EXEC_KEYS);
  if (o.tty) {
    throw new OptionError("OPTION_NOT_SUPPORTED_YET", "vm.exec: `tty` is not supported by this version", { hint: "omit tty (pipes are used)" });
  }
  const argv = stringArray("vm.exec: argv", o.argv, true);
  const files: StagedFileMode[] = [];
  if (o.stageFiles !== undefined) {
    checkObject("vm.exec: stageFiles", o.stageFiles);
    for (const [path, bytes] of Object.entries(o.stageFiles)) files.push(stagedFile("vm.exec: stageFiles", path, bytes, 0o644));
  }
  if (o.stageFilesMode !== undefined) {
    if (!Array.isArray(o.stageFilesMode)) throw new OptionError("OPTION_INVALID", "vm.exec: stageFilesMode must be an array of { path, bytes, mode }");
    for (const f of o.stageFilesMode as unknown[]) {
      checkObject("vm.exec: stageFilesMode entry", f);
      const mode = positiveInt(`vm.exec: stageFilesMode[${String(f.path)}].mode`, f.mode, { min: 0, max: 0o7777 });
      files.push(stagedFile("vm.exec: stageFilesMode", f.path, f.bytes ?? f.data, mode));
    }
  }
  if (o.cwd !== undefined && (typeof o.cwd !== "string" || o.cwd === "")) {
    throw new OptionError("OPTION_INVALID", `vm.exec: cwd must be a non-empty string, got ${JSON.stringify(o.cwd)}`);
  }
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) {
    throw new OptionError("OPTION_INVALID", "vm.exec: signal must be an AbortSignal");
  }
  return {
    argv,
    files,
    timeoutMs: positiveInt("vm.exec: timeoutMs", o.timeoutMs ?? EXEC_DEFAULT_TIMEOUT_MS, { min: 1 }),
    env: o.env === undefined ? {} : stringRecord("vm.exec: env", o.env),
    cwd: o.cwd as string | undefined,
    chain: o.chain === undefined ? undefined : stringArray("vm.exec: chain", o.chain, true),
    signal: o.signal as AbortSignal | undefined,
  };
}

function stagedFile(what: string, path: unknown, bytes: unknown, mode: number): StagedFileMode {
  if (typeof path !== "string" || !path.startsWith("/")) {
    throw new OptionError("OPTION_INVALID", `${what}: path ${JSON.stringify(path)} must be absolute`);
  }
  const buf = typeof bytes === "string" ? Buffer.from(bytes) : bytes instanceof Uint8Array ? Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength) : undefined;
  if (!buf) throw new OptionError("OPTION_INVALID", `${what}: contents of ${path} must be a Buffer`);
  if (buf.length > FILE_LIMIT) {
    throw new OptionError("OPTION_FILE_TOO_LARGE", `${what}: ${path} is ${buf.length} bytes, over the ${FILE_LIMIT}-byte limit`);
  }
  return { path, bytes: buf, mode };
}
