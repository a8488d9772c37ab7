/**
 * The options of the public API, as zod schemas: one source for their types, defaults and
 * accepted values, shared by `Image.build`, `image.pool`, the `Vm` calls and (later) config
 * files. Names and defaults follow @supermachine/core. Unknown keys are refused with the list of
 * accepted ones, so a typo never silently falls back to a default.
 */
import { posix } from "node:path";
import { constants as osConstants } from "node:os";
import { z } from "zod";
import type { BuildProgress } from "./image.js";
import { networkSchema, type NetworkOption } from "./network.js";

export const BUILD_DEFAULTS = { memoryMib: 256, vcpus: 1, pullPolicy: "missing", guestPort: 80, warmupTag: "default" } as const;
export const POOL_DEFAULTS = { min: 1, max: 1, acquireTimeoutMs: 60_000, restoreOnRelease: true, restoreTimeoutMs: 30_000 } as const;
export const EXEC_DEFAULT_TIMEOUT_MS = 60_000;
/** Default cap of vm.writeFile / vm.readFile and of each staged file (the seed's 4 MiB). */
export const FILE_LIMIT = 4 * 1024 * 1024;
/** Default host-side deadline of a file transfer, a snapshot, or a spawn's start. */
export const CALL_DEFAULT_TIMEOUT_MS = 60_000;
export const PULL_POLICIES = ["always", "missing", "never"] as const;

// ---- building blocks ---------------------------------------------------------------------------

/** An integer option in [min, max], with the range in its message. */
export const intIn = (min: number, max: number) => {
  const error = `must be an integer from ${min} to ${max}`;
  return z.number({ error }).int({ error }).min(min, { error }).max(max, { error });
};

/** An absolute, normalised guest path: `/a/b`, not `a/b`, `/a/../b`, `/a//b` or `/a/`. */
export function isGuestPath(p: unknown): p is string {
  return typeof p === "string" && p.startsWith("/") && p.length > 1 && !p.includes("\0") && posix.normalize(p) === p && !p.endsWith("/");
}
export const guestPath = z.string({ error: "must be a string" }).refine(isGuestPath, {
  error: "must be an absolute, normalised guest path (like /srv/app/config.toml: no '..', '.', '//' or trailing '/')",
});
const guestDir = z.string({ error: "must be a string" }).refine((p) => p === "/" || isGuestPath(p), {
  error: "must be an absolute, normalised guest directory (like /srv/app)",
});

/** Buffer, Uint8Array or string; a string is taken as UTF-8. */
export const bytesLike = z
  .custom<Buffer | Uint8Array | string>((v) => typeof v === "string" || v instanceof Uint8Array, { error: "must be a Buffer, a Uint8Array or a string" })
  .transform((v) => (typeof v === "string" ? Buffer.from(v) : Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength)));

const fileBytes = (max: number) =>
  bytesLike.refine((b) => b.length <= max, {
    error: `must be at most ${max} bytes`,
    params: { code: "OPTION_FILE_TOO_LARGE", hint: "write large files with vm.writeFileStream" },
  });

const ENV_NAME = /^[^=\0]+$/;
export const envRecord = z.record(
  z.string().regex(ENV_NAME, { error: "is not a valid environment variable name (no '=' or NUL)" }),
  z.string({ error: "must be a string" }).refine((v) => !v.includes("\0"), { error: "must not contain a NUL byte" }),
  { error: (iss) => (iss.code === "invalid_type" ? "must be an object of string values" : undefined) },
);

const arg = z.string({ error: "must be a string" }).refine((a) => !a.includes("\0"), { error: "must not contain a NUL byte" });
/** A non-empty argv whose first entry names a program. */
export const argvSchema = z
  .array(arg, { error: "must be an array of strings" })
  .min(1, { error: "must not be empty (argv[0] is the program)" })
  .refine((a) => a[0] !== "", { error: "must start with a program name (argv[0] is empty)" });

const abortSignal = z.custom<AbortSignal>((v) => v instanceof AbortSignal, { error: "must be an AbortSignal" });
const fn = <T>() => z.custom<T>((v) => typeof v === "function", { error: "must be a function" });

