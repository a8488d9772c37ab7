/**
 * The file system calls of a guest session — stat, readDir, makeDir, rename, remove, watchDir —
 * and the mapping of the agent's file errors to GuestFileError that every file call shares.
 * The agent does the work itself (FS_* of native/agent/PROTOCOL.md): no program of the image is
 * run. `GuestSession` (./session.ts) extends this class and supplies the hooks it declares.
 */
import { constants as osConstants } from "node:os";
import { z } from "zod";
import { AgentStreamError, type DirEvent, type DirWatcher } from "../agent/client.js";
import { callScope, type CallScope } from "../deadline.js";
import type { MicroVm } from "../engine/qemu.js";
import { AgentError, GuestFileError, SupermachineError, type AgentStreamErrorName, type ErrnoName, type GuestFileErrorCode } from "../errors.js";
import { guestDir, guestPath } from "../schema/fields.js";
import {
  CALL_DEFAULT_TIMEOUT_MS,
  makeDirSchema,
  readDirSchema,
  removeSchema,
  statSchema,
  watchDirSchema,
  callSchema,
  type CallOptions,
  type DirWatch,
  type FileInfo,
  type MakeDirOptions,
  type ReadDirOptions,
  type RemoveOptions,
  type StatOptions,
  type WatchDirOptions,
} from "../schema/calls.js";
import { parseOptions } from "../schema/parse.js";

/** Something in flight that must stop when the session closes. */
export interface Abandonable {
  abandon(err: Error): void;
}

const errnoNames = new Map(Object.entries(osConstants.errno).map(([name, n]) => [n, name as ErrnoName]));

export abstract class GuestFs {
  /** @internal */
  abstract readonly machine: MicroVm;
  /** @internal Throws if the session cannot take calls. */
  protected abstract usable(what: string): void;
  /** @internal Runs `op` under `scope`: an abort or the deadline abandons it; returns the release. */
  protected abstract track(op: Abandonable, scope: CallScope | AbortSignal | undefined): () => void;
  /** @internal A failure as the caller should see it (the VM's death rather than the channel's). */
  protected abstract explain(e: unknown, what: string): Error;

  /** @internal Maps an agent's file error to a GuestFileError with an errno-style code. */
  protected fileError(what: string, path: string, e: unknown, hint?: string): Error {
    if (e instanceof SupermachineError && !(e instanceof AgentError)) return this.explain(e, what);
    if (e instanceof AgentStreamError) {
      const byCode: Partial<Record<AgentStreamErrorName, GuestFileErrorCode>> = { NOT_FOUND: "ENOENT", TOO_LARGE: "FILE_TOO_LARGE", BAD_REQUEST: "EINVAL", IO: "EIO" };
      const code = (e.errno !== undefined ? errnoNames.get(e.errno) : undefined) ?? byCode[e.agentCode] ?? "EIO";
      hint ??=
        code === "ENOENT"
          ? "check the path (vm.readDir(dir) shows what is there)"
          : code === "FILE_TOO_LARGE"
            ? "raise maxBytes, or use vm.readFileStream / vm.writeFileStream for large files"
            : undefined;
      return new GuestFileError(code, `${what}: guest path ${path}: ${e.message.replace(/^[^:]*: /, "")}`, path, e.errno, { cause: e, ...(hint ? { hint } : {}) });
    }
    if (e instanceof AgentError && e.code === "AGENT_TOO_LARGE") {
      return new GuestFileError("FILE_TOO_LARGE", `${what}: guest path ${path}: ${e.message}`, path, undefined, {
        cause: e,
        hint: "raise maxBytes, or use vm.readFileStream for large files",
      });
    }
    return this.explain(e, what);
  }

  /** Runs one FS request under the call's deadline and signal, mapping its errors. */
  private async fsCall<T>(what: string, path: string, o: CallOptions, run: () => Promise<T>): Promise<T> {
    const scope = callScope(`${what} ${path}`, o.timeoutMs, o.signal);
    try {
      return await scope.race(run());
    } catch (e) {
      throw this.fileError(what, path, e);
    } finally {
      scope.done();
    }
  }

