/**
 * Warm handoff: the baked VM goes on running, for the first VM a pool of this image needs.
 * Its RAM lives in the snapshot's RAM file, which it would keep writing to; so the paused VM
 * keeps that file (renamed away, then unlinked: its mapping stays) and the snapshot gets a
 * sparse copy made while the VM cannot change it. The resumed VM then gets a HELLO of its own:
 * the host's clock, fresh entropy and a new VM id, as every restored VM does. Failing that, no
 * handoff.
 */
import { existsSync } from "node:fs";
import { open, rename, rm } from "node:fs/promises";
import type { MicroVm } from "../engine/qemu.js";
import { logger } from "../log.js";

const log = logger("bake");

export async function detachForHandoff(vm: MicroVm, ram: string): Promise<MicroVm | undefined> {
  const live = `${ram}.live`;
  try {
    await rename(ram, live);
    await sparseCopy(live, ram);
    await rm(live, { force: true });
    await vm.resume();
    await vm.renewIdentity(10_000);
    return vm;
  } catch (err) {
    log("no warm handoff: %s", (err as Error).message);
    if (existsSync(live)) {
      await rm(ram, { force: true });
      await rename(live, ram);
    }
    return undefined;
  }
}

/** Copies `from` to `to`, leaving holes where `from` has all-zero blocks. */
export async function sparseCopy(from: string, to: string): Promise<void> {
  const block = ZERO_BLOCK.length;
  const src = await open(from, "r");
  const dst = await open(to, "wx");
  try {
    const size = (await src.stat()).size;
    const buf = Buffer.allocUnsafe(block);
    for (let off = 0; off < size; off += block) {
      const { bytesRead } = await src.read(buf, 0, Math.min(block, size - off), off);
      const chunk = buf.subarray(0, bytesRead);
      if (!isZero(chunk)) await dst.write(chunk, 0, bytesRead, off);
    }
    await dst.truncate(size);
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
