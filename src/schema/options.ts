/**
 * The option table: every option of `Image.build` / `defineImage` and of `image.pool` / a config
 * file's pools, written once. Each row holds what is needed to accept, resolve and key it:
 *
 * - `schema`: the values accepted (zod; its messages are what a user sees, named by parse.ts);
 * - `default`: applied once, where the option is resolved (the graph for build options,
 *   `resolvePool` for pool options);
 * - `child` (build options): how an image built `from` another treats it;
 * - `key` (build options): the option's value in the snapshot key, under the option's own name,
 *   which is also how `why` names it (`why: "entries"` or `"guestPath"` names each entry);
 * - `type` and `doc`: its line in the options tables of docs/api.md (generated: ./options-doc.ts).
 *
 * From the table come the zod schemas (API and config declarations), the TypeScript types
 * (`z.input`), the defaults, the resolved node options the graph computes, the key inputs
 * (src/graph/keys.ts) and the docs. A new option is a row here plus the code that uses it.
 */
import { z } from "zod";
import type { BuildProgress } from "./image.js";
import { type ExtraFileKey, hashEnv } from "./key.js";
import { networkInputSchema, resolveNetwork, resolvedNetworkKey, type NetworkOption } from "./network.js";
import {
  PULL_POLICIES,
  argvSchema,
  checkExtraFiles,
  envRecord,
  execLimitsSchema,
  extraFileSchema,
  fn,
  intIn,
  mergeLimits,
  platformSchema,
  portSchema,
  type ExecLimits,
} from "./fields.js";
import type { WarmupVm } from "./calls.js";

/** What a key needs besides an option's value: the workload the image resolved to, and the extra files' hashes. */
export interface KeyFacts {
  workload: string[] | null;
  extraFiles: ExtraFileKey[];
}

/** How an image built `from` another image treats an option. */
export type ChildRule =
  /** Only a root image sets it; a child has its root's (the snapshot fixed it). */
  | "root"
  /** Inherited; a child may only repeat its parent's value. */
  | "same"
  /** The parent's value with the child's on top (`merge`). */
  | "merge"
  /** Each image's own, never inherited (the default when unset). */
  | "own"
  /** Not part of an image: how a call builds (never inherited, never keyed). */
  | "call";

/** One row of the option table. */
export interface OptionRow {
  schema: z.ZodType;
  /** The type as the docs show it. */
  type: string;
  doc: string;
  required?: true;
  default?: unknown;
  resolve?: (value: never) => unknown;
  child?: ChildRule;
  merge?: (parent: never, own: never) => unknown;
  key?: (value: never, facts: KeyFacts) => unknown;
  why?: "entries" | "guestPath";
}

const MAX = Number.MAX_SAFE_INTEGER;

// ---- Image.build / defineImage ----------------------------------------------------------------

