/**
 * The E2B profile's `filesystem.Filesystem` service on the VM's file calls (the agent's FS_*
 * requests, no program of the image run): Stat, ListDir, MakeDir, Move, Remove, WatchDir (server
 * streaming), and the polling watchers of the synchronous Python SDK (CreateWatcher,
 * GetWatcherEvents, RemoveWatcher). Paths resolve against the user's home as E2B's daemon does;
 * directories a call creates belong to that user. Entries are lstat's (a symlink is a symlink).
 */
import { posix } from "node:path";
import { randomBytes } from "node:crypto";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import type { DirEvent, DirWatch, FileInfo } from "../../schema/calls.js";
import { ServerError } from "../errors.js";
import type { Sandbox } from "../sandboxes.js";
import { EventType, FileType, type EntryInfoSchema, type Filesystem, type WatchDirResponseSchema } from "./gen/filesystem/filesystem_pb.js";
import { connectCall, toConnectError } from "./connect-errors.js";
import { groups, guestPathFor, resolveUser, userFromHeader, userNames, type GuestUser } from "./guest.js";
import type { SandboxOf } from "./envd-process.js";

/** Events a polling watcher keeps between two polls before it gives up (the client is gone). */
const WATCHER_QUEUE_MAX = 10_000;
/** Watchers one sandbox may hold at once. */
const WATCHERS_MAX = 64;

type Entry = MessageInitShape<typeof EntryInfoSchema>;

const TYPES: Record<FileInfo["type"], FileType> = { file: FileType.FILE, directory: FileType.DIRECTORY, symlink: FileType.SYMLINK, other: FileType.UNSPECIFIED };
const EVENTS: Record<DirEvent["type"], EventType> = { create: EventType.CREATE, write: EventType.WRITE, remove: EventType.REMOVE, rename: EventType.RENAME, chmod: EventType.CHMOD };

/** `-rw-r--r--` as Go's FileMode prints it (E2B's daemon is Go): `d` for a directory, `L` for a symlink. */
export function permissionString(type: FileInfo["type"], mode: number): string {
  const kind = type === "directory" ? "d" : type === "symlink" ? "L" : "-";
  const bits = "rwxrwxrwx";
  let out = kind;
  for (let i = 0; i < 9; i++) out += mode & (1 << (8 - i)) ? bits[i] : "-";
  return out;
}

