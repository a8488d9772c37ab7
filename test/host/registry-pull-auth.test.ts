import { readFileSync } from "node:fs";
import { delimiter } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BlobStore } from "../../src/store/blobs.js";
import { parseDockerRef } from "../../src/oci/docker-ref.js";
import { clearTokenCache, pullImage, resolveDigest } from "../../src/registry/index.js";
import {
  tempStore,
  cleanupTemps,
  corruptBlobs,
  fixtures,
  PASS,
  REFRESH_TOKEN,
  removeDir,
  startRegistry,
  tempDir,
  USER,
  writeCredentialHelper,
  writeDockerConfig,
  type Fixtures,
  type Registry,
} from "../helpers/registry.js";

afterAll(() => cleanupTemps());

let fx: Fixtures;
const homes: string[] = [];
const basic = (u: string, p: string) => Buffer.from(`${u}:${p}`).toString("base64");
const noConfig = () => writeDockerConfig({});

const newStore = () => tempStore(homes);

beforeAll(async () => {
  fx = await fixtures();
});

afterAll(() => {
  for (const h of homes) removeDir(h);
});

describe("TLS registry with htpasswd auth", () => {
  let reg: Registry;
  beforeAll(async () => {
    reg = await startRegistry("tls");
    await reg.push(fx.busybox.layout, fx.busybox.tag, "team/busybox", "v1");
  });
  afterAll(() => reg?.stop());

  it("pulls with credentials from config.json auths and the CA from opts.ca", async () => {
    const dockerConfig = writeDockerConfig({ auths: { [reg.host]: { auth: basic(USER, PASS) } } });
    const store = newStore();
    const res = await pullImage(parseDockerRef(`${reg.host}/team/busybox:v1`), { store, dockerConfig, ca: reg.caPem! });
    expect(corruptBlobs(store.root, [res.manifestDigest, res.configDigest, ...res.layers.map((l) => l.digest)])).toEqual([]);
  });

  it("reads the CA from SUPERMACHINE_REGISTRY_CA and the config from DOCKER_CONFIG", async () => {
    const dockerConfig = writeDockerConfig({ auths: { [`https://${reg.host}/v1/`]: { username: USER, password: PASS } } });
    const env = { ...process.env, SUPERMACHINE_REGISTRY_CA: reg.caFile!, DOCKER_CONFIG: dockerConfig.replace(/\/config\.json$/, "") };
    const digest = await resolveDigest(parseDockerRef(`${reg.host}/team/busybox:v1`), { env });
    expect(digest).toMatch(/^sha256:/);
  });

  it("without credentials → REGISTRY_UNAUTHORIZED naming host and repository, with a docker login hint", async () => {
    const err = await pullImage(parseDockerRef(`${reg.host}/team/busybox:v1`), { store: newStore(), dockerConfig: noConfig(), ca: reg.caPem! }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_UNAUTHORIZED" });
    expect((err as Error).message).toContain(reg.host);
    expect((err as Error).message).toContain("team/busybox");
    expect((err as { hint?: string }).hint).toMatch(/docker login/);
  });

  it("with a wrong password → REGISTRY_UNAUTHORIZED", async () => {
    const dockerConfig = writeDockerConfig({ auths: { [reg.host]: { auth: basic(USER, "wrong") } } });
    const err = await pullImage(parseDockerRef(`${reg.host}/team/busybox:v1`), { store: newStore(), dockerConfig, ca: reg.caPem! }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_UNAUTHORIZED" });
    expect((err as { hint?: string }).hint).toContain(dockerConfig);
  });

  it("an unknown CA → REGISTRY_TLS_ERROR; listing the registry as insecure skips verification", async () => {
    const credentials = { username: USER, password: PASS };
    const err = await resolveDigest(parseDockerRef(`${reg.host}/team/busybox:v1`), { credentials }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_TLS_ERROR" });
    expect((err as { hint?: string }).hint).toMatch(/SUPERMACHINE_REGISTRY_CA/);
    const env = { ...process.env, SUPERMACHINE_INSECURE_REGISTRIES: `example.com,${reg.host}` };
    expect(await resolveDigest(parseDockerRef(`${reg.host}/team/busybox:v1`), { credentials, env })).toMatch(/^sha256:/);
  });

  it("gets credentials from a credHelpers helper on PATH", async () => {
    const helper = writeCredentialHelper("smtest", { ServerURL: reg.host, Username: USER, Secret: PASS });
    const dockerConfig = writeDockerConfig({ credHelpers: { [reg.host]: "smtest" }, auths: { [reg.host]: { auth: basic(USER, "wrong") } } });
    const env = { ...process.env, PATH: `${helper.dir}${delimiter}${process.env.PATH}` };
    const res = await pullImage(parseDockerRef(`${reg.host}/team/busybox:v1`), { store: newStore(), dockerConfig, env, ca: reg.caPem! });
    expect(res.layers.length).toBeGreaterThan(0);
    expect(readFileSync(helper.log, "utf8").trim()).toBe(reg.host);
  });
});

describe("token auth registry", () => {
  let reg: Registry;
  beforeAll(async () => {
    reg = await startRegistry("token");
    await reg.push(fx.busybox.layout, fx.busybox.tag, "public/busybox", "latest");
    await reg.push(fx.busybox.layout, fx.busybox.tag, "private/busybox", "latest");
  });
  afterAll(() => reg?.stop());

  it("pulls anonymously with a token, and reuses the cached token", async () => {
    clearTokenCache();
    const ref = parseDockerRef(`${reg.host}/public/busybox`);
    reg.tokenRequests.length = 0;
    const store = newStore();
    const res = await pullImage(ref, { store, dockerConfig: noConfig() });
    expect(corruptBlobs(store.root, res.layers.map((l) => l.digest))).toEqual([]);
    expect(reg.tokenRequests).toEqual([{ method: "GET", user: undefined, scopes: ["repository:public/busybox:pull"] }]);
    await pullImage(ref, { store: newStore(), dockerConfig: noConfig() });
    expect(reg.tokenRequests.length).toBe(1);
  });

  it("anonymous access to a private repository → REGISTRY_UNAUTHORIZED; credentials get in", async () => {
    clearTokenCache();
    const ref = parseDockerRef(`${reg.host}/private/busybox`);
    const err = await pullImage(ref, { store: newStore(), dockerConfig: noConfig() }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_UNAUTHORIZED" });
    expect((err as Error).message).toContain("private/busybox");

    reg.tokenRequests.length = 0;
    const dockerConfig = writeDockerConfig({ auths: { [reg.host]: { auth: basic(USER, PASS) } } });
    const res = await pullImage(ref, { store: newStore(), dockerConfig });
    expect(res.layers.length).toBeGreaterThan(0);
    expect(reg.tokenRequests[0]).toMatchObject({ method: "GET", user: USER });
  });

  it("bad credentials at the token server → REGISTRY_UNAUTHORIZED", async () => {
    clearTokenCache();
    const err = await resolveDigest(parseDockerRef(`${reg.host}/private/busybox`), { credentials: { username: USER, password: "nope" } }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "REGISTRY_UNAUTHORIZED" });
    expect((err as Error).message).toMatch(/token server/);
  });

  it("exchanges an identity token with the OAuth2 refresh-token grant", async () => {
    clearTokenCache();
    reg.tokenRequests.length = 0;
    const dockerConfig = writeDockerConfig({ auths: { [reg.host]: { auth: basic(USER, ""), identitytoken: REFRESH_TOKEN } } });
    const res = await pullImage(parseDockerRef(`${reg.host}/private/busybox`), { store: newStore(), dockerConfig });
    expect(res.layers.length).toBeGreaterThan(0);
    expect(reg.tokenRequests[0]).toMatchObject({ method: "POST", grantType: "refresh_token", scopes: ["repository:private/busybox:pull"] });
  });

  it("a credential helper answering <token> gives an identity token", async () => {
    clearTokenCache();
    reg.tokenRequests.length = 0;
    const helper = writeCredentialHelper("smtoken", { Username: "<token>", Secret: REFRESH_TOKEN });
    const dockerConfig = writeDockerConfig({ credsStore: "smtoken" });
    const env = { ...process.env, PATH: `${helper.dir}${delimiter}${process.env.PATH}` };
    const digest = await resolveDigest(parseDockerRef(`${reg.host}/private/busybox`), { dockerConfig, env });
    expect(digest).toMatch(/^sha256:/);
    expect(reg.tokenRequests[0]).toMatchObject({ method: "POST", grantType: "refresh_token" });
  });
});
