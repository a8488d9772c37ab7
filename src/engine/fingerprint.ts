/**
 * What the engine is made of, for snapshot keys: a snapshot restores only into the QEMU, machine
 * type, CPU model, guest kernel and agent that made it, under the accelerator it ran on. The
 * shape is a key primitive (src/schema/key.ts); the host's part comes from ./identity.ts.
 */
export type { EngineFingerprint } from "../schema/key.js";
import type { Accel, EngineFingerprint } from "../schema/key.js";
import { nativeArtifacts } from "./artifacts.js";
import { hostIdentity } from "./identity.js";

/**
 * The engine's fingerprint. `accel` is what a VM actually ran on (`vm.accel`, after any KVM→TCG
 * fallback); without it, the accelerator the engine would use now.
 */
export function engineFingerprint(accel?: Accel): EngineFingerprint {
  const a = nativeArtifacts();
  return {
    ...hostIdentity(accel),
    kernelKey: a.kernelKey,
    agentKey: a.agentKey,
    agentVersion: a.agentVersion,
  };
}