  /**
   * A guest path's metadata. A symlink is reported as a symlink (with `symlinkTarget`) unless
   * `follow`. A missing path rejects with GuestFileError ENOENT.
   *
   * @example
   * const { type, size, mode } = await vm.stat("/etc/hostname");
   */
  async stat(path: string, options: StatOptions = {}): Promise<FileInfo> {
    this.usable("vm.stat");
    const p = parseOptions("vm.stat", z.object({ path: guestDir }), { path }).path;
    const o = parseOptions("vm.stat", statSchema, options);
    return this.fsCall("vm.stat", p, o, () => this.machine.agent.stat(p, o.follow));
  }

  /**
   * The entries of a guest directory (`depth` 1: its own; 2: theirs too; …), depth first, each
   * directory's entries by name. Symlinks are listed, never followed. At most 100 000 entries
   * (more rejects with FILE_TOO_LARGE).
   *
   * @example
   * const names = (await vm.readDir("/srv/app")).map((e) => e.name);
   */
  async readDir(path: string, options: ReadDirOptions = {}): Promise<FileInfo[]> {
    this.usable("vm.readDir");
    const p = parseOptions("vm.readDir", z.object({ path: guestDir }), { path }).path;
    const o = parseOptions("vm.readDir", readDirSchema, options);
    const scope = callScope(`vm.readDir ${p}`, o.timeoutMs, o.signal);
    const lister = this.machine.agent.list(p, o.depth);
    const untrack = this.track(lister, scope);
    try {
      return await lister.done;
    } catch (e) {
      const tooMany = e instanceof AgentStreamError && e.agentCode === "TOO_LARGE";
      throw this.fileError("vm.readDir", p, e, tooMany ? "list fewer levels (a smaller depth) or a subdirectory" : undefined);
    } finally {
      untrack();
      scope.done();
    }
  }

  /**
   * Makes a guest directory; resolves with whether it created it. With `parents`, missing
   * parents are made too and an existing directory is no error (without: EEXIST). Every
   * directory it makes gets `mode` (default 0o755) and `uid`/`gid` (default root).
   */
  async makeDir(path: string, options: MakeDirOptions = {}): Promise<boolean> {
    this.usable("vm.makeDir");
    const p = parseOptions("vm.makeDir", z.object({ path: guestPath }), { path }).path;
    const o = parseOptions("vm.makeDir", makeDirSchema, options);
    return this.fsCall("vm.makeDir", p, o, () => this.machine.agent.mkdir(p, o));
  }

  /** Renames (moves) a guest path, as rename(2): within one file system (else EXDEV). */
  async rename(from: string, to: string, options: CallOptions = {}): Promise<void> {
    this.usable("vm.rename");
    const paths = parseOptions("vm.rename", z.object({ from: guestPath, to: guestPath }), { from, to });
    const o = parseOptions("vm.rename", callSchema, options);
    return this.fsCall("vm.rename", paths.from, o, () => this.machine.agent.rename(paths.from, paths.to));
  }

  /**
   * Removes a guest file, symlink or empty directory; with `recursive`, a directory and all in
   * it (never following a symlink out of it). A non-empty directory without it rejects with
   * ENOTEMPTY, a missing path with ENOENT.
   */
  async remove(path: string, options: RemoveOptions = {}): Promise<void> {
    this.usable("vm.remove");
    const p = parseOptions("vm.remove", z.object({ path: guestPath }), { path }).path;
    const o = parseOptions("vm.remove", removeSchema, options);
    return this.fsCall("vm.remove", p, o, () => this.machine.agent.remove(p, o.recursive));
  }