async function entryOf(sb: Sandbox, f: FileInfo): Promise<Entry> {
  const [users, grps] = await Promise.all([userNames(sb), groups(sb)]);
  const ms = Math.floor(f.mtimeMs);
  return {
    name: f.name,
    type: TYPES[f.type],
    path: f.path,
    size: BigInt(f.size),
    mode: f.mode,
    permissions: permissionString(f.type, f.mode),
    owner: users.get(f.uid) ?? String(f.uid),
    group: grps.get(f.gid) ?? String(f.gid),
    modifiedTime: { seconds: BigInt(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1_000_000 + Math.round((f.mtimeMs - ms) * 1_000_000) },
    ...(f.symlinkTarget !== undefined ? { symlinkTarget: f.symlinkTarget } : {}),
  };
}

interface PollingWatcher {
  watch: DirWatch;
  events: DirEvent[];
  failed: Error | undefined;
}

/** Per sandbox: the polling watchers by id. */
const watchers = new WeakMap<Sandbox, Map<string, PollingWatcher>>();

function keepaliveMs(ctx: HandlerContext): number {
  const s = Number(ctx.requestHeader.get("keepalive-ping-interval"));
  return Number.isFinite(s) && s > 0 ? Math.max(1_000, Math.min(s * 1000, 300_000)) : 50_000;
}

export function filesystemService(sandboxOf: SandboxOf): ServiceImpl<typeof Filesystem> {
  const userOf = (sb: Sandbox, ctx: HandlerContext): Promise<GuestUser> => resolveUser(sb, userFromHeader(ctx.requestHeader.get("authorization")));
  const target = async (ctx: HandlerContext, path: string) => {
    const sb = sandboxOf(ctx);
    const user = await userOf(sb, ctx);
    return { sb, user, path: guestPathFor(user, path) };
  };

  return {
    stat(req, ctx) {
      return connectCall(async () => {
        const { sb, path } = await target(ctx, req.path);
        return { entry: await entryOf(sb, await sb.vm.stat(path)) };
      });
    },

    listDir(req, ctx) {
      return connectCall(async () => {
        const { sb, path } = await target(ctx, req.path);
        const entries = await sb.vm.readDir(path, { depth: Math.max(1, req.depth) });
        return { entries: await Promise.all(entries.map((e) => entryOf(sb, e))) };
      });
    },

    makeDir(req, ctx) {
      return connectCall(async () => {
        const { sb, user, path } = await target(ctx, req.path);
        // E2B creates missing parents; an existing directory is AlreadyExists (the SDK returns false).
        try {
          await sb.vm.stat(path);
          throw new ServerError("SERVER_CONFLICT", `${path} already exists`, { hint: "makeDir of an existing directory does nothing" });
        } catch (err) {
          if (!(err instanceof Error && "code" in err && err.code === "ENOENT")) throw err;
        }
        await sb.vm.makeDir(path, { parents: true, uid: user.uid, gid: user.gid });
        return { entry: await entryOf(sb, await sb.vm.stat(path)) };
      });
    },

    move(req, ctx) {
      return connectCall(async () => {
        const { sb, user } = await target(ctx, req.source);
        const from = guestPathFor(user, req.source);
        const to = guestPathFor(user, req.destination);
        const parent = posix.dirname(to);
        await sb.vm.makeDir(parent, { parents: true, uid: user.uid, gid: user.gid });
        await sb.vm.rename(from, to);
        return { entry: await entryOf(sb, await sb.vm.stat(to)) };
      });
    },

    remove(req, ctx) {
      return connectCall(async () => {
        const { sb, path } = await target(ctx, req.path);
        await sb.vm.remove(path, { recursive: true });
        return {};
      });
    },

    async *watchDir(req, ctx): AsyncGenerator<MessageInitShape<typeof WatchDirResponseSchema>> {
      let sb: Sandbox;
      let watch: DirWatch;
      try {
        const t = await target(ctx, req.path);
        sb = t.sb;
        const info = await sb.vm.stat(t.path, { follow: true });
        if (info.type !== "directory") throw new ServerError("SERVER_BAD_REQUEST", `${t.path} is not a directory`, { hint: "watch a directory" });
        watch = await sb.vm.watchDir(t.path, { recursive: req.recursive, signal: ctx.signal });
      } catch (err) {
        throw toConnectError(err);
      }
      yield { event: { case: "start", value: {} } };
      const it = watch[Symbol.asyncIterator]();
      const every = keepaliveMs(ctx);
      try {
        for (;;) {
          let timer: NodeJS.Timeout | undefined;
          const idle = new Promise<"idle">((r) => (timer = setTimeout(() => r("idle"), every)));
          const next = await Promise.race([it.next(), idle]).catch((err: unknown) => {
            throw toConnectError(err);
          });
          clearTimeout(timer);
          if (next === "idle") {
            yield { event: { case: "keepalive", value: {} } };
            continue;
          }
          if (next.done) return;
          yield { event: { case: "filesystem", value: { name: next.value.name, type: EVENTS[next.value.type] } } };
        }
      } finally {
        watch.close();
      }
    },

    createWatcher(req, ctx) {
      return connectCall(async () => {
        const { sb, path } = await target(ctx, req.path);
        const mine = watchers.get(sb) ?? new Map<string, PollingWatcher>();
        watchers.set(sb, mine);
        if (mine.size >= WATCHERS_MAX) throw new ServerError("SERVER_LIMIT", `sandbox ${sb.id} already has ${WATCHERS_MAX} watchers`, { hint: "remove watchers you no longer poll" });
        const watch = await sb.vm.watchDir(path, { recursive: req.recursive });
        const id = randomBytes(8).toString("hex");
        const w: PollingWatcher = { watch, events: [], failed: undefined };
        mine.set(id, w);
        void (async () => {
          try {
            for await (const e of watch) {
              w.events.push(e);
              if (w.events.length > WATCHER_QUEUE_MAX) {
                w.failed = new ServerError("SERVER_LIMIT", `watcher ${id} held ${WATCHER_QUEUE_MAX} events nobody polled`, { hint: "poll GetWatcherEvents more often" });
                watch.close();
                return;
              }
            }
          } catch (err) {
            w.failed = err as Error;
          }
        })();
        return { watcherId: id };
      });
    },

    getWatcherEvents(req, ctx) {
      return connectCall(async () => {
        const w = watchers.get(sandboxOf(ctx))?.get(req.watcherId);
        if (!w) throw new ServerError("SERVER_NOT_FOUND", `no watcher ${JSON.stringify(req.watcherId)} in this sandbox`, { hint: "create one with CreateWatcher" });
        const events = w.events.splice(0);
        if (events.length === 0 && w.failed) throw w.failed;
        return { events: events.map((e) => ({ name: e.name, type: EVENTS[e.type] })) };
      });
    },

    removeWatcher(req, ctx) {
      return connectCall(async () => {
        const mine = watchers.get(sandboxOf(ctx));
        const w = mine?.get(req.watcherId);
        if (!w) throw new ServerError("SERVER_NOT_FOUND", `no watcher ${JSON.stringify(req.watcherId)} in this sandbox`, { hint: "it may have been removed already" });
        w.watch.close();
        mine!.delete(req.watcherId);
        return {};
      });
    },
  };
}
