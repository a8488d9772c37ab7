// Store locks (src/store/lock.ts) across real processes: a lock records its owner, a lock whose
// owner is gone (SIGKILLed, pid reused, host rebooted) is taken over at once, a live owner is
// waited for and named, and under contention only one process holds it at a time. The child
// processes run the built module (dist): `npm run build` first.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdirSync, readFileSync, readlinkSync, utimesSync, writeFileSync } from "node:fs";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { packageRoot } from "../../src/engine/artifacts.js";
import { StoreError } from "../../src/index.js";
import { acquireLock, processStart, type LockWait } from "../../src/store/lock.js";

const LOCK_JS = join(packageRoot(), "dist", "src", "store", "lock.js");

let root: string;
const children: ChildProcess[] = [];
beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), "sm-lock-"));
});
afterEach(async () => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  await rm(root, { recursive: true, force: true });
});

/** Runs `body` (ES module code with `acquireLock` in scope) in a child Node process. */
function child(body: string): ChildProcess {
  const code = `import { acquireLock } from ${JSON.stringify(LOCK_JS)};\n${body}`;
  const c = spawn(process.execPath, ["--input-type=module", "-e", code], { stdio: ["ignore", "pipe", "inherit"] });
  children.push(c);
  return c;
}

/** Resolves once the child printed `line`. */
function printed(c: ChildProcess, line: string, ms = 20_000): Promise<void> {
  return new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`child did not print ${line} within ${ms} ms (got ${JSON.stringify(out)})`)), ms);
    c.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.split("\n").includes(line)) {
        clearTimeout(timer);
        resolve();
      }
    });
    c.once("exit", () => reject(new Error(`child exited before printing ${line} (got ${JSON.stringify(out)})`)));
  });
}

const exited = (c: ChildProcess) => new Promise<void>((r) => (c.exitCode !== null || c.signalCode !== null ? r() : c.once("exit", () => r())));

/** The pid of a process that has exited. */
function deadPid(): number {
  const r = spawnSync("sh", ["-c", "echo $$"], { encoding: "utf8" });
  return Number(r.stdout.trim());
}

const me = () => ({
  boot: readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim(),
  host: hostname(),
  pidns: readlinkSync("/proc/self/ns/pid"),
});

/** Writes an owner record as another process would have. */
function fakeLock(path: string, owner: Partial<{ pid: number; start: string; boot: string; host: string; pidns: string }>, ageMs = 0): void {
  writeFileSync(path, JSON.stringify({ pid: 1, start: "1", ...me(), since: new Date(Date.now() - ageMs).toISOString(), what: "a fake writer", nonce: "00ff00ff00ff00ff", ...owner }));
  const t = new Date(Date.now() - ageMs);
  utimesSync(path, t, t);
}

async function timeToAcquire(lockPath: string, opts: { timeoutMs?: number; onWait?: (w: LockWait) => void } = {}): Promise<number> {
  const t0 = performance.now();
  const lock = await acquireLock(lockPath, { what: "test entry", ...opts });
  const ms = performance.now() - t0;
  await lock.release();
  return ms;
}

