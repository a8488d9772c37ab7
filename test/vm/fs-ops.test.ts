// The file system calls on a real microVM, done by the guest agent itself: stat, readDir,
// makeDir, rename, remove, and directory watches (recursive, closed, a second one after).
import { describe, expect, it } from "vitest";
import { GuestFileError, type DirEvent, type DirWatch } from "../../src/index.js";
import { useBusyboxVm } from "../helpers/vm.js";

const env = useBusyboxVm();

async function sh(script: string): Promise<string> {
  const r = await env.vm.exec({ argv: ["sh", "-c", script] });
  expect(r.exitCode, r.stderr.toString()).toBe(0);
  return r.stdout.toString();
}

/** Reads events from `it` until `until` holds for the ones read (or 30 s pass). */
async function readUntil(it: AsyncIterator<DirEvent>, seen: DirEvent[], until: (seen: DirEvent[]) => boolean): Promise<DirEvent[]> {
  const deadline = Date.now() + 30_000;
  while (!until(seen)) {
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`events so far: ${JSON.stringify(seen)}`);
    let timer: NodeJS.Timeout | undefined;
    const r = await Promise.race([it.next(), new Promise<"timeout">((res) => (timer = setTimeout(() => res("timeout"), left)))]);
    clearTimeout(timer);
    if (r === "timeout") continue;
    if (r.done) throw new Error(`the watch ended; events: ${JSON.stringify(seen)}`);
    seen.push(r.value);
  }
  return seen;
}

const has = (type: DirEvent["type"], name: string) => (seen: DirEvent[]) => seen.some((e) => e.type === type && e.name === name);

/** Whether `want` appears in `seen` in this order (other events in between). */
function inOrder(seen: DirEvent[], want: DirEvent[]): boolean {
  let i = 0;
  for (const e of seen) if (i < want.length && e.type === want[i]!.type && e.name === want[i]!.name) i++;
  return i === want.length;
}

describe("vm.stat", () => {
  it("reports files, directories and symlinks (not followed unless asked), and a missing path as ENOENT", async () => {
    await env.vm.writeFile("/fs/stat/a.txt", "hello", { mode: 0o640 });
    await sh("ln -s a.txt /fs/stat/link && chmod 4755 /fs/stat/a.txt && touch -d @1700000000 /fs/stat/a.txt");
    const f = await env.vm.stat("/fs/stat/a.txt");
    expect(f).toEqual({ path: "/fs/stat/a.txt", name: "a.txt", type: "file", size: 5, mode: 0o4755, uid: 0, gid: 0, mtimeMs: 1_700_000_000_000 });
    const d = await env.vm.stat("/fs/stat");
    expect(d).toMatchObject({ type: "directory", name: "stat", mode: 0o755 });
    expect(Math.abs(d.mtimeMs - Date.now())).toBeLessThan(10 * 60_000);
    expect(await env.vm.stat("/fs/stat/link")).toMatchObject({ type: "symlink", symlinkTarget: "a.txt", name: "link" });
    expect(await env.vm.stat("/fs/stat/link", { follow: true })).toMatchObject({ type: "file", size: 5, path: "/fs/stat/link" });
    expect(await env.vm.stat("/")).toMatchObject({ type: "directory", name: "/" });
    expect(await env.vm.stat("/dev/null")).toMatchObject({ type: "other" });
    const e = await env.vm.stat("/fs/stat/missing").catch((x: unknown) => x);
    expect(e).toBeInstanceOf(GuestFileError);
    expect(e).toMatchObject({ code: "ENOENT", errno: 2, path: "/fs/stat/missing" });
  });

  it("refuses bad paths and options before anything reaches the guest", async () => {
    const before = env.vm.machine.agent.openStreams;
    for (const bad of ["relative", "/a/../b", "/a//b", "/a/", ""]) {
      const named = (call: string) => ({ code: "OPTION_INVALID", message: expect.stringContaining(`${call}: path`) });
      await expect(env.vm.stat(bad)).rejects.toMatchObject(named("vm.stat"));
      await expect(env.vm.readDir(bad)).rejects.toMatchObject(named("vm.readDir"));
      await expect(env.vm.makeDir(bad)).rejects.toMatchObject(named("vm.makeDir"));
      await expect(env.vm.remove(bad)).rejects.toMatchObject(named("vm.remove"));
      await expect(env.vm.watchDir(bad)).rejects.toMatchObject(named("vm.watchDir"));
      await expect(env.vm.rename("/ok", bad)).rejects.toMatchObject({ code: "OPTION_INVALID", message: expect.stringContaining("vm.rename: to") });
    }
    // "/" may be looked at, not removed or made.
    await expect(env.vm.remove("/", { recursive: true })).rejects.toMatchObject({ code: "OPTION_INVALID" });
    await expect(env.vm.makeDir("/")).rejects.toMatchObject({ code: "OPTION_INVALID" });
    await expect(env.vm.readDir("/x", { depth: 0 })).rejects.toMatchObject({ code: "OPTION_INVALID", message: expect.stringContaining("depth") });
    await expect(env.vm.makeDir("/x", { mode: 0o10000 })).rejects.toMatchObject({ code: "OPTION_INVALID", message: expect.stringContaining("mode") });
    await expect(env.vm.makeDir("/x", { owner: 1 } as never)).rejects.toMatchObject({ code: "OPTION_UNKNOWN" });
    expect(env.vm.machine.agent.openStreams).toBe(before);
  });
});