export const buildOptions = {
  ref: {
    schema: z
      .string({ error: 'is required: an image reference such as "builtin:busybox" or "oci:./layout:tag"' })
      .trim()
      .min(1, { error: 'is required: an image reference such as "builtin:busybox" or "oci:./layout:tag"' }),
    type: "string",
    doc: "Image reference: `alpine:3.20`, `oci:<dir>[:tag]`, `docker-archive:<file>`, `builtin:busybox` (keyed by the manifest digest it resolves to).",
    required: true,
    child: "root",
  },
  name: {
    schema: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/, { error: "must match [A-Za-z0-9][A-Za-z0-9._-]* (at most 128 characters)" }),
    type: "string",
    doc: "Image.build: the snapshot directory's name (default `img-<key prefix>`). defineImage: the image's name in the project (default: the module's file name).",
    child: "call",
  },
  memoryMib: { schema: intIn(64, 1 << 20), type: "number", doc: "Guest RAM in MiB (the snapshot holds it).", default: 256, child: "same", key: (v: number) => v },
  vcpus: { schema: intIn(1, 255), type: "number", doc: "Guest CPUs (the snapshot holds them).", default: 1, child: "same", key: (v: number) => v },
  pullPolicy: {
    schema: z.enum(PULL_POLICIES),
    type: '"always" | "missing" | "never"',
    doc: "When to pull a registry reference: every build, only when not present locally, or never.",
    default: "missing",
    child: "root",
  },
  cmd: {
    schema: argvSchema,
    type: "string[]",
    doc: "The image workload, instead of ENTRYPOINT/CMD (keyed as the workload it resolves to).",
    child: "root",
    key: (_v: string[] | undefined, f: KeyFacts) => f.workload,
  },
  env: {
    schema: envRecord,
    type: "Record<string, string>",
    doc: "Build environment: the warmup's and the workload's, and every exec's default (values keyed as salted hashes).",
    default: {},
    child: "merge",
    merge: (parent: Record<string, string>, own: Record<string, string> | undefined) => ({ ...parent, ...own }),
    key: (v: Record<string, string>) => hashEnv(v),
    why: "entries",
  },
  guestPort: { schema: portSchema, type: "number", doc: "The workload's port in the guest.", default: 80, child: "root", key: (v: number) => v },
  listenerRequired: {
    schema: z.boolean({ error: "must be a boolean" }),
    type: "boolean",
    doc: "Wait for the workload to listen on `guestPort` before the snapshot, so it serves at once after a restore.",
    default: false,
    child: "root",
    key: (v: boolean) => v,
  },
  extraFiles: {
    schema: z.array(extraFileSchema, { error: "must be an array of { hostPath, guestPath, mode? }" }),
    type: "{ hostPath, guestPath, mode? }[]",
    doc: "Host files staged into the guest before the snapshot (keyed by guest path, mode and content).",
    default: [],
    child: "own",
    key: (_v: unknown, f: KeyFacts) => [...f.extraFiles].sort((a, b) => a.guestPath.localeCompare(b.guestPath)).map(({ guestPath, mode, sha256 }) => ({ guestPath, mode, sha256 })),
    why: "guestPath",
  },
  warmupTag: { schema: z.string({ error: "must be a string" }), type: "string", doc: "Part of the key of `warmup`: change it when the warmup's effect changes.", default: "default", child: "own", key: (v: string) => v },
  warmup: {
    schema: fn<(vm: WarmupVm) => Promise<void>>(),
    type: "(vm: WarmupVm) => Promise<void>",
    doc: "Runs against the booted VM before the snapshot, so every VM starts warmed (in a project, its module's code is keyed).",
    child: "own",
    key: (v: unknown) => v !== undefined,
  },
  snapshotsDir: {
    schema: z.string({ error: "must be a directory path" }).min(1, { error: "must be a directory path" }),
    type: "string",
    doc: "Where snapshots are kept (default `$SUPERMACHINE_HOME/snapshots`).",
    child: "call",
  },
  platform: { schema: platformSchema, type: "string", doc: "Platform of a multi-platform image, `os/arch[/variant]` (default linux/<host arch>).", child: "root" },
  insecureRegistries: {
    schema: z.array(z.string(), { error: "must be an array of host[:port] strings" }),
    type: "string[]",
    doc: "Registries (host[:port]) reached over plain HTTP; loopback ones always are.",
    child: "root",
  },
  onProgress: { schema: fn<(p: BuildProgress) => void>(), type: "(p: BuildProgress) => void", doc: "Progress of pulls, image conversion and baking.", child: "call" },
  execLimits: {
    schema: execLimitsSchema,
    type: "{ processes?, memoryMib? }",
    doc: "Limits of every exec in this image's VMs (warmup included) unless a pool or call sets them; a child's are its parent's with its own on top.",
    child: "merge",
    merge: (parent: ExecLimits | undefined, own: ExecLimits | undefined) => mergeLimits(parent, own),
    key: (v: ExecLimits | undefined) => v,
  },
  network: {
    schema: networkInputSchema,
    type: '"none" | { allow, hosts?, maxConnections?, maxBytes?, mode? }',
    doc: "What the warmup may reach: every TCP connection and DNS query goes through the host's allowlist (docs/network.md). Pools do not inherit it.",
    default: "none",
    resolve: (v: NetworkOption | undefined) => resolveNetwork(v),
    child: "own",
    key: (v: ReturnType<typeof resolveNetwork>) => (v === "none" ? undefined : (resolvedNetworkKey(v) as Exclude<ReturnType<typeof resolvedNetworkKey>, "none">)),
  },
} as const satisfies Record<string, OptionRow>;