describe("store locks", () => {
  it("takes over a lock whose owner was SIGKILLed at once, without waiting", async () => {
    const lockPath = join(root, "e.lock");
    const c = child(`await acquireLock(${JSON.stringify(lockPath)}, { what: "child" }); console.log("held"); setInterval(() => {}, 1000);`);
    await printed(c, "held");
    const owner = JSON.parse(readFileSync(lockPath, "utf8")) as Record<string, unknown>;
    expect(owner).toMatchObject({ pid: c.pid, start: processStart(c.pid!), ...me(), what: "child" });
    c.kill("SIGKILL");
    await exited(c);
    const waits: LockWait[] = [];
    const ms = await timeToAcquire(lockPath, { onWait: (w) => waits.push(w) });
    expect(waits).toEqual([]);
    expect(ms).toBeLessThan(1_000);
    expect(await readdir(root)).toEqual([]); // released, and no break lock left
  });

  it("waits for a live owner, names it, and takes the lock as soon as the owner is gone", async () => {
    const lockPath = join(root, "e.lock");
    const c = child(`await acquireLock(${JSON.stringify(lockPath)}, { what: "child" }); console.log("held"); setInterval(() => {}, 1000);`);
    await printed(c, "held");
    const waits: LockWait[] = [];
    let killedAt = 0;
    const t0 = performance.now();
    const got = acquireLock(lockPath, {
      what: "test entry",
      onWait: (w) => {
        waits.push(w);
        setTimeout(() => {
          killedAt = performance.now();
          c.kill("SIGKILL");
        }, 500);
      },
    });
    const lock = await got;
    const after = performance.now();
    await lock.release();
    expect(waits).toHaveLength(1);
    expect(waits[0]).toMatchObject({ lockPath, what: "test entry", holder: { pid: c.pid, what: "child", host: hostname() } });
    expect(Date.parse(waits[0]!.holder!.since)).toBeLessThanOrEqual(Date.now());
    expect(after - t0).toBeGreaterThanOrEqual(450); // it did wait for the live owner
    expect(after - killedAt).toBeLessThan(1_000); // and took over within a second of its death
  });

  it("judges owners: a reused pid, another boot, another host, an old-style lock, a record cut short", async () => {
    const lockPath = join(root, "e.lock");
    // pid 1 is alive, but started at another time than the record says: the pid was reused.
    fakeLock(lockPath, { pid: 1, start: "999999999" });
    expect(await timeToAcquire(lockPath)).toBeLessThan(1_000);
    // A dead pid.
    fakeLock(lockPath, { pid: deadPid(), start: "5" });
    expect(await timeToAcquire(lockPath)).toBeLessThan(1_000);
    // The owner ran before the host rebooted (another boot id), even though its pid is alive now.
    fakeLock(lockPath, { pid: process.pid, start: processStart(process.pid)!, boot: "00000000-0000-0000-0000-000000000000" });
    expect(await timeToAcquire(lockPath)).toBeLessThan(1_000);
    // A live owner in this pid namespace (our parent): waited for, up to the timeout.
    fakeLock(lockPath, { pid: process.ppid, start: processStart(process.ppid)! });
    await expect(timeToAcquire(lockPath, { timeoutMs: 300 })).rejects.toMatchObject({ code: "STORE_LOCK_TIMEOUT", message: expect.stringContaining(`held by pid ${process.ppid} since`) });
    // Another host: its pid means nothing here; judged by its heartbeat (the file's mtime).
    fakeLock(lockPath, { pid: deadPid(), host: "elsewhere" });
    await expect(timeToAcquire(lockPath, { timeoutMs: 300 })).rejects.toBeInstanceOf(StoreError);
    fakeLock(lockPath, { pid: deadPid(), host: "elsewhere" }, 60_000);
    expect(await timeToAcquire(lockPath)).toBeLessThan(1_000);
    // An old-style lock directory: honoured while refreshed, taken over once 30 s old.
    mkdirSync(lockPath);
    await expect(timeToAcquire(lockPath, { timeoutMs: 300 })).rejects.toMatchObject({ code: "STORE_LOCK_TIMEOUT" });
    const old = new Date(Date.now() - 60_000);
    utimesSync(lockPath, old, old);
    expect(await timeToAcquire(lockPath)).toBeLessThan(1_000);
    // A lock file without a record (its writer died between creating and writing it): a second.
    writeFileSync(lockPath, "");
    const ms = await timeToAcquire(lockPath);
    expect(ms).toBeGreaterThan(500);
    expect(ms).toBeLessThan(3_000);
    expect(await readdir(root)).toEqual([]);
  });

  it("lets one process at a time hold it while processes race for it, some dying while they hold it", async () => {
    const lockPath = join(root, "e.lock");
    const logPath = join(root, "log");
    writeFileSync(logPath, "");
    fakeLock(lockPath, { pid: deadPid(), start: "5" }); // a stale lock to start with: every child races to take it over
    const body = (die: boolean) => `
      import { appendFileSync } from "node:fs";
      for (let i = 0; i < 5; i++) {
        const lock = await acquireLock(${JSON.stringify(lockPath)}, { what: "racer" });
        appendFileSync(${JSON.stringify(logPath)}, "+" + process.pid + "\\n");
        await new Promise((r) => setTimeout(r, 5));
        appendFileSync(${JSON.stringify(logPath)}, "-" + process.pid + "\\n");
        if (${die} && i === 2) process.kill(process.pid, "SIGKILL"); // dies holding the lock
        await lock.release();
      }
      console.log("done");`;
    const racers = [true, false, false, true, false, false].map((die) => child(body(die)));
    const t0 = performance.now();
    await Promise.all(racers.map(exited));
    const elapsed = performance.now() - t0;
    const lines = readFileSync(logPath, "utf8").trim().split("\n");
    // Entries and exits strictly alternate, each exit by the process that entered.
    for (let i = 0; i < lines.length; i += 2) {
      expect(lines[i]!.startsWith("+")).toBe(true);
      expect(lines[i + 1]).toBe(`-${lines[i]!.slice(1)}`);
    }
    expect(lines.length).toBe(2 * (4 * 5 + 2 * 3));
    expect(racers.filter((c) => c.exitCode === 0)).toHaveLength(4);
    expect(elapsed).toBeLessThan(20_000);
    // A racer killed holding the lock may have been the last to hold it: then its lock is left
    // (no .break file, though), and the next process takes it over at once.
    const left = (await readdir(root)).sort();
    expect(["log", "e.lock,log"]).toContain(left.join(","));
    if (left.includes("e.lock")) {
      const holder = (JSON.parse(readFileSync(lockPath, "utf8")) as { pid: number }).pid;
      expect(racers.filter((c) => c.signalCode === "SIGKILL").map((c) => c.pid)).toContain(holder);
    }
    expect(await timeToAcquire(lockPath)).toBeLessThan(1_000);
    expect(await readdir(root)).toEqual(["log"]);
  });
});
