import { delimiter, dirname } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import {
  authEntryFor,
  dockerConfigPath,
  DOCKER_HUB_AUTH_KEY,
  helperFor,
  normalizeAuthKey,
  parseDockerConfig,
  parseWwwAuthenticate,
  resolveCredentials,
  runCredentialHelper,
  selectPlatform,
  serverUrlFor,
} from "../../src/registry/index.js";
import { isLoopback } from "../../src/registry/http.js";
import { cleanupTemps, removeDir, tempDir, writeCredentialHelper, writeDockerConfig } from "../helpers/registry.js";

afterAll(() => cleanupTemps());

const dirs: string[] = [];
afterAll(() => dirs.forEach(removeDir));
const b64 = (s: string) => Buffer.from(s).toString("base64");

describe("parseWwwAuthenticate", () => {
  it("parses a Docker Hub bearer challenge", () => {
    expect(parseWwwAuthenticate('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"')).toEqual([
      { scheme: "bearer", params: { realm: "https://auth.docker.io/token", service: "registry.docker.io", scope: "repository:library/alpine:pull" } },
    ]);
  });

  it("keeps commas inside quoted values and handles error params", () => {
    const [c] = parseWwwAuthenticate('Bearer realm="http://127.0.0.1:1/token", service="svc",scope="repository:a/b:pull,push" ,error="insufficient_scope"');
    expect(c).toEqual({ scheme: "bearer", params: { realm: "http://127.0.0.1:1/token", service: "svc", scope: "repository:a/b:pull,push", error: "insufficient_scope" } });
  });

  it("parses several challenges, unquoted values, escapes and case", () => {
    expect(parseWwwAuthenticate('Basic realm="Registry \\"realm\\"", BEARER Realm=https://x/t,Service=s')).toEqual([
      { scheme: "basic", params: { realm: 'Registry "realm"' } },
      { scheme: "bearer", params: { realm: "https://x/t", service: "s" } },
    ]);
  });

  it("tolerates empty and odd input", () => {
    expect(parseWwwAuthenticate("")).toEqual([]);
    expect(parseWwwAuthenticate("Basic")).toEqual([{ scheme: "basic", params: {} }]);
    expect(parseWwwAuthenticate("Negotiate abc==, Basic realm=r")).toEqual([
      { scheme: "negotiate", params: {} },
      { scheme: "basic", params: { realm: "r" } },
    ]);
  });
});

