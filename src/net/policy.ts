/**
 * The egress policy of one VM, compiled from its `network` option: which host:port a guest may
 * ask for (`check`, before any DNS), and which resolved addresses may be connected to
 * (`checkAddress`: addresses in the special ranges below, the host's own loopback first among
 * them, only when the allowlist names that IP literal with a matching port, so no DNS name or
 * `hosts` entry can point the guest at the host's services).
 */
import { BlockList } from "node:net";
import { DEFAULT_PORTS, canonicalIp, parseHost, parseNetwork, showHostPort, type AllowRule, type NetworkOption, type ResolvedNetwork, type ResolvedNetworkOption } from "../schema/network.js";

/** The special ranges an address can fall in, most specific first. */
export type AddressClass =
  | "unspecified"
  | "loopback"
  | "private"
  | "link-local"
  | "shared (CGNAT)"
  | "this-network"
  | "multicast"
  | "broadcast"
  | "reserved"
  | "unique-local"
  | "site-local";

const V4: [AddressClass, string, number][] = [
  ["broadcast", "255.255.255.255", 32],
  ["this-network", "0.0.0.0", 8],
  ["loopback", "127.0.0.0", 8],
  ["private", "10.0.0.0", 8],
  ["private", "172.16.0.0", 12],
  ["private", "192.168.0.0", 16],
  ["link-local", "169.254.0.0", 16],
  ["shared (CGNAT)", "100.64.0.0", 10],
  ["multicast", "224.0.0.0", 4],
  ["reserved", "240.0.0.0", 4],
];
const V6: [AddressClass, string, number][] = [
  ["unspecified", "::", 128],
  ["loopback", "::1", 128],
  ["reserved", "::", 96], // IPv4-compatible (deprecated)
  ["link-local", "fe80::", 10],
  ["site-local", "fec0::", 10],
  ["unique-local", "fc00::", 7],
  ["multicast", "ff00::", 8],
];
const RANGES: { cls: AddressClass; list: BlockList }[] = [];
for (const [cls, net, prefix] of V4) add(cls, net, prefix, "ipv4");
for (const [cls, net, prefix] of V6) add(cls, net, prefix, "ipv6");
function add(cls: AddressClass, net: string, prefix: number, type: "ipv4" | "ipv6"): void {
  const list = new BlockList();
  list.addSubnet(net, prefix, type);
  RANGES.push({ cls, list });
}
const NAT64 = new BlockList();
NAT64.addSubnet("64:ff9b::", 96, "ipv6");

/** The IPv4 address in the last 32 bits of a canonical (compressed) IPv6 address. */
function embeddedV4(v6: string): string {
  const [head, tail] = v6.includes("::") ? v6.split("::") : [v6, ""];
  const h = head ? head.split(":") : [];
  const t = tail ? tail.split(":") : [];
  const groups = [...h, ...Array(8 - h.length - t.length).fill("0"), ...t].map((g) => parseInt(g, 16));
  const hi = groups[6]!;
  const lo = groups[7]!;
  return `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`;
}

/**
 * The special range an IP address is in, or undefined for an ordinary (public) address.
 * IPv4-mapped IPv6 (`::ffff:127.0.0.1`) and NAT64 (`64:ff9b::7f00:1`) are classified by the
 * IPv4 address they carry. Throws on something that is not an IP literal.
 */
export function classifyAddress(address: string): AddressClass | undefined {
  const ip = canonicalIp(address);
  if (!ip) throw new TypeError(`not an IP address: ${address}`);
  if (ip.family === 6 && NAT64.check(ip.address, "ipv6")) return classifyAddress(embeddedV4(ip.address));
  const type = ip.family === 4 ? "ipv4" : "ipv6";
  for (const r of RANGES) if (r.list.check(ip.address, type)) return r.cls;
  return undefined;
}

export type PolicyDecision =
  | { allowed: true }
  | {
      allowed: false;
      /** `not-allowed`: the allowlist does not list host:port; `private-address`: resolved to a special address not listed by IP; `bad-host`: not a host; `disabled`: network is "none". */
      reason: "not-allowed" | "private-address" | "bad-host" | "disabled";
      /** A sentence for the guest (the 403 body) and the log, naming the target and the option to change. */
      message: string;
    };

const ok: PolicyDecision = { allowed: true };
const portMatches = (rule: AllowRule, port: number) => (rule.port === undefined ? DEFAULT_PORTS.includes(port) : rule.port === port);

export class EgressPolicy {
  readonly option: ResolvedNetworkOption;
  private readonly rules: readonly AllowRule[];