describe("vm.readDir", () => {
  it("lists one level or more, depth first by name, without following symlinks", async () => {
    await sh("mkdir -p /fs/tree/b/c /fs/outside && touch /fs/tree/a /fs/tree/b/c/deep /fs/tree/b/e /fs/outside/x && ln -s /fs/outside /fs/tree/z");
    const one = await env.vm.readDir("/fs/tree");
    expect(one.map((e) => [e.path, e.type])).toEqual([
      ["/fs/tree/a", "file"],
      ["/fs/tree/b", "directory"],
      ["/fs/tree/z", "symlink"],
    ]);
    expect(one[2]).toMatchObject({ name: "z", symlinkTarget: "/fs/outside" });
    const two = await env.vm.readDir("/fs/tree", { depth: 2 });
    expect(two.map((e) => e.path)).toEqual(["/fs/tree/a", "/fs/tree/b", "/fs/tree/b/c", "/fs/tree/b/e", "/fs/tree/z"]);
    expect((await env.vm.readDir("/fs/tree", { depth: 5 })).map((e) => e.path)).toContain("/fs/tree/b/c/deep");
    expect((await env.vm.readDir("/")).map((e) => e.name)).toEqual(expect.arrayContaining(["bin", "etc", "fs", "proc"]));
    await expect(env.vm.readDir("/fs/nothing")).rejects.toMatchObject({ code: "ENOENT" });
    await expect(env.vm.readDir("/fs/tree/a")).rejects.toMatchObject({ code: "ENOTDIR" });
  });

  it("lists a directory of thousands of entries (more than one flow-control window)", async () => {
    await sh("mkdir -p /fs/many && cd /fs/many && i=0; while [ $i -lt 3000 ]; do : > file-with-a-longish-name-$i; i=$((i+1)); done");
    const all = await env.vm.readDir("/fs/many");
    expect(all).toHaveLength(3000);
    expect(new Set(all.map((e) => e.name)).size).toBe(3000);
  });
});

describe("vm.makeDir, vm.rename, vm.remove", () => {
  it("makes directories with parents, modes and owners, and reports an existing one", async () => {
    expect(await env.vm.makeDir("/fs/mk")).toBe(true);
    expect(await env.vm.stat("/fs/mk")).toMatchObject({ type: "directory", mode: 0o755, uid: 0 });
    await expect(env.vm.makeDir("/fs/mk")).rejects.toMatchObject({ code: "EEXIST", errno: 17 });
    expect(await env.vm.makeDir("/fs/mk", { parents: true })).toBe(false);
    await expect(env.vm.makeDir("/fs/mk/x/y")).rejects.toMatchObject({ code: "ENOENT" });
    expect(await env.vm.makeDir("/fs/mk/x/y", { parents: true, mode: 0o700, uid: 1000, gid: 1001 })).toBe(true);
    for (const p of ["/fs/mk/x", "/fs/mk/x/y"]) expect(await env.vm.stat(p)).toMatchObject({ mode: 0o700, uid: 1000, gid: 1001 });
    expect(await sh("stat -c '%u:%g %a' /fs/mk/x/y")).toBe("1000:1001 700\n");
    await env.vm.writeFile("/fs/mk/file", "x");
    await expect(env.vm.makeDir("/fs/mk/file", { parents: true })).rejects.toMatchObject({ code: "EEXIST" });
  });

  it("renames, and removes files, empty directories and whole trees without following symlinks", async () => {
    await env.vm.writeFile("/fs/rm/one", "1");
    await env.vm.rename("/fs/rm/one", "/fs/rm/two");
    expect(await sh("ls /fs/rm")).toBe("two\n");
    await expect(env.vm.rename("/fs/rm/one", "/fs/rm/three")).rejects.toMatchObject({ code: "ENOENT", path: "/fs/rm/one" });
    await env.vm.remove("/fs/rm/two");
    await expect(env.vm.stat("/fs/rm/two")).rejects.toMatchObject({ code: "ENOENT" });
    await env.vm.makeDir("/fs/rm/empty");
    await env.vm.remove("/fs/rm/empty");
    await sh("mkdir -p /fs/rm/tree/sub /fs/keep && touch /fs/rm/tree/sub/f /fs/keep/precious && ln -s /fs/keep /fs/rm/tree/sub/out");
    await expect(env.vm.remove("/fs/rm/tree")).rejects.toMatchObject({ code: "ENOTEMPTY", errno: 39 });
    await env.vm.remove("/fs/rm/tree", { recursive: true });
    await expect(env.vm.stat("/fs/rm/tree")).rejects.toMatchObject({ code: "ENOENT" });
    expect(await sh("ls /fs/keep")).toBe("precious\n");
    await expect(env.vm.remove("/fs/rm/tree")).rejects.toMatchObject({ code: "ENOENT" });
  });
});