// ---- image.pool / config pools ------------------------------------------------------------------

export const poolOptions = {
  min: { schema: intIn(0, 4096), type: "number", doc: "VMs kept ready (restored ahead of `acquire`).", default: 1 },
  max: { schema: intIn(1, 4096), type: "number", doc: "VMs alive at most, checked out or idle (default: `min`, at least 1)." },
  acquireTimeoutMs: { schema: intIn(0, MAX), type: "number", doc: "How long `acquire` waits for a VM before it fails.", default: 60_000 },
  idleTimeoutMs: { schema: intIn(1, MAX), type: "number", doc: "An idle VM beyond `min` is stopped after this long." },
  restoreOnRelease: {
    schema: z.boolean({ error: "must be a boolean" }),
    type: "boolean",
    doc: "A released VM is thrown away and replaced by a fresh restore (true), or kept as it is for the next caller.",
    default: true,
  },
  memoryMib: { schema: intIn(64, 1 << 20), type: "number", doc: "Guest RAM in MiB (default the image's; another value boots VMs cold)." },
  vcpus: { schema: intIn(1, 255), type: "number", doc: "Guest CPUs (default the image's; another value boots VMs cold)." },
  restoreTimeoutMs: { schema: intIn(1, MAX), type: "number", doc: "Deadline of one restore (or cold boot).", default: 30_000 },
  execLimits: { schema: execLimitsSchema, type: "{ processes?, memoryMib? }", doc: "Limits of every exec in this pool's VMs unless a call sets them (over the image's)." },
  network: {
    schema: networkInputSchema,
    type: '"none" | { allow, hosts?, maxConnections?, maxBytes?, mode? }',
    doc: "What VMs may reach while checked out: every TCP connection and DNS query goes through the host's allowlist (docs/network.md).",
    default: "none",
    resolve: (v: NetworkOption | undefined) => resolveNetwork(v),
  },
  user: {
    schema: z.string({ error: "must be a string: a user name or uid, optionally with :group or :gid" }).refine((v) => /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$/.test(v), {
      error: "is not a user: expected name, uid, name:group or uid:gid",
      params: { hint: 'for example "nobody", "1000" or "1000:1000"' },
    }),
    type: "string",
    doc: "Who execs run as: `name`, `uid`, `name:group` or `uid:gid`, looked up in the guest (default: the image's `User`; the workload keeps the image's).",
  },
} as const satisfies Record<string, OptionRow>;

// ---- what the table derives ---------------------------------------------------------------------

type Table = Record<string, OptionRow>;
type Opt<S> = S extends z.ZodType ? z.ZodOptional<S> : never;
type Fields<T extends Table> = { [K in keyof T]: T[K] extends { required: true } ? T[K]["schema"] : Opt<T[K]["schema"]> };
/** A row's value once resolved: `resolve`'s result, else the value with its default applied. */
export type Resolved<R> = R extends { resolve: (v: never) => infer O } ? O : R extends { schema: infer S extends z.ZodType } ? (R extends { default: unknown } | { required: true } ? z.output<S> : z.output<S> | undefined) : never;

/** The table's fields as zod, none defaulted (declarations and API input alike). */
function fieldsOf<T extends Table>(table: T, allOptional = false): Fields<T> {
  const out: Record<string, z.ZodType> = {};
  for (const [k, row] of Object.entries(table)) out[k] = row.required && !allOptional ? row.schema : row.schema.optional();
  return out as Fields<T>;
}

/** A row's value with its default applied and resolved. */
export function resolveValue(row: OptionRow, value: unknown): unknown {
  const v = value === undefined && row.default !== undefined ? structuredClone(row.default) : value;
  return row.resolve ? (row.resolve as (x: unknown) => unknown)(v) : v;
}

