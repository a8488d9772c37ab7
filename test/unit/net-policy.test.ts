// The network option (src/spec/network.ts) and the egress policy (src/net/policy.ts): the grammar of
// allow entries and hosts, their errors, the canonical key, and which host:port and addresses pass.
import { describe, expect, it } from "vitest";
import { EgressPolicy, classifyAddress } from "../../src/net/policy.js";
import { networkKey, networkSchema, parseNetwork } from "../../src/schema/network.js";
import { parseOptions } from "../../src/schema/parse.js";
import { z } from "zod";
import { NetworkError, OptionError } from "../../src/errors.js";

function refused(fn: () => unknown): NetworkError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(NetworkError);
    return e as NetworkError;
  }
  throw new Error("expected a NetworkError");
}

describe("network option", () => {
  it("takes mode transparent (the default) or proxy, and refuses anything else by name", () => {
    expect(parseNetwork({ allow: ["a.example"] })).toMatchObject({ mode: "transparent" });
    expect(parseNetwork({ allow: ["a.example"], mode: "proxy" })).toMatchObject({ mode: "proxy" });
    const e = refused(() => parseNetwork({ allow: ["a.example"], mode: "tun" }));
    expect(e.code).toBe("NETWORK_INVALID");
    expect(e.message).toBe('network.mode must be "transparent" or "proxy", got "tun"');
    expect(e.hint).toMatch(/transparent.*default/);
  });

  it("defaults to none and fills the limits", () => {
    expect(parseNetwork(undefined)).toBe("none");
    expect(parseNetwork("none")).toBe("none");
    const r = parseNetwork({ allow: ["Example.COM"] });
    expect(r).toMatchObject({ maxConnections: 32, maxBytes: 4 * 1024 ** 3, hosts: {} });
    expect(r !== "none" && r.allow[0]).toMatchObject({ kind: "name", host: "example.com", text: "example.com" });
  });

  it("compiles every accepted form", () => {
    const r = parseNetwork({ allow: ["a.b.c:8443", "*.pythonhosted.org", "10.0.0.5:3128", "::1", "[::1]", "[0:0::1]:8080", "[::ffff:127.0.0.1]:81", "trailing.dot.", "_srv.example"] });
    expect(r !== "none" && r.allow.map((a) => a.text)).toEqual(["*.pythonhosted.org", "10.0.0.5:3128", "127.0.0.1:81", "[::1]", "[::1]:8080", "_srv.example", "a.b.c:8443", "trailing.dot"]);
  });

  it.each([
    ["", /is empty/],
    ["https://pypi.org/simple", /is a URL, not a host/],
    ["exa mple.com", /not an ASCII host name|not a valid host name/],
    ["a..b", /empty label/],
    ["-a.com", /label "-a"/],
    ["example.com:0", /port "0", not a number from 1 to 65535/],
    ["example.com:http", /port "http"/],
    ["a.*.com", /'\*' that is not the first label/],
    ["*.10.0.0.1", /wildcard/],
    ["1.2.3.256", /not a valid IPv4 address/],
    ["[::1", /no closing/],
    ["[example.com]:80", /brackets/],
    ["fe80::1%eth0", /not a valid IPv6 address/],
    ["user@host", /'@'/],
  ])("refuses allow entry %j", (entry, cause) => {
    const e = refused(() => parseNetwork({ allow: ["ok.example", entry] }));
    expect(e.code).toBe("NETWORK_BAD_ALLOW");
    expect(e.message).toContain("network.allow[1]");
    expect(e.message).toMatch(cause);
    expect(e.hint).toBeTruthy();
  });

  it("suggests the punycode form of a non-ASCII name", () => {
    const e = refused(() => parseNetwork({ allow: ["münchen.de"] }));
    expect(e.message).toMatch(/not an ASCII host name/);
    expect(e.hint).toContain("xn--mnchen-3ya.de");
  });

  it("lists the accepted forms in the hint", () => {
    expect(refused(() => parseNetwork({ allow: ["a..b"] })).hint).toMatch(/\*\.domain.*\[::1\]:8080.*80 and 443/);
  });

  it("checks hosts, the shape and the limits", () => {
    expect(parseNetwork({ allow: [], hosts: { "Pypi.Local": "[::1]", "x.test": "127.0.0.1" } })).toMatchObject({ hosts: { "pypi.local": "::1", "x.test": "127.0.0.1" } });
    expect(refused(() => parseNetwork({ allow: [], hosts: { "x.test": "localhost" } })).code).toBe("NETWORK_BAD_HOSTS");
    expect(refused(() => parseNetwork({ allow: [], hosts: { "127.0.0.1": "127.0.0.1" } })).code).toBe("NETWORK_BAD_HOSTS");
    expect(refused(() => parseNetwork("all")).code).toBe("NETWORK_INVALID");
    expect(refused(() => parseNetwork({})).message).toMatch(/network\.allow must be an array/);
    expect(refused(() => parseNetwork({ allow: [], maxConnections: 0 })).message).toMatch(/network\.maxConnections must be an integer from 1 to 4096, got 0/);
    // An unknown key is OPTION_UNKNOWN, which is OptionError's code (NetworkError has only NETWORK_* codes).
    let u: OptionError | undefined;
    try {
      parseNetwork({ allow: [], alow: [] });
    } catch (e) {
      u = e as OptionError;
    }
    expect(u).toBeInstanceOf(OptionError);
    expect(u).not.toBeInstanceOf(NetworkError);
    expect(u!.code).toBe("OPTION_UNKNOWN");
    expect(u!.hint).toContain('"allow"');
  });

  it("reports through parseOptions with the NETWORK_* code when embedded in a schema", () => {
    const schema = z.object({ network: networkSchema }).strict();
    expect(parseOptions("Image.build", schema, {}).network).toBe("none");
    try {
      parseOptions("Image.build", schema, { network: { allow: ["ok.example", "bad..name"] } });
      throw new Error("not refused");
    } catch (e) {
      expect(e).toBeInstanceOf(OptionError);
      expect((e as OptionError).code).toBe("NETWORK_BAD_ALLOW");
      expect((e as OptionError).message).toMatch(/^Image\.build: network\.allow\[1\] is not a valid host name .*got "bad\.\.name"/);
      expect((e as OptionError).hint).toMatch(/accepted forms/);
    }
  });

  it("normalises to one canonical key: sorted, deduplicated, defaults filled", () => {
    const a = networkKey({ allow: ["B.example", "a.example", "b.example", "[0::1]:80"], hosts: { "z.test": "::1", "A.test": "127.0.0.1" } });
    const b = networkKey({ allow: ["[::1]:80", "a.example", "b.example"], hosts: { "a.test": "127.0.0.1", "z.test": "0::1" }, maxConnections: 32, maxBytes: 4 * 1024 ** 3 });
    expect(JSON.stringify(a)).toBe(JSON.stringify(b));
    expect(a).toEqual({ allow: ["[::1]:80", "a.example", "b.example"], hosts: { "a.test": "127.0.0.1", "z.test": "::1" }, maxConnections: 32, maxBytes: 4294967296, mode: "transparent" });
    expect(networkKey("none")).toBe("none");
    // The mode is keyed: a warmup in proxy mode reaches less than one in transparent mode.
    expect(networkKey({ allow: ["a.example"], mode: "proxy" })).toMatchObject({ mode: "proxy" });
    expect(JSON.stringify(networkKey({ allow: ["a.example"], mode: "proxy" }))).not.toBe(JSON.stringify(networkKey({ allow: ["a.example"] })));
    expect(JSON.stringify(networkKey({ allow: ["a.example"], maxBytes: 10 }))).not.toBe(JSON.stringify(networkKey({ allow: ["a.example"] })));
  });
});

