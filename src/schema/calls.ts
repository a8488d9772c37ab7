/**
 * The options of the calls a VM takes (`vm.exec`, `vm.spawn`, files, snapshots) as zod schemas,
 * with the types they accept and return, and what a warmup function gets. Names and defaults
 * follow @supermachine/core. Build and pool options are the option table's (./options.ts).
 */
import { z } from "zod";
import { abortSignal, argvSchema, envRecord, execLimitsSchema, fileBytes, guestDir, guestPath, intIn, type ExecLimits } from "./fields.js";

export const EXEC_DEFAULT_TIMEOUT_MS = 60_000;
/** Default cap of vm.writeFile / vm.readFile and of each staged file (the seed's 4 MiB). */
export const FILE_LIMIT = 4 * 1024 * 1024;
/** Default host-side deadline of a file transfer, a snapshot, or a spawn's start. */
export const CALL_DEFAULT_TIMEOUT_MS = 60_000;

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
  /**
   * Who this process runs as: `name`, `uid`, `name:group` or `uid:gid`, looked up in the guest
   * (default: the pool's `user`, else the image's `User`).
   */
  user?: string;
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
  user: z.string({ error: "must be a string" }).min(1, "must not be empty").optional(),
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
  /** Who owns the file (and directories it creates), in the form of exec's `user` (default root). */
  user?: string;
}

const callBase = {
  timeoutMs: intIn(1, Number.MAX_SAFE_INTEGER).default(CALL_DEFAULT_TIMEOUT_MS),
  signal: abortSignal.optional(),
};
export const callSchema = z.object(callBase).strict();
export const readFileSchema = z.object({ ...callBase, maxBytes: intIn(1, Number.MAX_SAFE_INTEGER).default(FILE_LIMIT) }).strict();
export const readStreamSchema = z.object({ ...callBase, maxBytes: intIn(1, Number.MAX_SAFE_INTEGER).optional() }).strict();
export const writeFileSchema = z
  .object({ ...callBase, mode: intIn(0, 0o7777).default(0o644), maxBytes: intIn(1, Number.MAX_SAFE_INTEGER).default(FILE_LIMIT), user: execBase.user })
  .strict();
export const writeStreamSchema = z
  .object({ ...callBase, mode: intIn(0, 0o7777).default(0o644), maxBytes: intIn(1, Number.MAX_SAFE_INTEGER).optional(), user: execBase.user })
  .strict();

/** Processes an exec left running after its main process ended (LIST_BACKGROUND). */
export interface BackgroundEntry {
  /** The exec's id (its cgroup, /sys/fs/cgroup/exec/<id>). */
  id: number;
  argv: string[];
  /** Guest pids of its processes. */
  pids: number[];
  /** Started with `detach`: a release leaves them running. */
  detached: boolean;
}

// ---- the file system: stat, readDir, makeDir, rename, remove, watchDir ------------------------

export interface StatOptions extends CallOptions {
  /** Report what a symlink points to rather than the symlink (default false, like lstat). */
  follow?: boolean;
}

export interface ReadDirOptions extends CallOptions {
  /** 1 (the default): the directory's entries; 2: theirs too; and so on. Symlinks are never followed. */
  depth?: number;
}

export interface MakeDirOptions extends CallOptions {
  /** Create missing parents too, and take an existing directory as success (default false). */
  parents?: boolean;
  /** Permission bits of every directory created (default 0o755, regardless of the umask). */
  mode?: number;
  /** Owner of every directory created (default: root, the agent's). */
  uid?: number;
  gid?: number;
}

export interface RemoveOptions extends CallOptions {
  /** Remove a directory and everything in it (never following a symlink out of it). */
  recursive?: boolean;
}

export interface WatchDirOptions {
  /** Also watch every directory below it, those created later included (default false). */
  recursive?: boolean;
  /** Aborting it ends the watch, as `close()` does. */
  signal?: AbortSignal;
}

/** A guest file's metadata (vm.stat, vm.readDir). */
export interface FileInfo {
  /** Absolute guest path. */
  path: string;
  /** Its last component ("/" for the root). */
  name: string;
  type: "file" | "directory" | "symlink" | "other";
  size: number;
  /** Permission, set-id and sticky bits (st_mode & 0o7777). */
  mode: number;
  uid: number;
  gid: number;
  /** Last modification, ms since the epoch (with the sub-millisecond part as a fraction). */
  mtimeMs: number;
  /** What a symlink points to, as stored. */
  symlinkTarget?: string;
}

/**
 * One change in a watched directory. `name` is relative to it (`f`, `sub/f`). A rename gives
 * `rename` for the old name and `create` for the new one (when inside the watched tree).
 */
export interface DirEvent {
  type: "create" | "write" | "remove" | "rename" | "chmod";
  name: string;
}

/**
 * A directory watch (vm.watchDir): iterate it for events. It ends when closed, when its signal
 * aborts, or when the watched directory is removed; it throws when the VM goes or the guest
 * ends it (GuestFileError EOVERFLOW when events came faster than they were read).
 */
export interface DirWatch extends AsyncIterable<DirEvent> {
  /** Ends the watch in the guest; iteration ends after the events already received. */
  close(): void;
}

const ownerId = intIn(0, 0xffff_fffe);
export const statSchema = z.object({ ...callBase, follow: z.boolean().default(false) }).strict();
export const readDirSchema = z.object({ ...callBase, depth: intIn(1, 0xffff_ffff).default(1) }).strict();
export const makeDirSchema = z
  .object({ ...callBase, parents: z.boolean().default(false), mode: intIn(0, 0o7777).default(0o755), uid: ownerId.optional(), gid: ownerId.optional() })
  .strict();
export const removeSchema = z.object({ ...callBase, recursive: z.boolean().default(false) }).strict();
export const watchDirSchema = z.object({ recursive: z.boolean().default(false), signal: abortSignal.optional() }).strict();
