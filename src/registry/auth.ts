/**
 * Registry authentication: `WWW-Authenticate` challenges, the distribution token flow (anonymous,
 * Basic credentials, OAuth2 refresh-token grant for identity tokens), Basic auth, and the
 * credentials Docker keeps — `config.json` auths, `credHelpers` and `credsStore` (run as
 * `docker-credential-<name> get`).
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { constants } from "node:fs";
import { access, readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { delimiter, join } from "node:path";
import { DOCKER_HUB } from "../oci/docker-ref.js";
import { logger } from "../debug.js";
import { RegistryError } from "./errors.js";
import { errorDetail, readBody, type HttpResponse, type Transport } from "./http.js";

const log = logger("registry");

// ---------------------------------------------------------------------------------------------
// WWW-Authenticate

export interface Challenge {
  /** Lower-cased scheme: "bearer", "basic", ... */
  scheme: string;
  /** Parameters, names lower-cased. */
  params: Record<string, string>;
}

const TOKEN_CHAR = /[!#$%&'*+.^_`|~0-9A-Za-z-]/;

/** Parses a `WWW-Authenticate` header value (RFC 7235): one or more challenges. */
export function parseWwwAuthenticate(header: string): Challenge[] {
  const out: Challenge[] = [];
  let i = 0;
  const n = header.length;
  const skipWs = () => {
    while (i < n && (header[i] === " " || header[i] === "\t")) i++;
  };
  const token = (): string => {
    const start = i;
    while (i < n && TOKEN_CHAR.test(header[i]!)) i++;
    return header.slice(start, i);
  };
  const quoted = (): string => {
    let v = "";
    i++; // opening quote
    while (i < n && header[i] !== '"') {
      if (header[i] === "\\" && i + 1 < n) i++;
      v += header[i];
      i++;
    }
    i++; // closing quote
    return v;
  };
  // Lenient: unquoted values run to the next comma or space (servers send unquoted URLs).
  const bare = (): string => {
    const start = i;
    while (i < n && header[i] !== "," && header[i] !== " " && header[i] !== "\t") i++;
    return header.slice(start, i);
  };
  while (i < n) {
    while (i < n && (header[i] === "," || header[i] === " " || header[i] === "\t")) i++;
    if (i >= n) break;
    const scheme = token();
    if (scheme === "") {
      i++; // junk: skip a character
      continue;
    }
    const ch: Challenge = { scheme: scheme.toLowerCase(), params: {} };
    out.push(ch);
    skipWs();
    // Parameters until a token that is not followed by "=" (the next challenge's scheme).
    for (;;) {
      while (i < n && (header[i] === "," || header[i] === " " || header[i] === "\t")) i++;
      const save = i;
      const name = token();
      skipWs();
      if (name === "" || header[i] !== "=") {
        i = save;
        break;
      }
      i++; // "="
      if (header[i] === "=") {
        // token68 with padding: skip it.
        while (i < n && header[i] !== ",") i++;
        continue;
      }
      skipWs();
      const value = header[i] === '"' ? quoted() : bare();
      ch.params[name.toLowerCase()] = value;
      skipWs();
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Docker config and credential helpers

export interface DockerAuthEntry {
  auth?: string;
  username?: string;
  password?: string;
  identitytoken?: string;
  registrytoken?: string;
}

export interface DockerConfig {
  auths: Record<string, DockerAuthEntry>;
  credHelpers: Record<string, string>;
  credsStore?: string;
}

export interface Credentials {
  username: string;
  password?: string;
  /** OAuth2 refresh token (`identitytoken`), exchanged at the token realm. */
  identityToken?: string;
  /** A bearer token to send to the registry as is (`registrytoken`). */
  registryToken?: string;
  /** Where they came from, for messages: "/home/u/.docker/config.json", "docker-credential-pass". */
  source: string;
}

/** Docker Hub's key in config.json, and the server URL its credential helpers are asked for. */
export const DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/";
const HUB_ALIASES = new Set(["index.docker.io", "docker.io", "registry-1.docker.io", "registry.hub.docker.com"]);

/** `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. */
export function dockerConfigPath(env: NodeJS.ProcessEnv = process.env): string {
  if (env.DOCKER_CONFIG) return join(env.DOCKER_CONFIG, "config.json");
  return join(env.HOME || homedir(), ".docker", "config.json");
}

/** Parses config.json text; `where` names the file in error messages. */
export function parseDockerConfig(text: string, where: string): DockerConfig {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (cause) {
    throw new RegistryError("REGISTRY_CREDENTIALS_ERROR", `docker config ${where} is not valid JSON: ${(cause as Error).message}`, {
      cause,
      hint: "fix or remove the file, or point DOCKER_CONFIG at another directory",
    });
  }
  const obj = isObject(raw) ? raw : {};
  const cfg: DockerConfig = { auths: {}, credHelpers: {} };
  if (isObject(obj.auths)) {
    for (const [key, v] of Object.entries(obj.auths)) {
      if (!isObject(v)) continue;
      const e: DockerAuthEntry = {};
      for (const f of ["auth", "username", "password", "identitytoken", "registrytoken"] as const) {
        if (typeof v[f] === "string" && v[f] !== "") e[f] = v[f] as string;
      }
      cfg.auths[key] = e;
    }
  }
  if (isObject(obj.credHelpers)) {
    for (const [key, v] of Object.entries(obj.credHelpers)) if (typeof v === "string" && v !== "") cfg.credHelpers[key] = v;
  }
  if (typeof obj.credsStore === "string" && obj.credsStore !== "") cfg.credsStore = obj.credsStore;
  return cfg;
}

/** Normalises a config.json key (`https://host:5000/v1/`, `host`) to `host[:port]`, as Docker does. */
export function normalizeAuthKey(key: string): string {
  let k = key.trim().toLowerCase();
  k = k.replace(/^[a-z][a-z0-9+.-]*:\/\//, "");
  k = k.split("/")[0]!;
  return HUB_ALIASES.has(k) ? DOCKER_HUB : k;
}

/** The host config.json entries are compared against: Docker Hub's aliases all become docker.io. */
function authHost(registry: string): string {
  return normalizeAuthKey(registry);
}

/** Credentials of the `auths` entry for `registry`, if any. */
export function authEntryFor(cfg: DockerConfig, registry: string, source: string): Credentials | undefined {
  const host = authHost(registry);
  const keys = Object.keys(cfg.auths);
  // Exact key first (Docker Hub's canonical key included), then any key that normalises to the host.
  const key =
    (host === DOCKER_HUB && keys.includes(DOCKER_HUB_AUTH_KEY) ? DOCKER_HUB_AUTH_KEY : undefined) ??
    keys.find((k) => k === registry) ??
    keys.find((k) => normalizeAuthKey(k) === host);
  if (key === undefined) return undefined;
  return entryCredentials(cfg.auths[key]!, `${source} (auths.${JSON.stringify(key)})`);
}

function entryCredentials(e: DockerAuthEntry, source: string): Credentials | undefined {
  let username = e.username;
  let password = e.password;
  if (e.auth) {
    const decoded = Buffer.from(e.auth, "base64").toString("utf8");
    const colon = decoded.indexOf(":");
    if (colon < 0) {
      throw new RegistryError("REGISTRY_CREDENTIALS_ERROR", `${source}: "auth" is not base64 of user:password`, {
        hint: "run `docker login` again, or write auth as base64 of \"user:password\"",
      });
    }
    username = decoded.slice(0, colon);
    password = decoded.slice(colon + 1);
  }
  if (e.registrytoken) return { username: username ?? "", registryToken: e.registrytoken, source };
  if (e.identitytoken) return { username: username ?? "", identityToken: e.identitytoken, source };
  if (username === undefined || username === "") return undefined;
  return { username, password: password ?? "", source };
}

/** The credential helper configured for `registry` (`credHelpers`, else `credsStore`). */
export function helperFor(cfg: DockerConfig, registry: string): string | undefined {
  const host = authHost(registry);
  const key = Object.keys(cfg.credHelpers).find((k) => k === registry || normalizeAuthKey(k) === host);
  return key !== undefined ? cfg.credHelpers[key] : cfg.credsStore;
}

export interface CredentialOptions {
  /** Path of config.json (default `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`). */
  dockerConfig?: string;
  /** Explicit credentials; config.json is not read when given. */
  credentials?: { username: string; password: string } | { identityToken: string; username?: string };
  env?: NodeJS.ProcessEnv;
}

/** Finds credentials for `registry` the way Docker does; undefined means anonymous. */
export async function resolveCredentials(registry: string, opts: CredentialOptions = {}): Promise<Credentials | undefined> {
  if (opts.credentials) {
    const c = opts.credentials;
    return "identityToken" in c
      ? { username: c.username ?? "", identityToken: c.identityToken, source: "the credentials option" }
      : { username: c.username, password: c.password, source: "the credentials option" };
  }
  const env = opts.env ?? process.env;
  const path = opts.dockerConfig ?? dockerConfigPath(env);
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw new RegistryError("REGISTRY_CREDENTIALS_ERROR", `cannot read docker config ${path}: ${(err as Error).message}`, { cause: err });
  }
  const cfg = parseDockerConfig(text, path);
  const helper = helperFor(cfg, registry);
  if (helper !== undefined) {
    const fromHelper = await runCredentialHelper(helper, serverUrlFor(registry), env);
    if (fromHelper) return fromHelper;
  }
  return authEntryFor(cfg, registry, path);
}

/** What a credential helper is asked for: Docker Hub's legacy URL, else the host. */
export function serverUrlFor(registry: string): string {
  return authHost(registry) === DOCKER_HUB ? DOCKER_HUB_AUTH_KEY : registry;
}

async function findOnPath(name: string, env: NodeJS.ProcessEnv): Promise<string | undefined> {
  for (const dir of (env.PATH ?? "").split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, name);
    try {
      await access(p, constants.X_OK);
      return p;
    } catch {
      // next
    }
  }
  return undefined;
}

/**
 * Runs `docker-credential-<helper> get` with `serverUrl` on stdin. Undefined when the helper is
 * not installed or has no credentials for the server.
 */
export async function runCredentialHelper(helper: string, serverUrl: string, env: NodeJS.ProcessEnv = process.env): Promise<Credentials | undefined> {
  const name = `docker-credential-${helper}`;
  const bin = await findOnPath(name, env);
  if (!bin) {
    log("credential helper %s is not on PATH; ignoring it", name);
    return undefined;
  }
  const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve, reject) => {
    const child = spawn(bin, ["get"], { env, stdio: ["pipe", "pipe", "pipe"], timeout: 30_000 });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
    child.stdin.on("error", () => {});
    child.stdin.end(serverUrl);
  }).catch((cause: unknown) => {
    throw new RegistryError("REGISTRY_CREDENTIALS_ERROR", `credential helper ${bin} could not be run: ${(cause as Error).message}`, { cause });
  });
  if (code !== 0) {
    const out = `${stdout}${stderr}`.trim();
    if (/credentials not found/i.test(out)) return undefined;
    throw new RegistryError("REGISTRY_CREDENTIALS_ERROR", `credential helper ${name} failed for ${serverUrl} (exit ${code}): ${out.slice(0, 500)}`, {
      hint: `check \`echo ${serverUrl} | ${name} get\`, or remove the helper from config.json`,
    });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(stdout);
  } catch {
    throw new RegistryError("REGISTRY_CREDENTIALS_ERROR", `credential helper ${name} printed something that is not JSON for ${serverUrl}`);
  }
  const p = isObject(parsed) ? parsed : {};
  const username = typeof p.Username === "string" ? p.Username : "";
  const secret = typeof p.Secret === "string" ? p.Secret : "";
  if (secret === "") return undefined;
  if (username === "<token>") return { username: "", identityToken: secret, source: name };
  return { username, password: secret, source: name };
}

// ---------------------------------------------------------------------------------------------
// Tokens

interface CachedToken {
  header: string;
  expiresAt: number;
}

/** Bearer tokens by registry, realm, service, scope and identity; shared by all pulls of the process. */
const tokenCache = new Map<string, CachedToken>();

/** Forgets all cached tokens (tests). */
export function clearTokenCache(): void {
  tokenCache.clear();
}

/**
 * The authorization state of one registry host for one pull: tells what `Authorization`
 * header to send, and reacts to 401 challenges.
 */
export class Authenticator {
  private credentials: Promise<Credentials | undefined> | undefined;
  private basic: string | undefined;
  private bearerParams: { realm: string; service: string } | undefined;
  /** Whether credentials were offered to the registry (for messages). */
  usedCredentials: Credentials | undefined;

  constructor(
    readonly host: string,
    private readonly transport: Transport,
    private readonly credOpts: CredentialOptions & { registry: string },
  ) {}

  getCredentials(): Promise<Credentials | undefined> {
    this.credentials ??= resolveCredentials(this.credOpts.registry, this.credOpts);
    return this.credentials;
  }

  /** The header to send for `scope` now, if we know one. */
  async authorization(scope: string): Promise<string | undefined> {
    if (this.basic) return this.basic;
    if (this.bearerParams) {
      const key = await this.cacheKey(this.bearerParams.realm, this.bearerParams.service, scope);
      const hit = tokenCache.get(key);
      if (hit && hit.expiresAt > Date.now()) return hit.header;
    }
    return undefined;
  }

  /**
   * Handles a 401: returns the header to retry with, or undefined when there is nothing
   * (else) to try. `sent` is the header the refused request carried.
   */
  async onChallenge(wwwAuthenticate: string | undefined, scope: string, sent: string | undefined, ownScope = false): Promise<string | undefined> {
    const challenges = parseWwwAuthenticate(wwwAuthenticate ?? "");
    const bearer = challenges.find((c) => c.scheme === "bearer" && c.params.realm);
    const creds = await this.getCredentials();
    if (bearer) {
      const realm = bearer.params.realm!;
      const service = bearer.params.service ?? "";
      // A push asks for pull,push up front (as docker does), whatever one request was challenged for.
      const wanted = ownScope ? scope : (bearer.params.scope ?? scope);
      this.bearerParams = { realm, service };
      const key = await this.cacheKey(realm, service, wanted);
      const hit = tokenCache.get(key);
      if (hit && hit.header === sent) tokenCache.delete(key);
      else if (hit && hit.expiresAt > Date.now()) return hit.header;
      if (creds?.registryToken) {
        this.usedCredentials = creds;
        return `Bearer ${creds.registryToken}`;
      }
      const token = await this.fetchToken(realm, service, wanted, creds);
      tokenCache.set(key, token);
      return token.header === sent ? undefined : token.header;
    }
    if (challenges.some((c) => c.scheme === "basic")) {
      if (!creds || creds.password === undefined) return undefined;
      const header = `Basic ${Buffer.from(`${creds.username}:${creds.password}`).toString("base64")}`;
      if (header === sent) return undefined;
      this.usedCredentials = creds;
      this.basic = header;
      return header;
    }
    return undefined;
  }

  private async cacheKey(realm: string, service: string, scope: string): Promise<string> {
    const creds = await this.getCredentials();
    const secret = creds?.password ?? creds?.identityToken ?? creds?.registryToken ?? "";
    const who = creds ? `${creds.username}|${createHash("sha256").update(secret).digest("hex").slice(0, 16)}` : "anonymous";
    return JSON.stringify([this.host, realm, service, scope, who]);
  }

  private async fetchToken(realm: string, service: string, scope: string, creds: Credentials | undefined): Promise<CachedToken> {
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw new RegistryError("REGISTRY_TOKEN_ERROR", `registry ${this.host} named an invalid token realm ${JSON.stringify(realm)}`);
    }
    let res: HttpResponse | undefined;
    if (creds?.identityToken) {
      // OAuth2 refresh-token grant (distribution token spec, "OAuth2 Token Authentication").
      const form = new URLSearchParams({ grant_type: "refresh_token", service, client_id: "supermachine", refresh_token: creds.identityToken });
      if (scope) form.set("scope", scope);
      res = await this.transport.send({
        method: "POST",
        url,
        headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body: Buffer.from(form.toString()),
      });
      if (res.status === 404 || res.status === 405) {
        // No OAuth2 endpoint: Docker then sends the identity token as a Basic password.
        res.body.destroy();
        res = undefined;
      }
    }
    if (!res) {
      const u = new URL(url.href);
      if (service) u.searchParams.set("service", service);
      if (scope) u.searchParams.set("scope", scope);
      const headers: Record<string, string> = {};
      const secret = creds?.identityToken ?? creds?.password;
      if (creds && secret !== undefined) {
        if (creds.username) u.searchParams.set("account", creds.username);
        headers.Authorization = `Basic ${Buffer.from(`${creds.username}:${secret}`).toString("base64")}`;
      }
      res = await this.transport.send({ method: "GET", url: u, headers });
    }
    if (creds) this.usedCredentials = creds;
    if (res.status === 401 || res.status === 403) {
      const detail = await errorDetail(res);
      throw new RegistryError(
        "REGISTRY_UNAUTHORIZED",
        `registry ${this.host}: the token server ${url.origin}${url.pathname} refused ${creds ? `the credentials of ${JSON.stringify(creds.username)} from ${creds.source}` : "an anonymous token"} for scope ${JSON.stringify(scope)} (${res.status}${detail.message ? `: ${detail.message}` : ""})`,
        { hint: creds ? `run \`docker login ${this.credOpts.registry}\` again or fix the entry in config.json` : `log in with \`docker login ${this.credOpts.registry}\` (credentials are read from $DOCKER_CONFIG/config.json or ~/.docker/config.json)` },
      );
    }
    if (res.status !== 200) {
      const detail = await errorDetail(res);
      throw new RegistryError("REGISTRY_TOKEN_ERROR", `registry ${this.host}: the token server ${url.origin}${url.pathname} answered ${res.status} ${res.statusText}${detail.message ? `: ${detail.message}` : ""}`);
    }
    let body: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse((await readBody(res, 1024 * 1024, "token response")).toString("utf8"));
      body = isObject(parsed) ? parsed : {};
    } catch (cause) {
      if (cause instanceof RegistryError) throw cause;
      throw new RegistryError("REGISTRY_TOKEN_ERROR", `registry ${this.host}: the token server ${url.origin}${url.pathname} did not answer JSON`, { cause });
    }
    const token = typeof body.token === "string" && body.token ? body.token : typeof body.access_token === "string" ? body.access_token : "";
    if (!token) {
      throw new RegistryError("REGISTRY_TOKEN_ERROR", `registry ${this.host}: the token server ${url.origin}${url.pathname} answered without "token" or "access_token"`);
    }
    const expiresIn = typeof body.expires_in === "number" && body.expires_in > 0 ? body.expires_in : 60;
    // Renew a little early, never keep one for less than the spec's 60-second minimum minus margin.
    const lifetimeMs = Math.max(expiresIn, 60) * 1000 - 10_000;
    log("token for %s scope %s, expires in %ds", this.host, scope, expiresIn);
    return { header: `Bearer ${token}`, expiresAt: Date.now() + lifetimeMs };
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