describe("address classes", () => {
  it.each([
    ["127.0.0.1", "loopback"],
    ["127.255.1.2", "loopback"],
    ["10.1.2.3", "private"],
    ["172.16.0.1", "private"],
    ["172.31.255.255", "private"],
    ["192.168.1.1", "private"],
    ["169.254.169.254", "link-local"],
    ["100.64.0.1", "shared (CGNAT)"],
    ["0.0.0.0", "this-network"],
    ["224.0.0.1", "multicast"],
    ["255.255.255.255", "broadcast"],
    ["::", "unspecified"],
    ["::1", "loopback"],
    ["fe80::1", "link-local"],
    ["fd00::1", "unique-local"],
    ["fc00::1", "unique-local"],
    ["ff02::1", "multicast"],
    ["::ffff:127.0.0.1", "loopback"],
    ["::ffff:10.0.0.1", "private"],
    ["64:ff9b::7f00:1", "loopback"],
    ["64:ff9b::a9fe:a9fe", "link-local"],
  ])("%s is %s", (address, cls) => {
    expect(classifyAddress(address)).toBe(cls);
  });

  it.each(["8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "64:ff9b::808:808", "::ffff:1.1.1.1"])("%s is public", (address) => {
    expect(classifyAddress(address)).toBeUndefined();
  });
});

