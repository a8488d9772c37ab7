/**
 * The `network` option: egress from the guest through the host-side policy (issues 12, 21). One source
 * for its types, defaults and accepted values: the zod schema (`networkSchema`, to embed in the
 * option schemas), `parseNetwork` (throws `NetworkError`), the grammar of allowlist entries and
 * hosts (shared with the proxy, which parses request targets with `parseHost`), and
 * `networkKey`, the canonical JSON value of the option for cache keys.
 *
 *   network: "none"                                   (the default: no egress at all)
 *          | { allow: string[];                        host, *.domain, IPv4, [IPv6], each [:port]
 *              hosts?: Record<string, string>;        name → IP literal, before DNS
 *              maxConnections?: number;               concurrent per VM (default 32)
 *              maxBytes?: number;                     in + out per VM (default 4 GiB)
 *              mode?: "transparent" | "proxy" }       transparent (the default): every TCP connection and
 *                                                     DNS query of the guest goes through the policy;
 *                                                     proxy: only programs that use the proxy variables
 */
import { isIPv4, isIPv6 } from "node:net";
import { domainToASCII } from "node:url";
import { z } from "zod";
import { NetworkError, OptionError, type NetworkErrorCode } from "../errors.js";
import { parseOptions } from "./parse.js";

export const NETWORK_DEFAULTS = { maxConnections: 32, maxBytes: 4 * 1024 ** 3 } as const;
/** The agent accepts at most this many proxy streams at once (PROTOCOL.md, PROXY_LISTEN). */
export const NETWORK_MAX_CONNECTIONS = 4096;
/** Ports an entry without one allows. */
export const DEFAULT_PORTS: readonly number[] = [80, 443];

export const ALLOW_FORMS_HINT =
  'accepted forms: "host" or "host:port" (like "pypi.org", "example.com:8443"), "*.domain" (any subdomain, not the apex; ' +
  'like "*.pythonhosted.org"), an IPv4 address ("127.0.0.1", "10.0.0.5:3128"), an IPv6 address ("::1", "[::1]", "[::1]:8080"); ' +
  "no port means ports 80 and 443";

/** What the user writes. */
export interface NetworkObjectOption {
  /** Where the guest may connect: `host`, `*.domain`, an IP literal, each optionally `:port` (else 80 and 443). */
  allow: string[];
  /** Names resolved on the host to these IP literals before DNS (like /etc/hosts or curl --resolve). */
  hosts?: Record<string, string>;
  /** Connections open at once per VM (default 32); more get HTTP 429. */
  maxConnections?: number;
  /** Bytes carried per VM, in and out together (default 4 GiB); beyond, connections end and new ones get 403. */
  maxBytes?: number;
  /**
   * `"transparent"` (the default): every TCP connection a guest program opens, and every DNS
   * query, goes through the policy, whatever the program; the proxy variables are set too.
   * `"proxy"`: only the guest's proxy port (the variables point there); a program that ignores
   * them reaches nothing.
   */
  mode?: NetworkMode;
}
/** How the guest reaches the policy: every connection (transparent) or only through the proxy port. */
export type NetworkMode = "transparent" | "proxy";
export const NETWORK_MODES: readonly NetworkMode[] = ["transparent", "proxy"];
export type NetworkOption = "none" | NetworkObjectOption;

/** A host as the grammar reads it: a DNS name (lowercase, ASCII) or an IP literal (canonical). */
export type ParsedHost = { kind: "name"; host: string } | { kind: "ip"; address: string; family: 4 | 6 };

/** One compiled allowlist entry; `text` is its canonical form. `port` absent: 80 and 443. */
export type AllowRule =
  | { kind: "name"; host: string; port?: number; text: string }
  | { kind: "suffix"; domain: string; port?: number; text: string }
  | { kind: "ip"; address: string; family: 4 | 6; port?: number; text: string };

export interface ResolvedNetwork {
  /** Sorted by `text`, deduplicated. */
  allow: AllowRule[];
  /** Lowercase name → canonical IP literal, sorted by name. */
  hosts: Record<string, string>;
  maxConnections: number;
  maxBytes: number;
  mode: NetworkMode;
}
export type ResolvedNetworkOption = "none" | ResolvedNetwork;

// ---- grammar ----------------------------------------------------------------------------------

