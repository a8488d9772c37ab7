/**
 * Building blocks of the option schemas: integers in a range, guest paths, environment records,
 * argv, signals, ports, exec limits, the image `User` form. Each carries the message a user sees
 * when a value is refused (src/schema/parse.ts turns it into an OptionError naming the option).
 */
import { posix } from "node:path";
import { constants as osConstants } from "node:os";
import { z } from "zod";

export const PULL_POLICIES = ["always", "missing", "never"] as const;
/** When a registry reference is pulled: every build, only when not present locally, or never. */
export type PullPolicy = (typeof PULL_POLICIES)[number];

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
export const guestDir = z.string({ error: "must be a string" }).refine((p) => p === "/" || isGuestPath(p), {
  error: "must be an absolute, normalised guest directory (like /srv/app)",
});

/** Buffer, Uint8Array or string; a string is taken as UTF-8. */
export const bytesLike = z
  .custom<Buffer | Uint8Array | string>((v) => typeof v === "string" || v instanceof Uint8Array, { error: "must be a Buffer, a Uint8Array or a string" })
  .transform((v) => (typeof v === "string" ? Buffer.from(v) : Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength)));

export const fileBytes = (max: number) =>
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

export const abortSignal = z.custom<AbortSignal>((v) => v instanceof AbortSignal, { error: "must be an AbortSignal" });
export const fn = <T>() => z.custom<T>((v) => typeof v === "function", { error: "must be a function" });

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
 * guest's defaults (sized from the VM: see docs/security.md).
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


export const platformSchema = z.string({ error: "must be a string of the form os/arch[/variant]" }).refine((v) => /^[a-z0-9]+\/[a-z0-9_]+(?:\/[a-z0-9]+)?$/.test(v), {
  error: "is not of the form os/arch[/variant]",
  params: { hint: 'for example "linux/amd64" or "linux/arm64/v8"' },
});

/** A host file staged into the guest before the snapshot (Image.build's `extraFiles`). */
export interface ExtraFile {
  /** A file on the host; relative paths are resolved against the working directory. */
  hostPath: string;
  /** Where the file appears in the guest (absolute). */
  guestPath: string;
  /** Permission bits in the guest; default: the host file's. */
  mode?: number;
}

export const extraFileSchema = z
  .object({
    hostPath: z.string({ error: "must be a path on the host" }).min(1, { error: "must be a path on the host" }),
    guestPath,
    mode: intIn(0, 0o7777).optional(),
  })
  .strict();

/** extraFiles: each guest path once. */
export function checkExtraFiles(files: { guestPath: string }[] | undefined, ctx: z.RefinementCtx): void {
  const seen = new Set<string>();
  files?.forEach((f, i) => {
    if (seen.has(f.guestPath)) ctx.addIssue({ code: "custom", path: ["extraFiles", i, "guestPath"], input: f.guestPath, message: "appears twice in extraFiles" });
    seen.add(f.guestPath);
  });
}
