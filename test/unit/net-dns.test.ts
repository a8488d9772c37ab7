// Transparent egress's DNS verdicts (src/net/dns.ts): a name off the allowlist is NXDOMAIN with no
// lookup at all (the resolver spy proves it), private answers are REFUSED unless listed by IP,
// ENOTFOUND is NXDOMAIN, a slow resolver is SERVFAIL, and verdicts are cached for their TTL.
import { describe, expect, it, vi } from "vitest";
import { EgressDns } from "../../src/net/dns.js";
import { EgressPolicy } from "../../src/net/policy.js";

function spyResolver(answers: Record<string, string[] | Error | "hang">) {
  return vi.fn(async (name: string) => {
    const a = answers[name];
    if (a === undefined) throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${name}`), { code: "ENOTFOUND" });
    if (a === "hang") return new Promise<never>(() => {});
    if (a instanceof Error) throw a;
    return a.map((address) => ({ address }));
  });
}

describe("EgressDns", () => {
  it("answers NXDOMAIN for a name off the allowlist without resolving anything", async () => {
    const resolve = spyResolver({ "evil.test": ["93.184.216.34"] });
    const dns = new EgressDns(new EgressPolicy({ allow: ["web.test"] }), { resolve });
    const v = await dns.resolve("evil.test", 1);
    expect(v).toMatchObject({ verdict: "nxdomain", reason: "not-allowed" });
    expect(await dns.resolve("EVIL.test.", 28)).toMatchObject({ verdict: "nxdomain" });
    // A suffix rule does not allow the bare domain, and an IP literal is not a name.
    const suffix = new EgressDns(new EgressPolicy({ allow: ["*.web.test", "93.184.216.34"] }), { resolve });
    expect(await suffix.resolve("web.test")).toMatchObject({ verdict: "nxdomain" });
    expect(await suffix.resolve("93.184.216.34")).toMatchObject({ verdict: "nxdomain" });
    expect(resolve).not.toHaveBeenCalled();
    expect(dns.counters).toEqual({ queries: 2, refused: 2 });
    // What the agent client sends back for RESOLVE.
    expect(await dns.answer({ name: "evil.test", qtype: 1 })).toEqual({ verdict: "nxdomain", ttl: 5 });
    expect(resolve).not.toHaveBeenCalled();
  });

  it("allows a public answer with the name's ports, for A and AAAA alike", async () => {
    const resolve = spyResolver({ "api.web.test": ["93.184.216.34", "10.0.0.1"] });
    const dns = new EgressDns(new EgressPolicy({ allow: ["*.web.test", "api.web.test:8443"] }), { resolve });
    const v = await dns.resolve("Api.Web.Test", 28);
    // The private address is dropped; the public one stays.
    expect(v).toEqual({ verdict: "allow", ttl: 30, ports: [80, 443, 8443], addresses: ["93.184.216.34"] });
    expect(resolve).toHaveBeenCalledWith("api.web.test");
    expect(dns.cachedAddresses("api.web.test")).toEqual(["93.184.216.34"]);
    expect(await dns.answer({ name: "api.web.test", qtype: 1 })).toEqual({ verdict: "allow", ttl: 30, ports: [80, 443, 8443] });
  });

  it("refuses a name whose addresses are all private or loopback, unless the IP is listed", async () => {
    const resolve = spyResolver({});
    const hostsOnly = new EgressDns(new EgressPolicy({ allow: ["web.test:8080"], hosts: { "web.test": "127.0.0.1" } }), { resolve });
    expect(await hostsOnly.resolve("web.test")).toMatchObject({ verdict: "refused", reason: "private-address", message: expect.stringContaining('add "127.0.0.1:8080"') });
    const listed = new EgressDns(new EgressPolicy({ allow: ["web.test:8080", "127.0.0.1:8080"], hosts: { "web.test": "127.0.0.1" } }), { resolve });
    expect(await listed.resolve("web.test")).toMatchObject({ verdict: "allow", ports: [8080], addresses: ["127.0.0.1"] });
    // The IP rule must match one of the name's ports.
    const otherPort = new EgressDns(new EgressPolicy({ allow: ["web.test:8080", "127.0.0.1:9090"], hosts: { "web.test": "127.0.0.1" } }), { resolve });
    expect(await otherPort.resolve("web.test")).toMatchObject({ verdict: "refused" });
    // The hosts entry answers: the host's resolver was not asked.
    expect(resolve).not.toHaveBeenCalled();
    const metadata = new EgressDns(new EgressPolicy({ allow: ["meta.test"] }), { resolve: spyResolver({ "meta.test": ["169.254.169.254"] }) });
    expect(await metadata.resolve("meta.test")).toMatchObject({ verdict: "refused", reason: "private-address" });
  });

  it("answers NXDOMAIN for a name that does not exist and SERVFAIL for a slow or failing resolver", async () => {
    const resolve = spyResolver({ "slow.test": "hang", "broken.test": Object.assign(new Error("boom"), { code: "ESERVFAIL" }) });
    const dns = new EgressDns(new EgressPolicy({ allow: ["gone.test", "slow.test", "broken.test"] }), { resolve, timeoutMs: 50 });
    expect(await dns.resolve("gone.test")).toMatchObject({ verdict: "nxdomain", reason: "not-found" });
    const t0 = Date.now();
    expect(await dns.resolve("slow.test")).toMatchObject({ verdict: "servfail", reason: "timeout", ttl: 0 });
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(await dns.resolve("broken.test")).toMatchObject({ verdict: "servfail", reason: "error" });
  });

  it("keeps a verdict for its TTL, shares one lookup between concurrent questions, and asks again after", async () => {
    let now = 1_000_000;
    const resolve = spyResolver({ "web.test": ["93.184.216.34"] });
    const dns = new EgressDns(new EgressPolicy({ allow: ["web.test"] }), { resolve, now: () => now, ttlSeconds: 30 });
    // glibc asks A and AAAA together: one lookup.
    await Promise.all([dns.resolve("web.test", 1), dns.resolve("web.test", 28)]);
    expect(resolve).toHaveBeenCalledTimes(1);
    now += 29_000;
    await dns.resolve("web.test");
    expect(resolve).toHaveBeenCalledTimes(1);
    now += 2_000;
    await dns.resolve("web.test");
    expect(resolve).toHaveBeenCalledTimes(2);
    expect(dns.cachedAddresses("web.test")).toEqual(["93.184.216.34"]);
    now += 31_000;
    expect(dns.cachedAddresses("web.test")).toBeUndefined();
  });
});
