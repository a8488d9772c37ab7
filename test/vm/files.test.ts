// File transfer on real microVMs: buffered reads and writes with their cap, streams for large
// files, errno-style errors, and bad paths refused before anything reaches the guest.
import { createHash } from "node:crypto";
import { Readable } from "node:stream";
import { describe, expect, it } from "vitest";
import { GuestFileError } from "../../src/index.js";
import { useBusyboxVm } from "../helpers/vm.js";

const env = useBusyboxVm();

const MiB = 1024 * 1024;

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
async function guestSha(path: string): Promise<string> {
  return (await env.vm.exec({ argv: ["sha256sum", path] })).stdout.toString().split(" ")[0]!;
}

describe("vm.writeFile / env.vm.readFile", () => {
  it("moves 4 MiB each way intact, with the mode asked", async () => {
    const data = Buffer.from(Array.from({ length: 4 * MiB }, (_, i) => (i * 31) % 251));
    await env.vm.writeFile("/data/four.bin", data, { mode: 0o600 });
    expect(await guestSha("/data/four.bin")).toBe(sha(data));
    expect((await env.vm.exec({ argv: ["stat", "-c", "%a", "/data/four.bin"] })).stdout.toString()).toBe("600\n");
    expect((await env.vm.readFile("/data/four.bin")).equals(data)).toBe(true);
    await env.vm.writeFile("/data/text", "a string is UTF-8");
    expect((await env.vm.readFile("/data/text")).toString()).toBe("a string is UTF-8");
  });

  it("keeps the 4 MiB cap by default and lets maxBytes raise it", async () => {
    const big = Buffer.alloc(4 * MiB + 1, 1);
    await expect(env.vm.writeFile("/data/big", big)).rejects.toMatchObject({ code: "OPTION_FILE_TOO_LARGE" });
    await env.vm.writeFile("/data/big", big, { maxBytes: 8 * MiB });
    await expect(env.vm.readFile("/data/big")).rejects.toMatchObject({ code: "FILE_TOO_LARGE", path: "/data/big" });
    expect((await env.vm.readFile("/data/big", { maxBytes: 8 * MiB })).length).toBe(4 * MiB + 1);
  });

  it("reports a missing file as ENOENT with the guest path, a directory as EISDIR", async () => {
    const e = await env.vm.readFile("/data/missing").catch((x: unknown) => x);
    expect(e).toBeInstanceOf(GuestFileError);
    expect(e).toMatchObject({ code: "ENOENT", path: "/data/missing", errno: 2 });
    expect((e as Error).message).toContain("/data/missing");
    await expect(env.vm.readFile("/etc")).rejects.toMatchObject({ code: "EISDIR" });
    await expect(env.vm.readFileStream("/nope/nothing")).rejects.toMatchObject({ code: "ENOENT" });
    // A file where a parent directory should be.
    await env.vm.writeFile("/data/plain-file", "x");
    const notDir = await env.vm.writeFile("/data/plain-file/child", "x").catch((x: unknown) => x);
    expect(notDir).toMatchObject({ code: "ENOTDIR" });
  });

  it("refuses bad paths and arguments before anything reaches the guest", async () => {
    const before = env.vm.machine.agent.openStreams;
    for (const bad of ["relative/path", "/a/../b", "/tmp/../etc/x", "/a/./b", "/a//b", "/a/", ""]) {
      const named = { code: "OPTION_INVALID", message: expect.stringContaining(`got ${JSON.stringify(bad)}`) };
      await expect(env.vm.readFile(bad)).rejects.toMatchObject(named);
      await expect(env.vm.writeFile(bad, "x")).rejects.toMatchObject(named);
      await expect(env.vm.readFileStream(bad)).rejects.toMatchObject(named);
      await expect(env.vm.writeFileStream(bad, Readable.from([Buffer.from("x")]))).rejects.toMatchObject(named);
    }
    await expect(env.vm.writeFile("/ok", 42 as unknown as Buffer)).rejects.toMatchObject({ code: "OPTION_INVALID" });
    await expect(env.vm.readFile("/ok", { maxBytes: -1 })).rejects.toMatchObject({ code: "OPTION_INVALID" });
    await expect(env.vm.readFile("/ok", { bogus: 1 } as never)).rejects.toMatchObject({ code: "OPTION_UNKNOWN" });
    expect(env.vm.machine.agent.openStreams).toBe(before);
  });

  it("honours an AbortSignal", async () => {
    const ac = new AbortController();
    ac.abort(new Error("not now"));
    await expect(env.vm.readFile("/etc/passwd", { signal: ac.signal })).rejects.toThrow("not now");
  });
});

describe("vm.readFileStream / env.vm.writeFileStream", () => {
  it("streams a 24 MiB file out of the guest with flow control", async () => {
    await env.vm.exec({ argv: ["sh", "-c", "dd if=/dev/urandom of=/data/rand bs=1M count=24 2>/dev/null"] });
    const want = await guestSha("/data/rand");
    const stream = await env.vm.readFileStream("/data/rand");
    const h = createHash("sha256");
    let n = 0;
    for await (const c of stream) {
      h.update(c as Buffer);
      n += (c as Buffer).length;
    }
    expect(n).toBe(24 * MiB);
    expect(h.digest("hex")).toBe(want);
  });

  it("streams a 24 MiB file into the guest from a Readable", async () => {
    const chunk = Buffer.from(Array.from({ length: MiB }, (_, i) => (i * 7) % 256));
    const h = createHash("sha256");
    const source = Readable.from(
      (function* () {
        for (let i = 0; i < 24; i++) {
          const c = Buffer.from(chunk.map((b) => (b + i) % 256));
          h.update(c);
          yield c;
        }
      })(),
    );
    const written = await env.vm.writeFileStream("/data/up.bin", source, { mode: 0o640 });
    expect(written).toBe(24 * MiB);
    expect(await guestSha("/data/up.bin")).toBe(h.digest("hex"));
    expect((await env.vm.exec({ argv: ["stat", "-c", "%a %s", "/data/up.bin"] })).stdout.toString()).toBe(`640 ${24 * MiB}\n`);
  });

  it("stops a stream when its reader aborts", async () => {
    const ac = new AbortController();
    const stream = await env.vm.readFileStream("/data/rand", { signal: ac.signal });
    const first = (await stream[Symbol.asyncIterator]().next()).value as Buffer;
    expect(first.length).toBeGreaterThan(0);
    ac.abort(new Error("reader gone"));
    await expect(
      (async () => {
        for await (const _ of stream) {
          /* drain */
        }
      })(),
    ).rejects.toThrow("reader gone");
    // The VM is fine afterwards.
    expect((await env.vm.exec({ argv: ["true"] })).exitCode).toBe(0);
  });
});
