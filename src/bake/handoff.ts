/**
 * Warm handoff: the baked VM goes on running, for the first VM a pool of this image needs.
 * Its RAM lives in the snapshot's RAM file, which it would keep writing to; so the paused VM
 * keeps that file (renamed away, then unlinked: its mapping stays) and the snapshot gets a
 * sparse copy made while the VM cannot change it. The resumed VM then gets a HELLO of its own:
 * the host's clock, fresh entropy and a new VM id, as every restored VM does. Failing that, no
 * handoff.
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { open, rename, rm } from "node:fs/promises";
import type { MicroVm } from "../engine/qemu.js";
import { logger } from "../debug.js";
import { CHUNK_SIZE, isZeroChunk } from "../store/chunks.js";
import type { RamSums } from "../store/ram-sums.js";

const log = logger("bake");

export async function detachForHandoff(vm: MicroVm, ram: string): Promise<{ vm: MicroVm; sums: RamSums } | undefined> {
  const live = `${ram}.live`;
  try {
    await rename(ram, live);
    // The copy reads every byte anyway: the RAM checksums come with it.
    const sums = await sparseCopy(live, ram, { sums: true });
    await rm(live, { force: true });
    await vm.resume();
    await vm.renewIdentity(10_000);
    return { vm, sums };
  } catch (err) {
    log("no warm handoff: %s", (err as Error).message);
    if (existsSync(live)) {
      await rm(ram, { force: true });
      await rename(live, ram);
    }
    return undefined;
  }
}

/**
 * Copies `from` to `to`, leaving holes where `from` has all-zero blocks. With `sums`, also
 * returns the copy's RAM checksums (store/ram-sums.ts), computed from the bytes it copied.
 */
export async function sparseCopy(from: string, to: string): Promise<void>;
export async function sparseCopy(from: string, to: string, opts: { sums: true }): Promise<RamSums>;
export async function sparseCopy(from: string, to: string, opts: { sums?: boolean } = {}): Promise<RamSums | void> {
  const block = ZERO_BLOCK.length;
  const src = await open(from, "r");
  const dst = await open(to, "wx");
  const chunks = new Map<number, Buffer>();
  try {
    const size = (await src.stat()).size;
    const buf = Buffer.allocUnsafe(block);
    for (let off = 0; off < size; off += block) {
      const want = Math.min(block, size - off);
      let got = 0;
      while (got < want) {
        const { bytesRead } = await src.read(buf, got, want - got, off + got);
        if (bytesRead === 0) throw new Error(`${from} ended at ${off + got} bytes, expected ${size}`);
        got += bytesRead;
      }
      const chunk = buf.subarray(0, want);
      if (isZero(chunk)) continue;
      await dst.write(chunk, 0, want, off);
      if (opts.sums) {
        for (let o = 0; o < want; o += CHUNK_SIZE) {
          const piece = chunk.subarray(o, Math.min(o + CHUNK_SIZE, want));
          if (!isZeroChunk(piece)) chunks.set((off + o) / CHUNK_SIZE, createHash("sha256").update(piece).digest());
        }
      }
    }
    await dst.truncate(size);
    if (opts.sums) return { chunkSize: CHUNK_SIZE, size, chunks };
  } finally {
    await src.close();
    await dst.close();
  }
}

const ZERO_BLOCK = Buffer.alloc(1 << 20);
/** memcmp against a zero block: far cheaper than a loop in JavaScript. */
function isZero(b: Buffer): boolean {
  return b.length === ZERO_BLOCK.length ? b.equals(ZERO_BLOCK) : b.equals(ZERO_BLOCK.subarray(0, b.length));
}