/** The canonical form of an IP literal (no brackets): IPv4 dotted quad, IPv6 compressed lowercase; IPv4-mapped IPv6 becomes its IPv4. */
export function canonicalIp(s: string): { address: string; family: 4 | 6 } | undefined {
  if (isIPv4(s)) return { address: s, family: 4 };
  if (!isIPv6(s) || s.includes("%")) return undefined; // zone ids name a host interface: never
  let address: string;
  try {
    address = new URL(`http://[${s}]/`).hostname.slice(1, -1);
  } catch {
    return undefined;
  }
  const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(address);
  if (mapped) {
    const hi = parseInt(mapped[1]!, 16);
    const lo = parseInt(mapped[2]!, 16);
    return { address: `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`, family: 4 };
  }
  return { address, family: 6 };
}

const LABEL = /^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$/;

/** A DNS name or an IP literal (an IPv6 one without brackets): the parsed host, or why it is not one. */
export function parseHost(raw: string): ParsedHost | { error: string; hint?: string } {
  if (raw.length === 0) return { error: "is empty" };
  const ip = canonicalIp(raw);
  if (ip) return { kind: "ip", ...ip };
  if (raw.includes(":")) return { error: "is not a valid IPv6 address" };
  // eslint-disable-next-line no-control-regex
  if (/[^\x21-\x7e]/.test(raw)) {
    const ascii = /[\x00-\x20\x7f]/.test(raw) ? "" : domainToASCII(raw);
    return {
      error: "is not an ASCII host name",
      hint: ascii ? `use the name's punycode form, "${ascii}"` : "use the name's punycode (xn--) form",
    };
  }
  let host = raw.toLowerCase();
  if (host.endsWith(".")) host = host.slice(0, -1);
  if (host.length === 0 || host.length > 253) return { error: "is not a valid host name (1 to 253 characters)" };
  const labels = host.split(".");
  for (const label of labels) {
    if (label === "") return { error: "is not a valid host name (it has an empty label)" };
    if (!LABEL.test(label)) {
      return { error: `is not a valid host name (label "${label}": letters, digits, '-' and '_' only, at most 63, not starting or ending with '-')` };
    }
  }
  // A name whose last label is a number would be read as an IPv4 address by URL parsers.
  if (/^(?:0x[0-9a-f]*|[0-9]+)$/.test(labels[labels.length - 1]!)) return { error: "is not a valid IPv4 address" };
  return { kind: "name", host };
}

/** `host`, `host:port`, `[v6]`, `[v6]:port`, bare `v6`: host and port parts, or why not. */
export function splitHostPort(raw: string): { host: string; port: string | undefined; bracketed: boolean } | { error: string } {
  if (raw.startsWith("[")) {
    const end = raw.indexOf("]");
    if (end < 0) return { error: "has no closing ']'" };
    const rest = raw.slice(end + 1);
    if (rest !== "" && !rest.startsWith(":")) return { error: `has "${rest}" after ']' (expected ":port")` };
    return { host: raw.slice(1, end), port: rest === "" ? undefined : rest.slice(1), bracketed: true };
  }
  const colons = raw.split(":").length - 1;
  if (colons === 0) return { host: raw, port: undefined, bracketed: false };
  if (colons === 1) {
    const i = raw.indexOf(":");
    return { host: raw.slice(0, i), port: raw.slice(i + 1), bracketed: false };
  }
  return { host: raw, port: undefined, bracketed: false }; // a bare IPv6 address takes no port
}

/** A decimal port 1-65535, or undefined. */
export function parsePort(s: string): number | undefined {
  if (!/^[0-9]{1,5}$/.test(s)) return undefined;
  const n = Number(s);
  return n >= 1 && n <= 65535 ? n : undefined;
}

/** `host[:port]` for messages and canonical entries (IPv6 in brackets). */
export function showHostPort(host: string, port?: number): string {
  const h = host.includes(":") ? `[${host}]` : host;
  return port === undefined ? h : `${h}:${port}`;
}

class EntryError extends Error {
  constructor(
    message: string,
    readonly hint: string,
  ) {
    super(message);
  }
}

/** One `allow` entry, compiled; throws NetworkError (NETWORK_BAD_ALLOW) naming the entry and the cause. */
export function parseAllowEntry(entry: string): AllowRule {
  try {
    return compileEntry(entry);
  } catch (e) {
    if (!(e instanceof EntryError)) throw e;
    throw new NetworkError("NETWORK_BAD_ALLOW", `network.allow entry ${JSON.stringify(entry)} ${e.message}`, { hint: e.hint });
  }
}

