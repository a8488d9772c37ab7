/**
 * What the E2B profile needs to know about a sandbox's guest, looked up once per sandbox: its
 * users (from /etc/passwd: uid, gid, home) and whether it has bash. The SDKs run every command
 * as `/bin/bash -l -c CMD`; an image without bash (busybox, alpine) gets `/bin/sh -c CMD`.
 * Relative paths and `~` resolve against the user's home, as E2B's daemon does.
 */
import { posix } from "node:path";
import { GuestFileError } from "../../errors.js";
import type { Sandbox } from "../sandboxes.js";
import { ServerError } from "../errors.js";

export interface GuestUser {
  /** As the request named it, or the sandbox's default (undefined: the image's, often root). */
  spec: string | undefined;
  name: string;
  uid: number;
  gid: number;
  home: string;
}

interface PasswdEntry {
  name: string;
  uid: number;
  gid: number;
  home: string;
}

function parsePasswd(text: string): PasswdEntry[] {
  const out: PasswdEntry[] = [];
  for (const line of text.split("\n")) {
    const f = line.split(":");
    if (f.length < 6 || !/^\d+$/.test(f[2]!) || !/^\d+$/.test(f[3]!)) continue;
    out.push({ name: f[0]!, uid: Number(f[2]), gid: Number(f[3]), home: f[5] || "/" });
  }
  return out;
}

const passwd = (sb: Sandbox): Promise<PasswdEntry[]> =>
  sb.fact("passwd", async () => parsePasswd((await sb.vm.readFile("/etc/passwd", { maxBytes: 4 << 20 }).catch(() => Buffer.alloc(0))).toString()));

export const groups = (sb: Sandbox): Promise<Map<number, string>> =>
  sb.fact("groups", async () => {
    const text = (await sb.vm.readFile("/etc/group", { maxBytes: 4 << 20 }).catch(() => Buffer.alloc(0))).toString();
    return new Map(text.split("\n").map((l) => l.split(":")).filter((f) => f.length >= 3 && /^\d+$/.test(f[2]!)).map((f) => [Number(f[2]), f[0]!] as const));
  });

export const userNames = async (sb: Sandbox): Promise<Map<number, string>> => new Map((await passwd(sb)).map((e) => [e.uid, e.name] as const));

/** What `path` is in the guest, following symlinks; undefined when nothing is there. */
async function typeOf(sb: Sandbox, path: string): Promise<string | undefined> {
  try {
    return (await sb.vm.stat(path, { follow: true })).type;
  } catch (err) {
    if (err instanceof GuestFileError && (err.code === "ENOENT" || err.code === "ENOTDIR")) return undefined;
    throw err;
  }
}

/** Whether the guest has /bin/bash (the SDKs' shell). */
export const hasBash = (sb: Sandbox): Promise<boolean> => sb.fact("bash", async () => (await typeOf(sb, "/bin/bash")) === "file");

/** Whether `path` is a directory in the guest. */
export const isDirectory = (sb: Sandbox, path: string): Promise<boolean> => sb.fact(`dir:${path}`, async () => (await typeOf(sb, path)) === "directory");

/** The user named by `Authorization: Basic base64("<user>:")`, if any. */
export function userFromHeader(authorization: string | null | undefined): string | undefined {
  const m = authorization?.match(/^Basic\s+([A-Za-z0-9+/=]+)$/i);
  if (!m) return undefined;
  const name = Buffer.from(m[1]!, "base64").toString("utf8").split(":")[0];
  return name || undefined;
}

/** The user a request acts as: the one it names, else the sandbox's default user, else root. */
export async function resolveUser(sb: Sandbox, requested: string | undefined): Promise<GuestUser> {
  const spec = requested ?? sb.vm.processDefaults.user;
  const entries = await passwd(sb);
  const name = spec?.split(":")[0] ?? "root";
  const entry = /^\d+$/.test(name) ? entries.find((e) => e.uid === Number(name)) : entries.find((e) => e.name === name);
  if (!entry) {
    if (name === "root" || name === "0") return { spec, name: "root", uid: 0, gid: 0, home: "/root" };
    throw new ServerError("SERVER_BAD_REQUEST", `user ${JSON.stringify(name)} is not in the sandbox's /etc/passwd`, {
      hint: "name a user the image has (E2B templates have `user` and `root`), or add the user to the image",
    });
  }
  return { spec: spec ?? entry.name, name: entry.name, uid: entry.uid, gid: entry.gid, home: entry.home };
}

/** An E2B path (absolute, relative to the user's home, or `~/...`) as a normalised absolute guest path. */
export function guestPathFor(user: GuestUser, path: string | undefined): string {
  if (path === undefined || path === "") return user.home;
  const p = path === "~" ? user.home : path.startsWith("~/") ? posix.join(user.home, path.slice(2)) : path;
  const abs = posix.resolve(user.home, p);
  if (abs.includes("\0")) throw new ServerError("SERVER_BAD_REQUEST", `path ${JSON.stringify(path)} holds a NUL byte`, { hint: "send the path as text without NUL" });
  return abs;
}
