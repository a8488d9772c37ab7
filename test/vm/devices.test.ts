// An image whose layer carries device nodes and a fifo, as mmdebstrap, debootstrap and
// `docker import` images do: it builds, boots, and the guest's /dev (a devtmpfs over the image's
// /dev) works.
import { execFileSync } from "node:child_process";
import { Readable } from "node:stream";
import tar from "tar-stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Image, type Pool } from "../../src/index.js";
import { busyboxLayer } from "../helpers/vm.js";
import { removeDir, tempDir, writeLayout } from "../helpers/image.js";

let dir: string;
let snapshotsDir: string;
let pool: Pool | undefined;

/** `base` (a tar) with `extra` entries appended, re-packed as one well-formed archive. */
async function appendEntries(base: Buffer, extra: (Partial<tar.Header> & { name: string })[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on("data", (c) => chunks.push(c as Buffer));
  const done = new Promise<void>((resolve, reject) => pack.on("end", () => resolve()).on("error", reject));
  const entry = (h: Partial<tar.Header> & { name: string }, data?: Buffer) => new Promise<void>((res, rej) => pack.entry(h, data ?? Buffer.alloc(0), (err) => (err ? rej(err) : res())));
  const extract = tar.extract();
  Readable.from([base]).pipe(extract as unknown as NodeJS.WritableStream);
  for await (const e of extract) {
    const parts: Buffer[] = [];
    for await (const c of e) parts.push(c as Buffer);
    await entry(e.header, Buffer.concat(parts));
  }
  for (const h of extra) await entry(h);
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

beforeAll(async () => {
  dir = await tempDir("sm-devices-vm-");
  snapshotsDir = await tempDir("sm-devices-snap-");
  // busybox and the special files in one layer, as a debootstrap tarball has them. The type bits
  // in `mode` keep tar-stream from defaulting it.
  const layer = await appendEntries(busyboxLayer(), [
    { name: "dev/", type: "directory", mode: 0o040755 },
    { name: "dev/console", type: "character-device", mode: 0o020600, devmajor: 5, devminor: 1 },
    { name: "dev/null", type: "character-device", mode: 0o020666, devmajor: 1, devminor: 3 },
    { name: "dev/sda", type: "block-device", mode: 0o060660, devmajor: 8, devminor: 0 },
    { name: "dev/initctl", type: "fifo", mode: 0o010600 },
    { name: "srv/", type: "directory", mode: 0o040755 },
    { name: "srv/fifo", type: "fifo", mode: 0o010644 },
  ]);
  const listing = execFileSync("tar", ["-tvf", "-"], { input: layer, encoding: "utf8" });
  expect(listing).toMatch(/^c.* 5,1 .*dev\/console$/m);
  expect(listing).toMatch(/^b.* 8,0 .*dev\/sda$/m);
  expect(listing).toMatch(/ bin\/busybox$/m);
  await writeLayout(dir, { layers: [{ tar: layer, gzip: true }], config: { Env: ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"] } });
});

afterAll(async () => {
  await pool?.shutdown();
  await removeDir(dir);
  await removeDir(snapshotsDir);
});

describe("an image with device nodes in a VM", () => {
  it("builds and runs; the guest's /dev is its own", async () => {
    const image = await Image.build({ ref: `oci:${dir}`, snapshotsDir });
    pool = await image.pool({ min: 1, max: 1 });
    const vm = await pool.acquire();
    const r = await vm.exec({ argv: ["sh", "-c", "echo ok > /dev/null && ls -l /dev/console && echo done"] });
    expect(r.stderr.toString()).toBe("");
    expect(r.stdout.toString()).toMatch(/^c.* 5,\s*1 .*\/dev\/console\ndone\n$/);
    // The fifo outside /dev comes from the image and works as one.
    const fifo = await vm.exec({ argv: ["sh", "-c", "test -p /srv/fifo && echo fifo || ls -l /srv"] });
    expect(fifo.stdout.toString()).toBe("fifo\n");
    await vm.release();
  });
});
