/**
 * `Image`: an OCI image made ready to boot (its layers flattened into a cached squashfs),
 * plus the VM shape (memory, vCPUs) and exec defaults that pools created from it use.
 */
import { dirname } from "node:path";
import type { ImageConfig } from "../image/oci-layout.js";
import { resolveImage } from "../image/store.js";
import { chooseAccel, type AccelChoice } from "../engine/accel.js";
import { Pool } from "./pool.js";
import { resolveBuildOptions, resolvePoolOptions, type BuildOptions, type PoolOptions, type ResolvedBuild } from "./options.js";
import { execDefaults } from "./vm.js";

export class Image {
  private constructor(
    private readonly build: ResolvedBuild,
    /** Manifest digest the image resolved to (`sha256:...`). */
    readonly digest: string,
    /** Parsed image config (Env, Cmd, WorkingDir, User, ...). */
    readonly config: ImageConfig,
    private readonly rootfs: string,
  ) {}

  /**
   * Resolve `ref`, flatten its layers into a squashfs root filesystem (cached by manifest
   * digest, so a second build of the same image is a cache hit), and return the image.
   */
  static async build(options: BuildOptions): Promise<Image> {
    const b = resolveBuildOptions(options);
    const resolved = await resolveImage(b.ref, {
      pullPolicy: b.pullPolicy,
      ...(b.platform ? { platform: b.platform } : {}),
      ...(b.insecureRegistries ? { insecureRegistries: b.insecureRegistries } : {}),
      ...(b.onProgress ? { onProgress: b.onProgress } : {}),
    });
    return new Image(b, resolved.manifestDigest, resolved.config, resolved.rootfsPath);
  }

  get ref(): string {
    return this.build.ref;
  }
  get memoryMib(): number {
    return this.build.memoryMib;
  }
  get vcpus(): number {
    return this.build.vcpus;
  }
  /**
   * Directory holding this image's on-disk state. In this version that is the image store
   * entry (squashfs root filesystem and metadata); snapshots move here in a later version.
   */
  get snapshotPath(): string {
    return dirname(this.rootfs);
  }
  /** Path of the squashfs root filesystem the VMs boot from. */
  get rootfsPath(): string {
    return this.rootfs;
  }

  /** The accelerator VMs of this image will use, and why. */
  static accel(): AccelChoice {
    return chooseAccel();
  }

  /** Create a pool and boot its first `min` VMs. */
  async pool(options: PoolOptions = {}): Promise<Pool> {
    const o = resolvePoolOptions(options);
    const pool = new Pool(
      { rootfs: this.rootfs, memoryMib: o.memoryMib ?? this.memoryMib, vcpus: o.vcpus ?? this.vcpus, bootTimeoutMs: o.restoreTimeoutMs },
      execDefaults(this.config, this.build.env),
      o,
    );
    await pool.warm();
    return pool;
  }
}