function compileEntry(entry: string): AllowRule {
  const bad = (message: string, hint = ALLOW_FORMS_HINT) => new EntryError(message, hint);
  if (typeof entry !== "string") throw bad("is not a string");
  const raw = entry.trim();
  if (raw === "") throw bad("is empty");
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(raw) || raw.includes("/")) throw bad("is a URL, not a host", `give the host only, like "${hostOfUrl(raw) ?? "example.com"}"; ${ALLOW_FORMS_HINT}`);
  if (raw.includes("@")) throw bad("has '@': user names are not part of an entry");
  const split = splitHostPort(raw);
  if ("error" in split) throw bad(split.error);
  let port: number | undefined;
  if (split.port !== undefined) {
    port = parsePort(split.port);
    if (port === undefined) throw bad(`has port "${split.port}", not a number from 1 to 65535`);
  }
  const portText = port === undefined ? "" : `:${port}`;
  if (split.host.startsWith("*.")) {
    const parsed = parseHost(split.host.slice(2));
    if ("error" in parsed) throw bad(`is a wildcard whose domain ${parsed.error}`, parsed.hint ?? ALLOW_FORMS_HINT);
    if (parsed.kind === "ip") throw bad("puts a wildcard on an IP address; list the address itself");
    return { kind: "suffix", domain: parsed.host, ...(port === undefined ? {} : { port }), text: `*.${parsed.host}${portText}` };
  }
  if (split.host.includes("*")) throw bad("has a '*' that is not the first label; a wildcard is written \"*.example.com\" (any subdomain)");
  const parsed = parseHost(split.host);
  if ("error" in parsed) throw bad(parsed.error, parsed.hint ?? ALLOW_FORMS_HINT);
  if (split.bracketed && !(parsed.kind === "ip" && parsed.family === 6) && !isIPv6(split.host)) throw bad("has brackets around something that is not an IPv6 address");
  if (parsed.kind === "ip") {
    return { kind: "ip", address: parsed.address, family: parsed.family, ...(port === undefined ? {} : { port }), text: `${parsed.family === 6 ? `[${parsed.address}]` : parsed.address}${portText}` };
  }
  return { kind: "name", host: parsed.host, ...(port === undefined ? {} : { port }), text: `${parsed.host}${portText}` };
}

function hostOfUrl(raw: string): string | undefined {
  try {
    return new URL(raw).host || undefined;
  } catch {
    return undefined;
  }
}

/** One `hosts` entry: the lowercase name and the canonical address; throws NetworkError (NETWORK_BAD_HOSTS). */
export function parseHostsEntry(name: string, address: unknown): [string, string] {
  const fail = (message: string, hint: string) => new NetworkError("NETWORK_BAD_HOSTS", `network.hosts entry ${JSON.stringify(name)} ${message}`, { hint });
  const hint = 'hosts maps a host name to an IP literal, like { "pypi.internal": "127.0.0.1" } or { "api.test": "::1" }';
  const parsed = parseHost(name);
  if ("error" in parsed) throw fail(`is not a host name: ${parsed.error}`, parsed.hint ?? hint);
  if (parsed.kind === "ip") throw fail("is an IP address; hosts maps names to addresses", hint);
  if (typeof address !== "string") throw fail("must map to a string (an IP literal)", hint);
  const lit = address.startsWith("[") && address.endsWith("]") ? address.slice(1, -1) : address;
  const ip = canonicalIp(lit);
  if (!ip) throw fail(`maps to ${JSON.stringify(address)}, not an IPv4 or IPv6 address`, hint);
  return [parsed.host, ip.address];
}

// ---- the option -------------------------------------------------------------------------------

const limitsSchema = {
  maxConnections: z.number().int().min(1).max(NETWORK_MAX_CONNECTIONS),
  maxBytes: z.number().int().min(1).max(Number.MAX_SAFE_INTEGER),
};
const OBJECT_KEYS = ["allow", "hosts", "maxConnections", "maxBytes", "mode"] as const;
const SHAPE_HINT = `network is "none" (the default) or { allow: [...], hosts?: { name: ip }, maxConnections?: 1-${NETWORK_MAX_CONNECTIONS}, maxBytes?: bytes, mode?: "transparent" | "proxy" }; ${ALLOW_FORMS_HINT}`;

