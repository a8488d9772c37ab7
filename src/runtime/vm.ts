/**
 * `Vm`: a VM checked out of a pool. Everything it can do in the guest comes from GuestSession
 * (exec, spawn, files, exposeTcp, workloadSignal, the raw socket paths); this adds the pool's
 * side: release (with `await using`), and capturing the VM as a new image.
 */
import { resolve as resolvePath } from "node:path";
import { z } from "zod";
import { captureRunning } from "../bake/capture.js";
import { callScope } from "../deadline.js";
import type { MicroVm } from "../engine/qemu.js";
import { ExecError, PoolError } from "../errors.js";
import type { ExecDefaults } from "../session/env.js";
import { GuestSession } from "../session/session.js";
import { callSchema, type CallOptions } from "../schema/calls.js";
import { parseOptions } from "../schema/parse.js";
import type { LoadedSnapshot, SnapshotMeta } from "../store/snapshots.js";
import type { Image } from "./image.js";

type ReleaseFn = (vm: Vm) => Promise<void>;

/** @internal
 * The snapshot a VM was restored from, and how a capture of it becomes an Image (given by the
 * image whose pool made the VM, so that this file needs Image only as a type).
 */
export interface VmOrigin {
  meta: SnapshotMeta;
  open(snapshot: LoadedSnapshot): Image;
}

/** Default deadline of vm.snapshot: a full RAM capture plus a helper restore, under TCG. */
const SNAPSHOT_TIMEOUT_MS = 120_000;

export class Vm extends GuestSession {
  private released = false;

  private constructor(
    machine: MicroVm,
    defaults: ExecDefaults,
    private readonly releaseTo: ReleaseFn,
    private readonly origin?: VmOrigin,
  ) {
    super(machine, defaults);
  }

  /** @internal How the library makes one (users get it from the API, never by `new`). */
  static create(machine: MicroVm, defaults: ExecDefaults, releaseTo: ReleaseFn, origin?: VmOrigin): Vm {
    return new Vm(machine, defaults, releaseTo, origin);
  }

  /** @internal */
  protected override usable(what: string): void {
    if (this.released) throw new PoolError("VM_RELEASED", `${what}: this VM was released back to its pool`, { hint: "acquire a new VM" });
    super.usable(what);
  }

  /**
   * Who processes run as unless a call says (the pool's `user`, else the image's `User`; undefined
   * means root), and where they start (the image's WorkingDir, else /).
   */
  get processDefaults(): { user: string | undefined; workingDir: string } {
    return { user: this.defaults.user, workingDir: this.defaults.workingDir ?? "/" };
  }

  /** True once released (calls then fail with VM_RELEASED). */
  get isReleased(): boolean {
    return this.released;
  }

  /**
   * Captures this VM as it is now (files, processes, memory) into `destDir` and returns it as an
   * Image whose pools restore that state. The VM pauses for the capture and then goes on.
   */
  async snapshot(destDir: string, options: CallOptions = {}): Promise<Image> {
    this.usable("vm.snapshot");
    const dir = parseOptions("vm.snapshot", z.object({ destDir: z.string({ error: "must be a directory path" }).min(1, { error: "must be a directory path" }) }), { destDir }).destDir;
    const o = parseOptions("vm.snapshot", callSchema.extend({ timeoutMs: callSchema.shape.timeoutMs.unwrap().default(SNAPSHOT_TIMEOUT_MS) }), options);
    if (!this.origin) {
      throw new ExecError("EXEC_SNAPSHOT_UNSUPPORTED", "vm.snapshot: this VM was not restored from a snapshot (its pool boots cold)", {
        hint: "use a pool with the image's own memoryMib and vcpus",
      });
    }
    const scope = callScope(`vm.snapshot ${dir}`, o.timeoutMs, o.signal);
    try {
      const snap = await scope.race(captureRunning(this.machine, resolvePath(dir), this.origin.meta, scope.signal));
      return this.origin.open(snap);
    } catch (e) {
      throw this.explain(e, "vm.snapshot");
    } finally {
      scope.done();
    }
  }

  /** Returns the VM to its pool; whatever it still runs for this caller is stopped. Idempotent. */
  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    await this.closeSession(new PoolError("VM_RELEASED", "the VM was released back to its pool"));
    await this.releaseTo(this);
  }

  dispose(): Promise<void> {
    return this.release();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.release();
  }

  /** For `using vm = ...` (synchronous disposal): the release runs in the background. */
  [Symbol.dispose](): void {
    this.release().catch(() => {});
  }
}
