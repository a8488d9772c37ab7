// vm.spawn on real microVMs: pull-style reads, Node streams, stdin, signals, terminals, and
// end-to-end flow control (output nobody reads stops the process in the guest).
import { createHash } from "node:crypto";
import { Readable, Writable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { describe, expect, it } from "vitest";
import type { ExecChild } from "../../src/index.js";
import { useBusyboxVm } from "../helpers/vm.js";

const env = useBusyboxVm({ min: 1, max: 2 });

async function readAll(read: (n?: number) => Promise<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (;;) {
    const b = await read();
    if (b.length === 0) return Buffer.concat(parts);
    parts.push(b);
  }
}

/** Guest state letter of a process (R running, S sleeping, ...). */
async function guestState(pid: number): Promise<string> {
  const stat = (await env.vm.readFile(`/proc/${pid}/stat`)).toString();
  return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
}

describe("vm.spawn", () => {
  it("streams output pull-style and reports how the process ended", async () => {
    const child = await env.vm.spawn({ argv: ["sh", "-c", "echo one; sleep 0.2; echo two; echo err >&2; exit 5"] });
    expect(child.pid).toBeGreaterThan(1);
    const first = await child.readStdout();
    expect(first.toString()).toBe("one\n");
    const rest = await readAll((n) => child.readStdout(n));
    expect(rest.toString()).toBe("two\n");
    expect((await readAll((n) => child.readStderr(n))).toString()).toBe("err\n");
    const w = await child.wait();
    expect(w).toMatchObject({ exitCode: 5, timedOut: false, signal: null });
    expect(w.peakRssKib).toBeGreaterThan(0);
    // EOF stays EOF.
    expect((await child.readStdout()).length).toBe(0);
  });

  it("respects maxBytes in pull reads", async () => {
    const child = await env.vm.spawn({ argv: ["sh", "-c", "printf abcdefghij"] });
    await child.wait();
    expect((await child.readStdout(3)).toString()).toBe("abc");
    expect((await child.readStdout(100)).toString()).toBe("defghij");
    expect((await child.readStdout()).length).toBe(0);
    await expect(child.readStdout(0)).rejects.toMatchObject({ code: "EXEC_READ_SIZE" });
  });

  it("pipes stdout and stderr as Node streams, and for-await works", async () => {
    const child = await env.vm.spawn({ argv: ["sh", "-c", "seq 1 20000; echo done >&2"] });
    const got: Buffer[] = [];
    const sink = new Writable({
      write(c: Buffer, _e, cb) {
        got.push(c);
        cb();
      },
    });
    const errs: string[] = [];
    const errDone = (async () => {
      for await (const c of child.stderr) errs.push(String(c));
    })();
    await pipeline(child.stdout, sink);
    await errDone;
    const expected = Array.from({ length: 20000 }, (_, i) => `${i + 1}\n`).join("");
    expect(Buffer.concat(got).toString()).toBe(expected);
    expect(errs.join("")).toBe("done\n");
    expect((await child.wait()).exitCode).toBe(0);
    // One consumer per output: pull reads are refused once the stream took over.
    await expect(child.readStdout()).rejects.toMatchObject({ code: "EXEC_STREAM_IN_USE" });
  });

  it("feeds stdin with writeStdin/closeStdin and through the Writable", async () => {
    const a = await env.vm.spawn({ argv: ["sha256sum"] });
    const data = Buffer.alloc(3 * 1024 * 1024 + 17, 7);
    await a.writeStdin(data);
    await a.closeStdin();
    const out = (await readAll((n) => a.readStdout(n))).toString();
    expect(out.split(" ")[0]).toBe(createHash("sha256").update(data).digest("hex"));
    expect((await a.wait()).exitCode).toBe(0);
    await expect(a.writeStdin("late")).rejects.toMatchObject({ code: "EXEC_STDIN_CLOSED" });

    const b = await env.vm.spawn({ argv: ["wc", "-c"] });
    await pipeline(Readable.from([Buffer.from("hello "), Buffer.from("world")]), b.stdin);
    expect((await readAll((n) => b.readStdout(n))).toString().trim()).toBe("11");
  });

  it("signals the process; a signal after exit is an error", async () => {
    const child = await env.vm.spawn({ argv: ["sleep", "30"] });
    await child.signal("SIGTERM");
    expect(await child.wait()).toMatchObject({ exitCode: -1, signal: "SIGTERM", timedOut: false });
    await expect(child.signal(15)).rejects.toMatchObject({ code: "EXEC_ALREADY_EXITED" });
    await expect(child.signal(99)).rejects.toMatchObject({ code: "OPTION_INVALID" });
  });

  it("kills it at timeoutMs and reports timedOut", async () => {
    const child = await env.vm.spawn({ argv: ["sleep", "30"], timeoutMs: 500 });
    expect(await child.wait()).toMatchObject({ exitCode: -1, timedOut: true, signal: "SIGKILL" });
  });

  it("a missing command gives 127 and a message, as exec does", async () => {
    const child = await env.vm.spawn({ argv: ["no-such-program-here"] });
    expect((await readAll((n) => child.readStderr(n))).toString()).toContain("no-such-program-here");
    expect((await child.wait()).exitCode).toBe(127);
  });

  it("cancels with an AbortSignal: the process is killed and wait() rejects with the reason", async () => {
    const ac = new AbortController();
    const child = await env.vm.spawn({ argv: ["sh", "-c", "echo $$ > /tmp/spawned.pid; exec sleep 30"], signal: ac.signal });
    const pid = child.pid!;
    ac.abort(new Error("enough"));
    await expect(child.wait()).rejects.toThrow("enough");
    const check = await env.vm.exec({ argv: ["sh", "-c", `sleep 0.2; kill -0 ${pid} 2>/dev/null && echo alive || echo gone`] });
    expect(check.stdout.toString()).toBe("gone\n");
  });

  it("pauses a guest that writes faster than the host reads (bounded host memory)", async () => {
    const child: ExecChild = await env.vm.spawn({ argv: ["yes", "flood"] });
    await new Promise((r) => setTimeout(r, 1_500));
    // Nothing read: yes is blocked on its full pipe, not spinning.
    expect(await guestState(child.pid!)).toBe("S");
    const buffered = (child as unknown as { out: { buffered: number } }).out.buffered;
    expect(buffered).toBeLessThanOrEqual(256 * 1024);
    // Reading makes it run again, and the data is intact.
    const chunk = await child.readStdout(65536);
    expect(chunk.toString().startsWith("flood\n")).toBe(true);
    let total = chunk.length;
    while (total < 4 * 1024 * 1024) total += (await child.readStdout(1 << 20)).length;
    await child.signal(9);
    child.stdout.resume();
    expect((await child.wait()).signal).toBe("SIGKILL");
  });
});

describe("vm.spawn with a terminal", () => {
  it("gives a pty of the asked size; resize changes what stty prints", async () => {
    const child = await env.vm.spawn({ argv: ["sh", "-c", "tty; stty size; read x; stty size; echo err >&2"], tty: true, winsize: { cols: 100, rows: 30 } });
    let seen = "";
    while (!/30 100\r\n/.test(seen)) seen += (await child.readStdout()).toString();
    expect(seen).toMatch(/^\/dev\/pts\/\d+\r\n30 100\r\n$/);
    await child.resize(132, 50);
    await child.writeStdin("go\n");
    const rest = (await readAll((n) => child.readStdout(n))).toString();
    // The typed line is echoed by the terminal, then the new size, then stderr (merged).
    expect(rest).toBe("go\r\n50 132\r\nerr\r\n");
    expect((await readAll((n) => child.readStderr(n))).length).toBe(0);
    expect((await child.wait()).exitCode).toBe(0);
    // After exit, resize is a no-op.
    await child.resize(80, 24);
  });

  it("closeStdin sends end-of-file on a terminal", async () => {
    const child = await env.vm.spawn({ argv: ["cat"], tty: true });
    await child.writeStdin("abc\n");
    await child.closeStdin();
    const out = (await readAll((n) => child.readStdout(n))).toString();
    expect(out).toBe("abc\r\nabc\r\n");
    expect((await child.wait()).exitCode).toBe(0);
  });

  it("resize is a no-op without a terminal", async () => {
    const child = await env.vm.spawn({ argv: ["sh", "-c", "read x; stty size 2>&1; true"] });
    await child.resize(10, 10);
    await child.writeStdin("x\n");
    await child.closeStdin();
    expect((await child.wait()).exitCode).toBe(0);
  });
});