const signalNames = Object.keys(osConstants.signals);
/** A signal number 1-64, or a name such as "SIGTERM"; resolves to the number. */
export const signalSchema = z
  .union([intIn(1, 64), z.string()], { error: `must be a signal number (1-64) or name` })
  .transform((v, ctx) => {
    if (typeof v === "number") return v;
    const n = (osConstants.signals as Record<string, number>)[v.toUpperCase().startsWith("SIG") ? v.toUpperCase() : `SIG${v.toUpperCase()}`];
    if (n === undefined) {
      ctx.addIssue({ code: "custom", message: "is not a signal name", params: { hint: `signal names: ${signalNames.slice(0, 12).join(", ")}, ...` } });
      return z.NEVER;
    }
    return n;
  });

export const portSchema = intIn(1, 65535);
export const hostPortSchema = intIn(0, 65535);

/**
 * Limits of the cgroup an exec or spawn runs in (its processes, chain and background ones
 * included). Unset fields take the next level's value: call, then pool, then image, then the
 * guest's defaults (sized from the VM: see the README's Security section).
 */
export interface ExecLimits {
  /** Processes and threads at once (pids.max); a fork beyond fails with EAGAIN. */
  processes?: number;
  /** Memory of the exec (memory.max, MiB), files it writes to tmpfs included; beyond it the OOM killer ends the whole exec (`oomKilled`). */
  memoryMib?: number;
}
/** `over`'s fields where set, `base`'s otherwise; undefined when neither sets any. */
export function mergeLimits(base: ExecLimits | undefined, over: ExecLimits | undefined): ExecLimits | undefined {
  const m: ExecLimits = {};
  const processes = over?.processes ?? base?.processes;
  const memoryMib = over?.memoryMib ?? base?.memoryMib;
  if (processes !== undefined) m.processes = processes;
  if (memoryMib !== undefined) m.memoryMib = memoryMib;
  return processes === undefined && memoryMib === undefined ? undefined : m;
}

export const execLimitsSchema = z
  .object({ processes: intIn(1, 4_194_304).optional(), memoryMib: intIn(1, 1 << 20).optional() }, { error: "must be an object { processes?, memoryMib? }" })
  .strict();

// ---- Image.build -------------------------------------------------------------------------------

export interface ExtraFile {
  /** A file on the host; relative paths are resolved against the working directory. */
  hostPath: string;
  /** Where the file appears in the guest (absolute). */
  guestPath: string;
  /** Permission bits in the guest; default: the host file's. */
  mode?: number;
}

/** The streaming side of vm.spawn, as the warmup interface names it (see ExecChild). */
export interface ExecChildLike {
  readonly pid: number | undefined;
  writeStdin(bytes: Buffer | Uint8Array | string): Promise<void>;
  closeStdin(): Promise<void>;
  readStdout(maxBytes?: number): Promise<Buffer>;
  readStderr(maxBytes?: number): Promise<Buffer>;
  signal(signum: number | string): Promise<void>;
  resize(cols: number, rows: number): Promise<void>;
  wait(): Promise<{ exitCode: number; timedOut: boolean; peakRssKib: number | null; signal: string | null; durationMs: number }>;
}

/** What a warmup function gets: the booted VM, before its snapshot is taken. */
export interface WarmupVm {
  exec(options: ExecOptions): Promise<ExecOutput>;
  spawn(options: SpawnOptions): Promise<ExecChildLike>;
  readFile(path: string, options?: ReadFileOptions): Promise<Buffer>;
  writeFile(path: string, bytes: Buffer | Uint8Array | string, options?: WriteFileOptions): Promise<void>;
}

