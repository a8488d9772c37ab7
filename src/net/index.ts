/** Egress for guests (issue 12): the per-VM HTTP proxy and its policy. No VM here: the runtime feeds it the guest's proxy connections. */
export { EgressProxy, EGRESS_DEFAULTS, type EgressDeps, type EgressStats, type ResolvedAddress } from "./egress.js";
export { EgressDns, DNS_DEFAULTS, DNS_VERDICT, type DnsVerdict, type DnsDeps, type DnsResolve } from "./dns.js";
export { EgressPolicy, classifyAddress, type AddressClass, type PolicyDecision } from "./policy.js";
export {
  networkSchema,
  parseNetwork,
  parseNetworkOption,
  networkKey,
  resolvedNetworkKey,
  parseAllowEntry,
  NETWORK_DEFAULTS,
  NETWORK_MAX_CONNECTIONS,
  type NetworkOption,
  type NetworkObjectOption,
  type ResolvedNetwork,
  type ResolvedNetworkOption,
  type NetworkKey,
  type AllowRule,
} from "../schema/network.js";