describe("docker config", () => {
  const cfgText = JSON.stringify({
    auths: {
      [DOCKER_HUB_AUTH_KEY]: { auth: b64("hubuser:hubpass") },
      "https://registry.example.com:5000/v2/": { username: "u", password: "p" },
      "ghcr.io": { auth: b64("gh:tok:with:colons") },
      "id.example.com": { auth: b64("x:"), identitytoken: "refresh" },
      "empty.example.com": {},
    },
    credHelpers: { "gcr.io": "gcloud", "https://index.docker.io/v1/": "hubhelper" },
    credsStore: "desktop",
  });
  const cfg = parseDockerConfig(cfgText, "/x/config.json");

  it("normalises keys like Docker", () => {
    expect(normalizeAuthKey("https://index.docker.io/v1/")).toBe("docker.io");
    expect(normalizeAuthKey("registry-1.docker.io")).toBe("docker.io");
    expect(normalizeAuthKey("http://Registry.Example.com:5000/v2/")).toBe("registry.example.com:5000");
    expect(serverUrlFor("docker.io")).toBe(DOCKER_HUB_AUTH_KEY);
    expect(serverUrlFor("ghcr.io")).toBe("ghcr.io");
  });

  it("finds auths entries, Docker Hub through its https://index.docker.io/v1/ alias", () => {
    expect(authEntryFor(cfg, "docker.io", "f")).toMatchObject({ username: "hubuser", password: "hubpass" });
    expect(authEntryFor(cfg, "registry.example.com:5000", "f")).toMatchObject({ username: "u", password: "p" });
    expect(authEntryFor(cfg, "ghcr.io", "f")).toMatchObject({ username: "gh", password: "tok:with:colons" });
    expect(authEntryFor(cfg, "id.example.com", "f")).toMatchObject({ username: "x", identityToken: "refresh" });
    expect(authEntryFor(cfg, "empty.example.com", "f")).toBeUndefined();
    expect(authEntryFor(cfg, "registry.example.com", "f")).toBeUndefined();
    expect(authEntryFor(cfg, "quay.io", "f")).toBeUndefined();
  });

  it("picks credHelpers before credsStore", () => {
    expect(helperFor(cfg, "gcr.io")).toBe("gcloud");
    expect(helperFor(cfg, "docker.io")).toBe("hubhelper");
    expect(helperFor(cfg, "quay.io")).toBe("desktop");
    expect(helperFor(parseDockerConfig("{}", "f"), "quay.io")).toBeUndefined();
  });

  it("rejects invalid JSON and a malformed auth with the file named", () => {
    expect(() => parseDockerConfig("{", "/x/config.json")).toThrow(/\/x\/config\.json/);
    const bad = parseDockerConfig(JSON.stringify({ auths: { "a.io": { auth: b64("nocolon") } } }), "/x/config.json");
    expect(() => authEntryFor(bad, "a.io", "/x/config.json")).toThrow(expect.objectContaining({ code: "REGISTRY_CREDENTIALS_ERROR" }));
  });

  it("locates config.json through DOCKER_CONFIG or HOME", () => {
    expect(dockerConfigPath({ DOCKER_CONFIG: "/d" })).toBe("/d/config.json");
    expect(dockerConfigPath({ HOME: "/home/u" })).toBe("/home/u/.docker/config.json");
  });

  it("resolves credentials: helper first, falls back to auths when the helper is missing or has none", async () => {
    const helper = writeCredentialHelper("unit", { Username: "helperuser", Secret: "helperpass" });
    const notFound = tempDir("sm-cred-nf-");
    dirs.push(helper.dir, notFound);
    const { writeFileSync } = await import("node:fs");
    writeFileSync(`${notFound}/docker-credential-none`, "#!/bin/sh\necho 'credentials not found in native keychain'\nexit 1\n", { mode: 0o755 });
    const env = { PATH: `${helper.dir}${delimiter}${notFound}${delimiter}/usr/bin:/bin` };
    const path = writeDockerConfig({
      credHelpers: { "a.io": "unit", "b.io": "none", "c.io": "not-installed" },
      auths: { "b.io": { auth: b64("fileuser:filepass") }, "c.io": { auth: b64("c:d") } },
    });
    dirs.push(dirname(path));
    expect(await resolveCredentials("a.io", { dockerConfig: path, env })).toMatchObject({ username: "helperuser", password: "helperpass", source: "docker-credential-unit" });
    expect(await resolveCredentials("b.io", { dockerConfig: path, env })).toMatchObject({ username: "fileuser", password: "filepass" });
    expect(await resolveCredentials("c.io", { dockerConfig: path, env })).toMatchObject({ username: "c", password: "d" });
    expect(await resolveCredentials("d.io", { dockerConfig: path, env })).toBeUndefined();
    expect(await resolveCredentials("a.io", { dockerConfig: `${notFound}/missing.json`, env })).toBeUndefined();
    expect(await runCredentialHelper("unit", "https://index.docker.io/v1/", env)).toMatchObject({ username: "helperuser" });
  });

  it("a failing helper is an error naming it", async () => {
    const dir = tempDir("sm-cred-fail-");
    dirs.push(dir);
    const { writeFileSync } = await import("node:fs");
    writeFileSync(`${dir}/docker-credential-broken`, "#!/bin/sh\necho 'keychain locked' >&2\nexit 3\n", { mode: 0o755 });
    await expect(runCredentialHelper("broken", "x.io", { PATH: dir })).rejects.toMatchObject({
      code: "REGISTRY_CREDENTIALS_ERROR",
      message: expect.stringMatching(/docker-credential-broken.*keychain locked/),
    });
  });
});

describe("platform selection and hosts", () => {
  const d = (n: number, platform?: object) => ({ mediaType: "application/vnd.oci.image.manifest.v1+json", digest: `sha256:${String(n).repeat(64)}`, size: 1, ...(platform ? { platform } : {}) });
  const index = {
    manifests: [
      d(1, { os: "linux", architecture: "amd64" }),
      d(2, { os: "linux", architecture: "arm", variant: "v6" }),
      d(3, { os: "linux", architecture: "arm", variant: "v7" }),
      d(4, { os: "linux", architecture: "arm64", variant: "v8" }),
      d(5, { os: "unknown", architecture: "unknown" }),
    ],
  };
  it("matches os, architecture and variant", () => {
    expect(selectPlatform(index, { os: "linux", architecture: "amd64" }, "i").digest).toBe(d(1).digest);
    expect(selectPlatform(index, { os: "linux", architecture: "arm", variant: "v7" }, "i").digest).toBe(d(3).digest);
    expect(selectPlatform(index, { os: "linux", architecture: "arm64" }, "i").digest).toBe(d(4).digest);
    expect(() => selectPlatform(index, { os: "linux", architecture: "arm", variant: "v5" }, "i")).toThrow(
      /linux\/arm\/v5.*available platforms: linux\/amd64, linux\/arm\/v6, linux\/arm\/v7, linux\/arm64\/v8$/,
    );
    expect(selectPlatform({ manifests: [d(9)] }, { os: "linux", architecture: "amd64" }, "i").digest).toBe(d(9).digest);
  });

  it("knows loopback hosts", () => {
    for (const h of ["localhost", "localhost:5000", "127.0.0.1", "127.1.2.3:80", "[::1]:5000", "[::1]"]) expect(isLoopback(h)).toBe(true);
    for (const h of ["example.com", "10.0.0.1:5000", "[::2]:5000", "128.0.0.1"]) expect(isLoopback(h)).toBe(false);
  });
});