describe("EgressPolicy", () => {
  const policy = new EgressPolicy({ allow: ["pypi.org", "*.pythonhosted.org", "api.example:8443", "127.0.0.1:9000", "[::1]", "10.0.0.5"] });

  it("allows names, wildcards and ports as listed", () => {
    expect(policy.check("pypi.org", 443).allowed).toBe(true);
    expect(policy.check("PyPI.org.", 80).allowed).toBe(true);
    expect(policy.check("pypi.org", 8080).allowed).toBe(false);
    expect(policy.check("files.pythonhosted.org", 443).allowed).toBe(true);
    expect(policy.check("a.b.pythonhosted.org", 80).allowed).toBe(true);
    expect(policy.check("pythonhosted.org", 443).allowed).toBe(false);
    expect(policy.check("evilpythonhosted.org", 443).allowed).toBe(false);
    expect(policy.check("api.example", 8443).allowed).toBe(true);
    expect(policy.check("api.example", 443).allowed).toBe(false);
    expect(policy.check("127.0.0.1", 9000).allowed).toBe(true);
    expect(policy.check("127.0.0.1", 9001).allowed).toBe(false);
    expect(policy.check("[::1]", 443).allowed).toBe(true);
    expect(policy.check("::ffff:127.0.0.1", 9000).allowed).toBe(true);
    expect(policy.check("localhost", 9000).allowed).toBe(false);
  });

  it("names the target and the entry to add when refusing", () => {
    const d = policy.check("evil.example", 443);
    expect(d).toEqual({ allowed: false, reason: "not-allowed", message: 'supermachine: egress to evil.example:443 is not allowed (network.allow does not list it); add "evil.example" to network.allow' });
    const p = policy.check("evil.example", 2222);
    expect(!p.allowed && p.message).toContain('add "evil.example:2222"');
    expect(policy.check("bad..host", 443)).toMatchObject({ allowed: false, reason: "bad-host" });
    expect(new EgressPolicy("none").check("pypi.org", 443)).toMatchObject({ allowed: false, reason: "disabled" });
  });

  it("refuses special addresses a name resolves to unless listed by IP with the port", () => {
    expect(policy.checkAddress("pypi.org", 443, "151.101.0.223").allowed).toBe(true);
    const d = policy.checkAddress("pypi.org", 443, "127.0.0.1");
    expect(d).toMatchObject({ allowed: false, reason: "private-address" });
    expect(!d.allowed && d.message).toMatch(/resolves to 127\.0\.0\.1, a loopback address.*add "127\.0\.0\.1" to network\.allow/);
    expect(policy.checkAddress("x", 9000, "127.0.0.1").allowed).toBe(true);
    expect(policy.checkAddress("x", 9000, "::ffff:127.0.0.1").allowed).toBe(true);
    expect(policy.checkAddress("x", 9001, "127.0.0.1").allowed).toBe(false);
    expect(policy.checkAddress("x", 443, "::1").allowed).toBe(true);
    expect(policy.checkAddress("x", 443, "10.0.0.5").allowed).toBe(true);
    expect(policy.checkAddress("x", 443, "10.0.0.6").allowed).toBe(false);
    expect(policy.checkAddress("x", 443, "169.254.169.254").allowed).toBe(false);
    expect(policy.checkAddress("x", 443, "64:ff9b::7f00:1").allowed).toBe(false);
  });
});
