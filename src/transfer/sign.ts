/**
 * Signed snapshots: an exporter that holds the project's signing key (ed25519, from node:crypto)
 * signs each manifest it writes; an importer accepts only manifests signed by a key its project
 * trusts, unless the project trusts unsigned caches. The signature covers the manifest's stable
 * JSON without the signature itself, so it covers the config and every layer by digest, and
 * through them every byte an import uses (each frame is checked against the sha256 its signed
 * index records). It travels in the manifest (annotation `dev.supermachine.signature`): no extra
 * request, and a directory cache and a registry carry it alike.
 */
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from "node:crypto";
import { readFileSync } from "node:fs";
import { stableJson } from "../schema/key.js";
import { CacheError } from "./errors.js";

export const SIGNATURE_ANNOTATION = "dev.supermachine.signature";
const CONTEXT = "supermachine-snapshot-v2\n";
const PREFIX = "ed25519:";
/** The DER header of an ed25519 SubjectPublicKeyInfo; the raw 32-byte key follows. */
const SPKI_HEADER = Buffer.from("302a300506032b6570032100", "hex");

/** Which caches an import accepts: those signed by one of these public keys, or any (`"unsigned"`). */
export type CacheTrust = "unsigned" | readonly string[];

export interface SigningKey {
  /** `ed25519:<base64 of the 32-byte public key>`: what a project lists in `cache.trust`. */
  publicKey: string;
  /** Short id of the public key (16 hex digits of its sha256), named in messages. */
  id: string;
  key: KeyObject;
}

interface TrustedKey {
  publicKey: string;
  id: string;
  key: KeyObject;
}

const idOf = (raw: Buffer): string => createHash("sha256").update(raw).digest("hex").slice(0, 16);

function rawPublic(key: KeyObject): Buffer {
  const der = createPublicKey(key).export({ type: "spki", format: "der" });
  return der.subarray(SPKI_HEADER.length);
}

/** A new key pair: the private key as PKCS#8 PEM (keep it secret) and the public key to trust. */
export function generateSigningKey(): { privatePem: string; publicKey: string; id: string } {
  const { privateKey } = generateKeyPairSync("ed25519");
  const raw = rawPublic(privateKey);
  return { privatePem: privateKey.export({ type: "pkcs8", format: "pem" }).toString(), publicKey: PREFIX + raw.toString("base64"), id: idOf(raw) };
}

/** A signing key from PEM text, or from the file at `source` holding it. `what` names the source in errors. */
export function readSigningKey(source: string, what: string): SigningKey {
  let pem = source;
  if (!source.includes("-----BEGIN")) {
    try {
      pem = readFileSync(source, "utf8");
    } catch (cause) {
      throw new CacheError("CACHE_KEY_UNUSABLE", `${what}: cannot read the signing key file ${source}: ${(cause as Error).message}`, { cause, hint: "make one with `supermachine cache keygen <file>`" });
    }
  }
  let key: KeyObject;
  try {
    key = createPrivateKey(pem);
  } catch (cause) {
    throw new CacheError("CACHE_KEY_UNUSABLE", `${what} is not a PEM private key`, { cause, hint: "make one with `supermachine cache keygen <file>`" });
  }
  if (key.asymmetricKeyType !== "ed25519") throw new CacheError("CACHE_KEY_UNUSABLE", `${what} is a ${key.asymmetricKeyType} key; cache signing keys are ed25519`, { hint: "make one with `supermachine cache keygen <file>`" });
  const raw = rawPublic(key);
  return { publicKey: PREFIX + raw.toString("base64"), id: idOf(raw), key };
}

/** Parses a trust setting; `what` names where it came from. */
export function parseTrust(trust: CacheTrust, what: string): "unsigned" | TrustedKey[] {
  if (trust === "unsigned") return "unsigned";
  return trust.map((s, i) => {
    const raw = s.startsWith(PREFIX) ? Buffer.from(s.slice(PREFIX.length), "base64") : undefined;
    if (!raw || raw.length !== 32 || PREFIX + raw.toString("base64") !== s) {
      throw new CacheError("CACHE_KEY_UNUSABLE", `${what}[${i}] is ${JSON.stringify(s.slice(0, 80))}, not an ed25519 public key`, { hint: 'list keys as printed by `supermachine cache keygen` ("ed25519:<base64>"), or trust: "unsigned"' });
    }
    return { publicKey: s, id: idOf(raw), key: createPublicKey({ key: Buffer.concat([SPKI_HEADER, raw]), format: "der", type: "spki" }) };
  });
}

/** What is signed: the manifest's stable JSON without its signature. */
function payload(manifest: Record<string, unknown>): Buffer {
  const annotations = { ...(manifest.annotations as Record<string, string> | undefined) };
  delete annotations[SIGNATURE_ANNOTATION];
  return Buffer.from(CONTEXT + stableJson({ ...manifest, annotations }));
}

/** Adds the signature annotation to a manifest about to be written. */
export function signManifest<M extends { annotations: Record<string, string> }>(manifest: M, key: SigningKey): M {
  const sig = sign(null, payload(manifest as unknown as Record<string, unknown>), key.key).toString("base64");
  return { ...manifest, annotations: { ...manifest.annotations, [SIGNATURE_ANNOTATION]: `${PREFIX}${key.id}:${sig}` } };
}

/**
 * Checks a manifest's signature against the trusted keys. Resolves with the id of the key that
 * signed it (undefined for an unsigned manifest accepted under `"unsigned"`); throws
 * CACHE_UNTRUSTED naming the snapshot and why otherwise.
 */
export function checkSignature(bytes: Buffer, trust: "unsigned" | TrustedKey[], what: string): { signedBy: string | undefined } {
  const manifest = JSON.parse(bytes.toString("utf8")) as Record<string, unknown>;
  const ann = (manifest.annotations ?? {}) as Record<string, unknown>;
  const sig = ann[SIGNATURE_ANNOTATION];
  const hint = 'a project accepts snapshots signed by a key in its config\'s cache.trust (supermachine cache keygen makes one; export with it: cache.signingKey or SUPERMACHINE_CACHE_SIGNING_KEY), or any with cache.trust: "unsigned" (see docs/cache.md: what that means)';
  if (sig === undefined) {
    if (trust === "unsigned") return { signedBy: undefined };
    throw new CacheError("CACHE_UNTRUSTED", `${what} is not signed; this project accepts only snapshots signed by ${trust.length ? `its trusted keys (${trust.map((k) => k.id).join(", ")})` : "a trusted key, and trusts none"}`, { hint });
  }
  const m = typeof sig === "string" ? /^ed25519:([0-9a-f]{16}):([A-Za-z0-9+/=]{1,200})$/.exec(sig) : null;
  if (!m) throw new CacheError("CACHE_UNTRUSTED", `${what} has a malformed signature`, { hint });
  const signer = trust === "unsigned" ? undefined : trust.find((k) => k.id === m[1]);
  if (!signer) {
    if (trust === "unsigned") return { signedBy: undefined }; // accepted unsigned: the signature is not relied on
    throw new CacheError("CACHE_UNTRUSTED", `${what} is signed by key ${m[1]}, which this project does not trust (trusted: ${trust.map((k) => k.id).join(", ") || "none"})`, { hint });
  }
  if (!verify(null, payload(manifest), signer.key, Buffer.from(m[2]!, "base64"))) {
    throw new CacheError("CACHE_UNTRUSTED", `${what}: its signature by key ${signer.id} does not match its content (altered after it was signed)`, { hint: "the cache entry was tampered with or damaged: nothing was imported; export it again" });
  }
  return { signedBy: signer.id };
}
