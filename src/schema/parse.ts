/**
 * Turns a zod failure into the library's error shape: an `OptionError` with a stable code, a
 * message that names the call, the option (with its path) and the value it got, and a hint that
 * lists what is accepted.
 */
import { z } from "zod";
import { isCodeOf, listAccepted, NETWORK_ERROR_CODES, NetworkError, OPTION_ERROR_CODES, OptionError } from "../errors.js";

/** Validates `input` against `schema`; throws OptionError on the first problem found. */
export function parseOptions<S extends z.ZodType>(what: string, schema: S, input: unknown): z.output<S> {
  const r = schema.safeParse(input);
  if (r.success) return r.data;
  throw toOptionError(what, schema, input, r.error.issues);
}

function toOptionError(what: string, schema: z.ZodType, input: unknown, issues: z.core.$ZodIssue[]): OptionError | NetworkError {
  // Report an unknown key first: a typo explains every other complaint about that object.
  let issue = issues.find((i) => i.code === "unrecognized_keys") ?? issues[0]!;
  // A bad record key: its own issue says what is wrong with it.
  let badKey: PropertyKey | undefined;
  if (issue.code === "invalid_key" && issue.issues[0]) {
    badKey = issue.path[issue.path.length - 1];
    issue = { ...issue.issues[0], path: issue.path } as z.core.$ZodIssue;
  }
  const path = showPath(issue.path);
  if (issue.code === "unrecognized_keys") {
    const accepted = objectKeys(schema, issue.path);
    const keys = issue.keys.map((k) => JSON.stringify(k)).join(", ");
    return new OptionError("OPTION_UNKNOWN", `${what}: unknown option${issue.keys.length > 1 ? "s" : ""} ${keys}${path ? ` in ${path}` : ""}`, {
      hint: accepted.length ? `accepted options${path ? ` of ${path}` : ""}: ${listAccepted(accepted)}` : undefined,
    });
  }
  if (issue.path.length === 0 && (input === null || typeof input !== "object" || Array.isArray(input))) {
    return new OptionError("OPTION_INVALID", `${what}: options must be an object, got ${describe(input)}`);
  }
  const params = (issue as { params?: { code?: string; hint?: string } }).params;
  const got = badKey !== undefined ? String(badKey) : valueAt(input, issue.path);
  const hint = params?.hint ?? (issue.code === "invalid_value" ? `accepted values: ${listAccepted(issue.values.map(String))}` : undefined);
  const missing = got === undefined && (issue.code === "invalid_type" || issue.code === "custom");
  const subject = badKey !== undefined ? `key of ${showPath(issue.path.slice(0, -1))}` : path || "options";
  const code = params?.code ?? (missing ? "OPTION_MISSING" : "OPTION_INVALID");
  const message = `${what}: ${subject} ${issue.message}${missing ? ", and it is missing" : `, got ${describe(got)}`}`;
  // A schema's own code (`params.code`) picks the class too: the network option's are NetworkError's.
  if (isCodeOf(NETWORK_ERROR_CODES, code)) return new NetworkError(code, message, { hint });
  if (isCodeOf(OPTION_ERROR_CODES, code)) return new OptionError(code, message, { hint });
  throw new Error(`internal: an option schema gave the unknown error code ${code} (${message})`);
}

/** `argv[0]`, `winsize.cols`, `stageFiles["/x"]`. */
function showPath(path: PropertyKey[]): string {
  let out = "";
  for (const p of path) {
    if (typeof p === "number") out += `[${p}]`;
    else if (typeof p === "string" && /^[A-Za-z_$][\w$]*$/.test(p)) out += out ? `.${p}` : p;
    else out += `[${JSON.stringify(String(p))}]`;
  }
  return out;
}

function valueAt(input: unknown, path: PropertyKey[]): unknown {
  let v = input;
  for (const p of path) {
    if (v === null || typeof v !== "object") return undefined;
    v = (v as Record<PropertyKey, unknown>)[p];
  }
  return v;
}

/** A short, safe description of a value for an error message (never a whole Buffer). */
export function describe(v: unknown): string {
  if (v === undefined) return "undefined";
  if (v === null) return "null";
  if (Buffer.isBuffer(v) || v instanceof Uint8Array) return `${v.constructor.name}(${v.length})`;
  if (typeof v === "function") return "a function";
  if (typeof v === "bigint") return `${v}n`;
  if (typeof v === "object" && !Array.isArray(v) && Object.getPrototypeOf(v) !== Object.prototype) {
    return `a ${(v as object).constructor?.name ?? "object"}`;
  }
  try {
    const s = JSON.stringify(v);
    if (s === undefined) return typeof v;
    return s.length > 80 ? `${s.slice(0, 77)}...` : s;
  } catch {
    return typeof v;
  }
}

/** The keys of the object schema found at `path` (through optionals, defaults, arrays, records). */
function objectKeys(schema: z.ZodType, path: PropertyKey[]): string[] {
  let s: unknown = schema;
  const unwrap = (x: unknown): unknown => {
    for (let i = 0; i < 10; i++) {
      const def = (x as { _zod?: { def?: { type?: string; innerType?: unknown; in?: unknown; schema?: unknown } } })._zod?.def;
      if (!def) return x;
      if (def.type === "optional" || def.type === "default" || def.type === "nullable" || def.type === "readonly" || def.type === "prefault") x = def.innerType;
      else if (def.type === "pipe") x = def.in;
      else return x;
    }
    return x;
  };
  for (const p of [...path, undefined]) {
    s = unwrap(s);
    const def = (s as { _zod?: { def?: { type?: string; shape?: Record<string, unknown>; element?: unknown; valueType?: unknown } } })._zod?.def;
    if (!def) return [];
    if (p === undefined) return def.type === "object" && def.shape ? Object.keys(def.shape) : [];
    if (def.type === "object" && def.shape && typeof p === "string") s = def.shape[p];
    else if (def.type === "array") s = def.element;
    else if (def.type === "record") s = def.valueType;
    else return [];
  }
  return [];
}