type Issue = { path: (string | number)[]; message: string; code: NetworkErrorCode | "OPTION_UNKNOWN"; hint: string };

/** The option resolved, or the first problem found (its path relative to the option). */
function resolve(v: unknown): { value: ResolvedNetworkOption } | { issue: Issue } {
  const issue = (path: (string | number)[], message: string, code: Issue["code"], hint: string) => ({ issue: { path, message, code, hint } });
  if (v === undefined || v === "none") return { value: "none" };
  if (v === null || typeof v !== "object" || Array.isArray(v)) return issue([], 'must be "none" or an object { allow: [...] }', "NETWORK_INVALID", SHAPE_HINT);
  const o = v as Record<string, unknown>;
  const unknown = Object.keys(o).filter((k) => !(OBJECT_KEYS as readonly string[]).includes(k));
  if (unknown.length) {
    return issue([], `has unknown option${unknown.length > 1 ? "s" : ""} ${unknown.map((k) => JSON.stringify(k)).join(", ")}`, "OPTION_UNKNOWN", `accepted options of network: ${OBJECT_KEYS.map((k) => JSON.stringify(k)).join(", ")}`);
  }
  if (!Array.isArray(o.allow)) return issue(["allow"], "must be an array of strings (the hosts the guest may reach)", "NETWORK_INVALID", SHAPE_HINT);
  const rules = new Map<string, AllowRule>();
  for (let i = 0; i < o.allow.length; i++) {
    const entry: unknown = o.allow[i];
    if (typeof entry !== "string") return issue(["allow", i], "must be a string", "NETWORK_BAD_ALLOW", ALLOW_FORMS_HINT);
    try {
      const rule = parseAllowEntry(entry);
      rules.set(rule.text, rule);
    } catch (e) {
      if (!(e instanceof NetworkError)) throw e;
      return issue(["allow", i], e.message.replace(/^network\.allow entry "(?:[^"\\]|\\.)*" /, ""), e.code, e.hint ?? ALLOW_FORMS_HINT);
    }
  }
  const hosts = new Map<string, string>();
  if (o.hosts !== undefined) {
    if (o.hosts === null || typeof o.hosts !== "object" || Array.isArray(o.hosts)) {
      return issue(["hosts"], "must be an object of host name → IP address", "NETWORK_BAD_HOSTS", 'like { "pypi.internal": "127.0.0.1" }');
    }
    for (const [name, address] of Object.entries(o.hosts)) {
      try {
        const [n, a] = parseHostsEntry(name, address);
        if (hosts.has(n) && hosts.get(n) !== a) return issue(["hosts", name], `names ${n} again, with another address`, "NETWORK_BAD_HOSTS", "list each name once");
        hosts.set(n, a);
      } catch (e) {
        if (!(e instanceof NetworkError)) throw e;
        return issue(["hosts", name], e.message.replace(/^network\.hosts entry "(?:[^"\\]|\\.)*" /, ""), e.code, e.hint ?? "");
      }
    }
  }
  const limits: Record<string, number> = {};
  for (const key of ["maxConnections", "maxBytes"] as const) {
    if (o[key] === undefined) {
      limits[key] = NETWORK_DEFAULTS[key];
      continue;
    }
    const r = limitsSchema[key].safeParse(o[key]);
    const range = key === "maxConnections" ? `from 1 to ${NETWORK_MAX_CONNECTIONS}` : `from 1 to ${Number.MAX_SAFE_INTEGER}`;
    if (!r.success) return issue([key], `must be an integer ${range}`, "NETWORK_INVALID", `default: ${NETWORK_DEFAULTS[key]}`);
    limits[key] = r.data;
  }
  if (o.mode !== undefined && !(NETWORK_MODES as readonly unknown[]).includes(o.mode)) {
    return issue(["mode"], 'must be "transparent" or "proxy"', "NETWORK_INVALID", '"transparent" (the default) filters every connection and DNS query of the guest; "proxy" only what goes through the proxy variables');
  }
  const sortedHosts: Record<string, string> = {};
  for (const n of [...hosts.keys()].sort()) sortedHosts[n] = hosts.get(n)!;
  return {
    value: {
      allow: [...rules.values()].sort((a, b) => (a.text < b.text ? -1 : a.text > b.text ? 1 : 0)),
      hosts: sortedHosts,
      maxConnections: limits.maxConnections!,
      maxBytes: limits.maxBytes!,
      mode: (o.mode as NetworkMode | undefined) ?? "transparent",
    },
  };
}