  /**
   * Watches a guest directory (`recursive`: and every directory below it, those made later
   * included). Resolves once the guest watches it; iterate the result for events. It ends on
   * `close()`, when `signal` aborts, or when the directory is removed; it throws when the VM
   * goes, or with EOVERFLOW when events came faster than they were read.
   *
   * @example
   * const watch = await vm.watchDir("/srv/app", { recursive: true });
   * for await (const { type, name } of watch) console.log(type, name);
   */
  async watchDir(path: string, options: WatchDirOptions = {}): Promise<DirWatch> {
    this.usable("vm.watchDir");
    const p = parseOptions("vm.watchDir", z.object({ path: guestDir }), { path }).path;
    const o = parseOptions("vm.watchDir", watchDirSchema, options);
    const start = callScope(`vm.watchDir ${p}`, CALL_DEFAULT_TIMEOUT_MS, o.signal);
    const watcher = this.machine.agent.watch(p, o.recursive);
    const watch = new GuestDirWatch(watcher, (e) =>
      this.fileError("vm.watchDir", p, e, e instanceof AgentStreamError && e.agentCode === "TOO_LARGE" ? "read events as they come, or watch fewer directories" : undefined),
    );
    const untrackStart = this.track(watcher, start);
    try {
      await watcher.started;
    } catch (e) {
      throw this.fileError("vm.watchDir", p, e);
    } finally {
      untrackStart();
      start.done();
    }
    // From here on it lives until closed: the session's end closes it too.
    const untrack = this.track(watch, undefined);
    void watch.ended.finally(untrack);
    if (o.signal) {
      const onAbort = () => watch.close();
      o.signal.addEventListener("abort", onAbort, { once: true });
      void watch.ended.finally(() => o.signal!.removeEventListener("abort", onAbort));
      if (o.signal.aborted) watch.close();
    }
    return watch;
  }
}

/**
 * A watch as the caller iterates it. Events wait here at most one window's worth (the guest
 * sends no more until credit returns, which happens as they are taken).
 */
class GuestDirWatch implements DirWatch, Abandonable {
  private readonly events: DirEvent[] = [];
  /** Credit for the events held here, returned once they are all taken. */
  private owed = 0;
  private closed = false;
  private over = false;
  private failure: Error | undefined;
  private wake: (() => void) | undefined;
  private endedResolve!: () => void;
  /** Settles when the watch has ended (closed, removed, failed). */
  readonly ended = new Promise<void>((res) => (this.endedResolve = res));

  constructor(
    private readonly watcher: DirWatcher,
    mapError: (e: unknown) => Error,
  ) {
    watcher.onEvents = (events, bytes) => {
      if (events.length === 0) return watcher.consumed(bytes);
      this.events.push(...events);
      this.owed += bytes;
      this.notify();
    };
    watcher.done.then(
      () => this.finish(undefined),
      (e: unknown) => this.finish(this.closed ? undefined : mapError(e)),
    );
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  private finish(err: Error | undefined): void {
    if (this.over) return;
    this.over = true;
    this.failure = err;
    this.endedResolve();
    this.notify();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.abandon(new AgentError("AGENT_STREAM_ENDED", "the watch was closed"));
    this.finish(undefined);
  }

  /** The session ends (VM released or gone): iteration throws `err` once the events are taken. */
  abandon(err: Error): void {
    if (this.over) return;
    this.watcher.abandon(err);
    this.finish(err);
  }

  async *[Symbol.asyncIterator](): AsyncIterator<DirEvent> {
    try {
      for (;;) {
        const e = this.events.shift();
        if (e) {
          if (this.events.length === 0 && this.owed > 0) {
            this.watcher.consumed(this.owed);
            this.owed = 0;
          }
          yield e;
          continue;
        }
        if (this.over) {
          if (this.failure) throw this.failure;
          return;
        }
        await new Promise<void>((res) => (this.wake = res));
      }
    } finally {
      // Leaving the loop early (break, throw) ends the watch.
      this.close();
    }
  }
}