export interface BuildOptions {
  /** Image reference: `alpine:3.20`, `oci:<dir>[:tag]`, `docker-archive:<file>`, `builtin:busybox`. */
  ref: string;
  /** Stable snapshot directory name (default: derived from the input hash). */
  name?: string;
  memoryMib?: number;
  vcpus?: number;
  pullPolicy?: "always" | "missing" | "never";
  /** The image workload (overrides ENTRYPOINT/CMD). */
  cmd?: string[];
  env?: Record<string, string>;
  guestPort?: number;
  listenerRequired?: boolean;
  /** Host files staged into the guest before the snapshot; their contents are part of the key. */
  extraFiles?: ExtraFile[];
  /** Part of the key of `warmup`: bump it when the warmup changes. */
  warmupTag?: string;
  /** Runs against the booted VM before the snapshot, so every VM starts warmed. */
  warmup?: (vm: WarmupVm) => Promise<void>;
  snapshotsDir?: string;
  /** Platform to pick from a multi-platform image, `os/arch[/variant]` (default: linux/<host arch>). */
  platform?: string;
  /** Registries (host[:port]) reached over plain HTTP; loopback ones always are. */
  insecureRegistries?: string[];
  /** Progress of pulls, image conversion and baking (layer bytes, phases). */
  onProgress?: (p: BuildProgress) => void;
  /** Limits of every exec in this image's VMs (warmup included), unless a pool or call sets them. */
  execLimits?: ExecLimits;
  /**
   * What the warmup may reach, through the host's egress proxy (part of the key): "none" (the
   * default) or `{ allow: ["pypi.org", "*.example.com", "10.0.0.5:8080"], hosts?, maxConnections?, maxBytes? }`.
   * Pools do not inherit it.
   */
  network?: NetworkOption;
}

const platformSchema = z.string({ error: "must be a string of the form os/arch[/variant]" }).refine((v) => /^[a-z0-9]+\/[a-z0-9_]+(?:\/[a-z0-9]+)?$/.test(v), {
  error: "is not of the form os/arch[/variant]",
  params: { hint: 'for example "linux/amd64" or "linux/arm64/v8"' },
});

export const extraFileSchema = z
  .object({
    hostPath: z.string({ error: "must be a path on the host" }).min(1, { error: "must be a path on the host" }),
    guestPath,
    mode: intIn(0, 0o7777).optional(),
  })
  .strict();

export const buildSchema = z
  .object({
    ref: z
      .string({ error: "is required: an image reference such as \"builtin:busybox\" or \"oci:./layout:tag\"" })
      .trim()
      .min(1, { error: "is required: an image reference such as \"builtin:busybox\" or \"oci:./layout:tag\"" }),
    name: z
      .string()
      .regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/, { error: "must match [A-Za-z0-9][A-Za-z0-9._-]* (at most 128 characters)" })
      .optional(),
    memoryMib: intIn(64, 1 << 20).default(BUILD_DEFAULTS.memoryMib),
    vcpus: intIn(1, 255).default(BUILD_DEFAULTS.vcpus),
    pullPolicy: z.enum(PULL_POLICIES).default(BUILD_DEFAULTS.pullPolicy),
    cmd: argvSchema.optional(),
    env: envRecord.default({}),
    guestPort: portSchema.default(BUILD_DEFAULTS.guestPort),
    listenerRequired: z.boolean({ error: "must be a boolean" }).default(false),
    extraFiles: z.array(extraFileSchema, { error: "must be an array of { hostPath, guestPath, mode? }" }).default([]),
    warmupTag: z.string({ error: "must be a string" }).default(BUILD_DEFAULTS.warmupTag),
    warmup: fn<(vm: WarmupVm) => Promise<void>>().optional(),
    snapshotsDir: z.string({ error: "must be a directory path" }).min(1, { error: "must be a directory path" }).optional(),
    platform: platformSchema.optional(),
    insecureRegistries: z.array(z.string(), { error: "must be an array of host[:port] strings" }).optional(),
    onProgress: fn<(p: BuildProgress) => void>().optional(),
    execLimits: execLimitsSchema.optional(),
    network: networkSchema,
  })
  .strict()
  .superRefine((o, ctx) => {
    const seen = new Set<string>();
    o.extraFiles.forEach((f, i) => {
      if (seen.has(f.guestPath)) ctx.addIssue({ code: "custom", path: ["extraFiles", i, "guestPath"], message: "appears twice in extraFiles" });
      seen.add(f.guestPath);
    });
  });
export type ResolvedBuild = z.output<typeof buildSchema>;

// ---- image.pool --------------------------------------------------------------------------------

