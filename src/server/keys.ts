/**
 * API keys of `supermachine serve`. A key is `e2b_` and 32 hex digits (128 random bits): the E2B
 * SDKs check that shape client-side in some versions, and the native client does not care. Only
 * a key's sha256 is stored, in a JSON file (0600, written atomically under the store's lock), with
 * a name, an optional limit of sandboxes alive at once, and a revocation time. A running server
 * reads the file again when it changes, so `supermachine keys revoke` takes effect at once.
 */
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { mkdirSync, readFileSync, renameSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { z } from "zod";
import { supermachineHome } from "../paths.js";
import { acquireLock } from "../store/lock.js";
import { fsyncPath, writeFileSynced } from "../store/durable.js";
import { PRIVATE_DIR_MODE } from "../private.js";
import { ServerError } from "./errors.js";

export const KEY_PATTERN = /^e2b_[0-9a-f]{32}$/;

const keyRecord = z.object({
  id: z.string().regex(/^[0-9a-f]{8}$/),
  name: z.string(),
  /** `sha256:<hex>` of the whole key. */
  hash: z.string().regex(/^sha256:[0-9a-f]{64}$/),
  /** The key's first characters, to tell keys apart in listings. */
  prefix: z.string(),
  maxSandboxes: z.number().int().positive().optional(),
  createdAt: z.string(),
  revokedAt: z.string().optional(),
});
const keyFile = z.object({ version: z.literal(1), keys: z.array(keyRecord) });

export type KeyRecord = z.infer<typeof keyRecord>;

/** Where keys live unless `--keys` names a file. */
export const defaultKeysPath = (): string => join(supermachineHome(), "server", "keys.json");

const hashOf = (key: string): string => `sha256:${createHash("sha256").update(key).digest("hex")}`;

export class KeyStore {
  private cache: { mtimeMs: number; size: number; keys: KeyRecord[] } | undefined;

  constructor(readonly path: string = defaultKeysPath()) {}

  /** Every key, revoked ones included (none when the file does not exist yet). */
  list(): KeyRecord[] {
    let st;
    try {
      st = statSync(this.path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw err;
    }
    if (this.cache && this.cache.mtimeMs === st.mtimeMs && this.cache.size === st.size) return this.cache.keys;
    let parsed;
    try {
      parsed = keyFile.safeParse(JSON.parse(readFileSync(this.path, "utf8")));
    } catch (err) {
      throw new ServerError("SERVER_KEYS_INVALID", `the key file ${this.path} is not JSON: ${(err as Error).message}`, {
        hint: "restore it from a backup, or move it away and create new keys with `supermachine keys create`",
      });
    }
    if (!parsed.success) {
      throw new ServerError("SERVER_KEYS_INVALID", `the key file ${this.path} is not a supermachine key file: ${parsed.error.issues[0]?.message ?? "invalid"}`, {
        hint: "restore it from a backup, or move it away and create new keys with `supermachine keys create`",
      });
    }
    this.cache = { mtimeMs: st.mtimeMs, size: st.size, keys: parsed.data.keys };
    return parsed.data.keys;
  }

  /** The live key `key` is, or undefined (unknown, revoked, or not a key at all). */
  verify(key: string | undefined): KeyRecord | undefined {
    if (!key || !KEY_PATTERN.test(key)) return undefined;
    const want = Buffer.from(hashOf(key));
    return this.list().find((k) => k.revokedAt === undefined && k.hash.length === want.length && timingSafeEqual(Buffer.from(k.hash), want));
  }

  /** Makes a key; the secret is returned once and never stored. */
  async create(options: { name?: string; maxSandboxes?: number } = {}): Promise<{ key: string; record: KeyRecord }> {
    if (options.maxSandboxes !== undefined && !(Number.isInteger(options.maxSandboxes) && options.maxSandboxes > 0)) {
      throw new ServerError("SERVER_BAD_REQUEST", `--max-sandboxes must be a positive integer, not ${options.maxSandboxes}`, { hint: "for example --max-sandboxes 20" });
    }
    const key = `e2b_${randomBytes(16).toString("hex")}`;
    const record: KeyRecord = {
      id: randomBytes(4).toString("hex"),
      name: options.name ?? "default",
      hash: hashOf(key),
      prefix: key.slice(0, 8),
      ...(options.maxSandboxes !== undefined ? { maxSandboxes: options.maxSandboxes } : {}),
      createdAt: new Date().toISOString(),
    };
    await this.update((keys) => [...keys, record]);
    return { key, record };
  }

  /** Revokes the key with this id, name or prefix; rejects when none or several match. */
  async revoke(which: string): Promise<KeyRecord> {
    let revoked: KeyRecord | undefined;
    await this.update((keys) => {
      const live = keys.filter((k) => k.revokedAt === undefined && (k.id === which || k.name === which || k.prefix === which));
      if (live.length !== 1) {
        throw new ServerError("SERVER_KEY_UNKNOWN", live.length === 0 ? `no live key has the id, name or prefix ${JSON.stringify(which)} in ${this.path}` : `${live.length} keys match ${JSON.stringify(which)}`, {
          hint: "`supermachine keys list` shows each key's id; revoke by id",
        });
      }
      revoked = { ...live[0]!, revokedAt: new Date().toISOString() };
      return keys.map((k) => (k === live[0] ? revoked! : k));
    });
    return revoked!;
  }

  private async update(change: (keys: KeyRecord[]) => KeyRecord[]): Promise<void> {
    mkdirSync(dirname(this.path), { recursive: true, mode: PRIVATE_DIR_MODE });
    const lock = await acquireLock(`${this.path}.lock`, { what: `the key file ${this.path}` });
    try {
      this.cache = undefined;
      const next = change(this.list());
      const tmp = `${this.path}.tmp-${process.pid}`;
      await writeFileSynced(tmp, `${JSON.stringify({ version: 1, keys: next }, null, 2)}\n`);
      renameSync(tmp, this.path);
      await fsyncPath(dirname(this.path));
    } finally {
      await lock.release();
    }
  }
}