  /** From the raw option (validated, NetworkError when bad) or one resolved by networkSchema / parseNetwork. */
  constructor(option: NetworkOption | ResolvedNetworkOption | undefined) {
    this.option = isResolved(option) ? option : parseNetwork(option);
    this.rules = this.option === "none" ? [] : this.option.allow;
  }

  get settings(): ResolvedNetwork | undefined {
    return this.option === "none" ? undefined : this.option;
  }

  /** The address `hosts` maps a (lowercase) name to. */
  hostsEntry(name: string): string | undefined {
    return this.option === "none" ? undefined : Object.hasOwn(this.option.hosts, name) ? this.option.hosts[name] : undefined;
  }

  /** May the guest ask for host:port? (`host` a name or IP literal, IPv6 with or without brackets). Before any DNS. */
  check(host: string, port: number): PolicyDecision {
    const raw = host.startsWith("[") && host.endsWith("]") ? host.slice(1, -1) : host;
    const parsed = parseHost(raw);
    if ("error" in parsed) return { allowed: false, reason: "bad-host", message: `supermachine: egress to ${JSON.stringify(host)} is not possible: the host ${parsed.error}` };
    const name = parsed.kind === "name" ? parsed.host : parsed.address;
    const target = showHostPort(name, port);
    if (this.option === "none") {
      return { allowed: false, reason: "disabled", message: `supermachine: egress to ${target} is not allowed (network is "none"); set network: { allow: ["${showHostPort(name, DEFAULT_PORTS.includes(port) ? undefined : port)}"] }` };
    }
    if (!Number.isInteger(port) || port < 1 || port > 65535) return { allowed: false, reason: "bad-host", message: `supermachine: egress to ${target} is not possible: the port is not from 1 to 65535` };
    for (const rule of this.rules) {
      if (!portMatches(rule, port)) continue;
      if (parsed.kind === "ip" ? rule.kind === "ip" && rule.address === parsed.address : (rule.kind === "name" && rule.host === parsed.host) || (rule.kind === "suffix" && parsed.host.endsWith(`.${rule.domain}`))) {
        return ok;
      }
    }
    const entry = showHostPort(name, DEFAULT_PORTS.includes(port) ? undefined : port);
    return { allowed: false, reason: "not-allowed", message: `supermachine: egress to ${target} is not allowed (network.allow does not list it); add "${entry}" to network.allow` };
  }

  /**
   * The ports any allow rule lets the guest reach `name` on (a DNS name, not an IP literal),
   * ascending; empty when no rule names it. Transparent DNS answers only names with a port here,
   * before any resolution.
   */
  portsFor(name: string): number[] {
    const parsed = parseHost(name);
    if ("error" in parsed || parsed.kind !== "name") return [];
    const ports = new Set<number>();
    for (const rule of this.rules) {
      if ((rule.kind === "name" && rule.host === parsed.host) || (rule.kind === "suffix" && parsed.host.endsWith(`.${rule.domain}`))) {
        for (const p of rule.port === undefined ? DEFAULT_PORTS : [rule.port]) ports.add(p);
      }
    }
    return [...ports].sort((a, b) => a - b);
  }

  /**
   * May the proxy connect to `address` (what `host` resolved to, or the `hosts` entry) on `port`?
   * Addresses in a special range (loopback, private, link-local, ...) only when an `allow` entry
   * names that IP literal with a matching port.
   */
  checkAddress(host: string, port: number, address: string): PolicyDecision {
    const ip = canonicalIp(address);
    if (!ip) return { allowed: false, reason: "bad-host", message: `supermachine: egress to ${showHostPort(host, port)} is not possible: it resolved to ${JSON.stringify(address)}, not an IP address` };
    const cls = classifyAddress(ip.address);
    if (cls === undefined) return ok;
    if (this.rules.some((r) => r.kind === "ip" && r.address === ip.address && portMatches(r, port))) return ok;
    const entry = showHostPort(ip.address, DEFAULT_PORTS.includes(port) ? undefined : port);
    return {
      allowed: false,
      reason: "private-address",
      message:
        `supermachine: egress to ${showHostPort(host, port)} is not allowed: it resolves to ${ip.address}, a ${cls} address, ` +
        `and such addresses are reached only when network.allow lists them by IP; add "${entry}" to network.allow to allow it`,
    };
  }
}

function isResolved(o: unknown): o is ResolvedNetworkOption {
  if (o === "none") return true;
  if (o === null || typeof o !== "object") return false;
  const r = o as Partial<ResolvedNetwork>;
  return Array.isArray(r.allow) && r.allow.length > 0 && r.allow.every((x) => typeof x === "object" && x !== null && "text" in x) && typeof r.maxBytes === "number" && typeof r.maxConnections === "number" && typeof r.mode === "string";
}