export interface PoolOptions {
  min?: number;
  max?: number;
  acquireTimeoutMs?: number;
  idleTimeoutMs?: number;
  restoreOnRelease?: boolean;
  memoryMib?: number;
  vcpus?: number;
  restoreTimeoutMs?: number;
  /** Limits of every exec in this pool's VMs, unless a call sets them (over the image's). */
  execLimits?: ExecLimits;
  /** What the VMs may reach while checked out, through the host's egress proxy: "none" (the default) or `{ allow, ... }`. */
  network?: NetworkOption;
}

export const poolSchema = z
  .object({
    min: intIn(0, 4096).default(POOL_DEFAULTS.min),
    max: intIn(1, 4096).optional(),
    acquireTimeoutMs: intIn(0, Number.MAX_SAFE_INTEGER).default(POOL_DEFAULTS.acquireTimeoutMs),
    idleTimeoutMs: intIn(1, Number.MAX_SAFE_INTEGER).optional(),
    restoreOnRelease: z.boolean({ error: "must be a boolean" }).default(POOL_DEFAULTS.restoreOnRelease),
    memoryMib: intIn(64, 1 << 20).optional(),
    vcpus: intIn(1, 255).optional(),
    restoreTimeoutMs: intIn(1, Number.MAX_SAFE_INTEGER).default(POOL_DEFAULTS.restoreTimeoutMs),
    execLimits: execLimitsSchema.optional(),
    network: networkSchema,
  })
  .strict()
  .transform((o, ctx) => {
    const max = o.max ?? Math.max(POOL_DEFAULTS.max, o.min);
    if (o.min > max) {
      ctx.addIssue({ code: "custom", path: ["min"], message: `is larger than max (${max})`, input: o.min });
      return z.NEVER;
    }
    return { ...o, max };
  });
export type ResolvedPool = z.output<typeof poolSchema>;

// ---- vm.exec / vm.spawn ------------------------------------------------------------------------

export interface StagedFileMode {
  path: string;
  bytes: Buffer | Uint8Array | string;
  mode: number;
}

export interface Winsize {
  cols: number;
  rows: number;
}

export interface ExecOptions {
  /** The program and its arguments; argv[0] is looked up through the guest's PATH. */
  argv: string[];
  /** Files written into the guest before the process starts (mode 0644). */
  stageFiles?: Record<string, Buffer | Uint8Array | string>;
  /** Like stageFiles, with a mode each (e.g. 0o755 for scripts). */
  stageFilesMode?: StagedFileMode[];
  /** Guest-side wall-clock limit: the process group is killed and `timedOut` set. Default 60 000. */
  timeoutMs?: number;
  /** Merged over the image's environment. */
  env?: Record<string, string>;
  /** Working directory in the guest (default: the image's WorkingDir, else /). */
  cwd?: string;
  /** A second command, run only if argv exits 0 (in the same round trip). */
  chain?: string[];
  /** Run on a pseudo-terminal: stdout and stderr merge onto stdout. */
  tty?: boolean;
  /** Initial terminal size (tty only; default 80x24). */
  winsize?: Winsize;
  /** Aborting kills the process (its whole cgroup) and rejects the call. */
  signal?: AbortSignal;
  /** Limits of this exec's cgroup (over the pool's and the image's). */
  limits?: ExecLimits;
  /**
   * Processes it leaves running after its main process exits survive the VM's release to a
   * pool with `restoreOnRelease: false` (and `vm.killBackground()` without an id).
   */
  detach?: boolean;
}

/** vm.spawn: like exec, but `timeoutMs` has no default (a spawned process may run for long). */
export type SpawnOptions = ExecOptions;

export interface ExecOutput {
  stdout: Buffer;
  stderr: Buffer;
  /** Exit status; -1 when the process was killed by a signal or the timeout. */
  exitCode: number;
  /** The guest-side timeout killed it. */
  timedOut: boolean;
  /** Name of the signal that ended it (`"SIGKILL"`), or null when it exited. */
  signal: string | null;
  /** Guest time from the start to the end of the process (both commands with `chain`). */
  durationMs: number;
  /** The exec reached its memory limit and the OOM killer ended it (`signal` is SIGKILL). */
  oomKilled: boolean;
  /** A fork in the exec failed at its process limit. */
  pidsLimited: boolean;
}

