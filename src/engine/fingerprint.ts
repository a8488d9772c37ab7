/**
 * What the engine is made of, for snapshot keys: a snapshot restores only into the QEMU, guest
 * kernel and agent that made it, under the accelerator it ran on.
 */
import { type Accel, chooseAccel } from "./accel.js";
import { nativeArtifacts } from "./artifacts.js";
import { qemuIdentity } from "./qemu.js";

export interface EngineFingerprint {
  /** QEMU binary identity (path, size, mtime). */
  qemu: string;
  /** The accelerator VMs run under: the one a VM actually used, or the engine's current choice. */
  accel: Accel;
  kernelKey: string;
  agentKey: string;
  agentVersion: string;
}

/**
 * The engine's fingerprint. `accel` is what a VM actually ran on (`vm.accel`, after any KVM→TCG
 * fallback); without it, the accelerator the engine would use now.
 */
export function engineFingerprint(accel?: Accel): EngineFingerprint {
  const a = nativeArtifacts();
  return {
    qemu: qemuIdentity(),
    accel: accel ?? chooseAccel().accel,
    kernelKey: a.kernelKey,
    agentKey: a.agentKey,
    agentVersion: a.agentVersion,
  };
}