describe("vm.watchDir", () => {
  it("reports create, write, rename and remove, below it too (a subdirectory made later included)", async () => {
    await env.vm.makeDir("/fs/w/old", { parents: true });
    const watch = await env.vm.watchDir("/fs/w", { recursive: true });
    const it = watch[Symbol.asyncIterator]();
    const seen: DirEvent[] = [];
    await env.vm.writeFile("/fs/w/f", "x");
    await sh("echo more >> /fs/w/f && echo deep > /fs/w/old/g");
    await readUntil(it, seen, has("write", "old/g"));
    await env.vm.makeDir("/fs/w/sub");
    // Watched from its create event on.
    await readUntil(it, seen, has("create", "sub"));
    await env.vm.writeFile("/fs/w/sub/g", "y");
    await env.vm.rename("/fs/w/sub/g", "/fs/w/sub/h");
    await env.vm.remove("/fs/w/sub/h");
    await sh("chmod 600 /fs/w/old/g");
    await readUntil(it, seen, has("chmod", "old/g"));
    expect(
      inOrder(seen, [
        { type: "create", name: "f" },
        { type: "write", name: "f" },
        { type: "create", name: "old/g" },
        { type: "create", name: "sub" },
        { type: "create", name: "sub/g" },
        { type: "rename", name: "sub/g" },
        { type: "create", name: "sub/h" },
        { type: "remove", name: "sub/h" },
        { type: "chmod", name: "old/g" },
      ]),
      JSON.stringify(seen),
    ).toBe(true);
    watch.close();
    expect(await it.next()).toMatchObject({ done: true });
  });

  it("leaves nothing behind when closed: a second watch works, background processes are untouched", async () => {
    const streams = env.vm.machine.agent.openStreams;
    const background = await env.vm.listBackground();
    // The agent's (PID 1's) inotify descriptors: one per open watch.
    const inotifyFds = async () => Number(await sh("ls -l /proc/1/fd | grep -c inotify || true"));
    expect(await inotifyFds()).toBe(0);
    await env.vm.makeDir("/fs/w2", { parents: true });
    const first: DirWatch = await env.vm.watchDir("/fs/w2");
    expect(env.vm.machine.agent.openStreams).toBe(streams + 1);
    const got: DirEvent[] = [];
    const loop = (async () => {
      for await (const e of first) got.push(e);
    })();
    await env.vm.writeFile("/fs/w2/a", "1");
    const t = Date.now();
    while (!got.some((e) => e.name === "a") && Date.now() - t < 30_000) await new Promise((r) => setTimeout(r, 50));
    expect(await inotifyFds()).toBe(1);
    first.close();
    await loop;
    expect(got[0]).toEqual({ type: "create", name: "a" });
    expect(env.vm.machine.agent.openStreams).toBe(streams);

    // Not recursive: a subdirectory's files are not reported.
    const ac = new AbortController();
    const second = await env.vm.watchDir("/fs/w2", { signal: ac.signal });
    const it = second[Symbol.asyncIterator]();
    await env.vm.makeDir("/fs/w2/sub");
    await env.vm.writeFile("/fs/w2/sub/inner", "2");
    await env.vm.writeFile("/fs/w2/b", "3");
    const seen = await readUntil(it, [], has("create", "b"));
    expect(seen.map((e) => e.name)).not.toContain("sub/inner");
    // Aborting its signal ends it like close(), after the events already received.
    ac.abort();
    let left = 0;
    while (!(await it.next()).done) left++;
    expect(left).toBeLessThan(10);
    expect(env.vm.machine.agent.openStreams).toBe(streams);
    // CANCEL went before this exec: the guest has closed both watches by the time it runs.
    expect(await inotifyFds()).toBe(0);
    expect(await env.vm.listBackground()).toEqual(background);
    await expect(env.vm.watchDir("/fs/w2/nothing")).rejects.toMatchObject({ code: "ENOENT" });
    await expect(env.vm.watchDir("/fs/w2/a")).rejects.toMatchObject({ code: "ENOTDIR" });
    expect(env.vm.machine.agent.openStreams).toBe(streams);
  });

  it("ends when the watched directory is removed", async () => {
    await env.vm.makeDir("/fs/gone", { parents: true });
    const watch = await env.vm.watchDir("/fs/gone");
    const got: DirEvent[] = [];
    const done = (async () => {
      for await (const e of watch) got.push(e);
    })();
    await env.vm.writeFile("/fs/gone/f", "x");
    await env.vm.remove("/fs/gone", { recursive: true });
    await done;
    expect(inOrder(got, [{ type: "create", name: "f" }, { type: "remove", name: "f" }]), JSON.stringify(got)).toBe(true);
  });
});