const stagedFileSchema = z
  .object({ path: guestPath, bytes: fileBytes(FILE_LIMIT), mode: intIn(0, 0o7777) })
  .strict();

const execBase = {
  argv: argvSchema,
  stageFiles: z
    .record(guestPath, fileBytes(FILE_LIMIT), { error: (iss) => (iss.code === "invalid_type" ? "must be an object of guest path → Buffer" : undefined) })
    .optional(),
  stageFilesMode: z.array(stagedFileSchema, { error: "must be an array of { path, bytes, mode }" }).optional(),
  env: envRecord.default({}),
  cwd: guestDir.optional(),
  chain: argvSchema.optional(),
  tty: z.boolean({ error: "must be a boolean" }).default(false),
  winsize: z.object({ cols: intIn(1, 65535), rows: intIn(1, 65535) }).strict().optional(),
  signal: abortSignal.optional(),
  limits: execLimitsSchema.optional(),
  detach: z.boolean({ error: "must be a boolean" }).default(false),
};

function checkTty(o: { tty: boolean; winsize?: Winsize | undefined }, ctx: z.RefinementCtx): void {
  if (o.winsize && !o.tty) {
    ctx.addIssue({ code: "custom", path: ["winsize"], message: "needs tty: true (a size is only for a terminal)", input: o.winsize });
  }
}

const toFiles = (o: { stageFiles?: Record<string, Buffer> | undefined; stageFilesMode?: { path: string; bytes: Buffer; mode: number }[] | undefined }) => [
  ...Object.entries(o.stageFiles ?? {}).map(([path, bytes]) => ({ path, bytes, mode: 0o644 })),
  ...(o.stageFilesMode ?? []),
];

export const execSchema = z
  .object({ ...execBase, timeoutMs: intIn(1, Number.MAX_SAFE_INTEGER).default(EXEC_DEFAULT_TIMEOUT_MS) })
  .strict()
  .superRefine(checkTty)
  .transform((o) => ({ ...o, files: toFiles(o) }));
export type ResolvedExec = z.output<typeof execSchema>;

export const spawnSchema = z
  .object({ ...execBase, timeoutMs: intIn(1, Number.MAX_SAFE_INTEGER).optional() })
  .strict()
  .superRefine(checkTty)
  .transform((o) => ({ ...o, files: toFiles(o) }));
export type ResolvedSpawn = z.output<typeof spawnSchema>;

// ---- files, TCP, snapshot ----------------------------------------------------------------------

/** Options every VM call takes: a host-side deadline and an AbortSignal. */
export interface CallOptions {
  /** Host-side deadline for the call (default 60 000 ms). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface ReadFileOptions extends CallOptions {
  /** Largest file accepted (default 4 MiB). */
  maxBytes?: number;
}

export interface WriteFileOptions extends CallOptions {
  /** Permission bits (default 0o644). */
  mode?: number;
  /** Largest content accepted (default 4 MiB; writeFileStream has no limit unless given). */
  maxBytes?: number;
}

const callBase = {
  timeoutMs: intIn(1, Number.MAX_SAFE_INTEGER).default(CALL_DEFAULT_TIMEOUT_MS),
  signal: abortSignal.optional(),
};
export const callSchema = z.object(callBase).strict();
export const readFileSchema = z.object({ ...callBase, maxBytes: intIn(1, Number.MAX_SAFE_INTEGER).default(FILE_LIMIT) }).strict();
export const readStreamSchema = z.object({ ...callBase, maxBytes: intIn(1, Number.MAX_SAFE_INTEGER).optional() }).strict();
export const writeFileSchema = z
  .object({ ...callBase, mode: intIn(0, 0o7777).default(0o644), maxBytes: intIn(1, Number.MAX_SAFE_INTEGER).default(FILE_LIMIT) })
  .strict();
export const writeStreamSchema = z
  .object({ ...callBase, mode: intIn(0, 0o7777).default(0o644), maxBytes: intIn(1, Number.MAX_SAFE_INTEGER).optional() })
  .strict();