/** `Image.build`'s options: validated, nothing defaulted (the graph resolves them, src/graph/graph.ts). */
export const buildSchema = z
  .object(fieldsOf(buildOptions))
  .strict()
  .superRefine((o, ctx) => checkExtraFiles(o.extraFiles, ctx));
export type BuildOptions = z.input<typeof buildSchema>;
/** Build options as a declaration holds them (every field optional, `ref` included). */
export const buildDeclarationFields = fieldsOf(buildOptions, true);

/** The build options of an image node, resolved: defaults applied, inheritance done. */
export type ResolvedImageOptions = {
  -readonly [K in keyof typeof buildOptions as (typeof buildOptions)[K] extends { child: "call" } ? never : K]: Resolved<(typeof buildOptions)[K]>;
};

/** Build options that are part of the key, and the type of their value there. */
type KeyRows = { [K in keyof typeof buildOptions as (typeof buildOptions)[K] extends { key: unknown } ? K : never]: (typeof buildOptions)[K] };
type KeyOut<R> = R extends { key: (...a: never[]) => infer O } ? O : never;
/** The key inputs the options give (an option whose key value is undefined is left out). */
export type KeyedOptions = { -readonly [K in keyof KeyRows as undefined extends KeyOut<KeyRows[K]> ? never : K]: KeyOut<KeyRows[K]> } & {
  -readonly [K in keyof KeyRows as undefined extends KeyOut<KeyRows[K]> ? K : never]?: Exclude<KeyOut<KeyRows[K]>, undefined>;
};

/** The key inputs of a resolved node's options. */
export function keyedOptions(node: ResolvedImageOptions, facts: KeyFacts): KeyedOptions {
  const out: Record<string, unknown> = {};
  for (const [k, row] of Object.entries(buildOptions) as [string, OptionRow][]) {
    if (!row.key) continue;
    const v = (row.key as (v: unknown, f: KeyFacts) => unknown)((node as Record<string, unknown>)[k], facts);
    if (v !== undefined) out[k] = v;
  }
  return out as KeyedOptions;
}

/** How `why` names a change of a keyed option: the option, or each entry of it. */
export function whyNaming(input: string): "entries" | "guestPath" | undefined {
  return (buildOptions as Record<string, OptionRow>)[input]?.why;
}

/** The pool options a call accepts (nothing defaulted; `resolvePool` applies the defaults). */
const poolFields = fieldsOf(poolOptions);
export const poolDeclarationFields = fieldsOf(poolOptions, true);

/** image.pool's options: validated, defaults applied, `network` resolved, `max` defaulting to `min` (at least 1). */
export const poolSchema = z
  .object(poolFields)
  .strict()
  .transform((o, ctx) => {
    const r = Object.fromEntries(Object.entries(poolOptions).map(([k, row]) => [k, resolveValue(row, (o as Record<string, unknown>)[k])])) as {
      -readonly [K in keyof typeof poolOptions]: Resolved<(typeof poolOptions)[K]>;
    };
    const max = r.max ?? Math.max(1, r.min);
    if (r.min > max) {
      ctx.addIssue({ code: "custom", path: ["min"], message: `is larger than max (${max})`, input: r.min });
      return z.NEVER;
    }
    return { ...r, max };
  });
export type PoolOptions = z.input<typeof poolSchema>;
export type ResolvedPool = z.output<typeof poolSchema>;

type Defaults<T extends Table> = { -readonly [K in keyof T as T[K] extends { default: unknown } ? K : never]: T[K] extends { default: infer D } ? D : never };
const defaultsOf = <T extends Table>(table: T): Defaults<T> =>
  Object.fromEntries(Object.entries(table).flatMap(([k, row]) => (row.default === undefined ? [] : [[k, row.default]]))) as Defaults<T>;

/** The defaults of the build options (applied once, by the graph). */
export const BUILD_DEFAULTS = defaultsOf(buildOptions);
/** The defaults of the pool options (`max` defaults to `min`, at least 1). */
export const POOL_DEFAULTS = { ...defaultsOf(poolOptions), max: 1 } as const;