/**
 * The zod schema of the option, to embed in other schemas (`network: networkSchema`). Absent is
 * "none". A bad value gives one issue at its path, with `params.code` (`NETWORK_BAD_ALLOW`,
 * `NETWORK_BAD_HOSTS`, `NETWORK_INVALID`, `OPTION_UNKNOWN`) and `params.hint`, which
 * `parseOptions` turns into an OptionError with that code and hint.
 */
export const networkSchema = z.unknown().optional().transform((v, ctx): ResolvedNetworkOption => {
  const r = resolve(v);
  if ("value" in r) return r.value;
  ctx.addIssue({ code: "custom", path: r.issue.path, message: r.issue.message, input: v, params: { code: r.issue.code, hint: r.issue.hint } });
  return z.NEVER;
});

/**
 * The same checks as `networkSchema`, keeping the value as written (config declarations hold
 * what the user wrote; the runtime resolves it when it builds or pools).
 */
export const networkInputSchema = z
  .unknown()
  .optional()
  .superRefine((v, ctx) => {
    const r = resolve(v);
    if ("issue" in r) ctx.addIssue({ code: "custom", path: r.issue.path, message: r.issue.message, input: v, params: { code: r.issue.code, hint: r.issue.hint } });
  }) as unknown as z.ZodType<NetworkOption | undefined, NetworkOption | undefined>;

/** The option resolved (defaults filled, entries compiled); throws NetworkError naming the entry, the cause and the accepted forms. */
export function parseNetwork(input: unknown, what = "network"): ResolvedNetworkOption {
  const r = resolve(input);
  if ("value" in r) return r.value;
  const where = [what, ...r.issue.path.map((p) => (typeof p === "number" ? `[${p}]` : /^[A-Za-z_$][\w$]*$/.test(p) ? `.${p}` : `[${JSON.stringify(p)}]`))].join("");
  let got: unknown = input;
  for (const p of r.issue.path) got = got !== null && typeof got === "object" ? (got as Record<string | number, unknown>)[p] : undefined;
  const shown = typeof got === "string" || typeof got === "number" ? `, got ${JSON.stringify(got)}` : "";
  const message = `${where.replace(/^\./, "")} ${r.issue.message}${shown}`;
  // An unknown key is an option's problem like any other (OPTION_UNKNOWN); the rest are the network option's own.
  if (r.issue.code === "OPTION_UNKNOWN") throw new OptionError(r.issue.code, message, { hint: r.issue.hint });
  throw new NetworkError(r.issue.code, message, { hint: r.issue.hint });
}

/** Checks an option through parseOptions (an OptionError carrying the NETWORK_* code); for callers that validate it alone. */
export function parseNetworkOption(what: string, input: unknown): ResolvedNetworkOption {
  return parseOptions(what, z.object({ network: networkSchema }).strict(), { network: input }).network;
}

/** The canonical JSON value of the option, for cache keys: "none", or sorted, deduplicated entries with the defaults filled. */
export type NetworkKey = "none" | { allow: string[]; hosts: Record<string, string>; maxConnections: number; maxBytes: number; mode: NetworkMode };
export function networkKey(option: unknown): NetworkKey {
  return resolvedNetworkKey(parseNetwork(option));
}
/** networkKey of an option already resolved (by networkSchema or parseNetwork). */
export function resolvedNetworkKey(r: ResolvedNetworkOption): NetworkKey {
  if (r === "none") return "none";
  return { allow: r.allow.map((a) => a.text), hosts: { ...r.hosts }, maxConnections: r.maxConnections, maxBytes: r.maxBytes, mode: r.mode };
}

/** An option as the API or a config module gave it, or already resolved by `networkSchema`: resolved. */
export function resolveNetwork(v: unknown): ResolvedNetworkOption {
  if (v === undefined || v === "none") return "none";
  if (typeof v === "object" && v !== null && Array.isArray((v as ResolvedNetwork).allow) && typeof (v as ResolvedNetwork).mode === "string" && (v as ResolvedNetwork).allow.every((a) => typeof a === "object" && a !== null && "text" in a)) {
    return v as ResolvedNetwork;
  }
  return parseNetwork(v);
}
