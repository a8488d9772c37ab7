// The host part of the engine fingerprint: the comparison that names every differing field (old
// fingerprints without machine/cpu included), the recipe key that leaves exactly the host fields
// out, and the -cpu model SUPERMACHINE_CPU gives.
import { describe, expect, it } from "vitest";
import { diffInputs } from "../../src/graph/keys.js";
import { cpuModel, hostCpuFlags, KVM_BASELINE_CPU, passesHostCpu } from "../../src/engine/identity.js";
import { describeDifference, HOST_FIELDS, hostDifferences, hostMismatch, recipeKeyOf, type HostIdentity } from "../../src/schema/host.js";
import { keyOf, type EngineFingerprint, type SnapshotInputs } from "../../src/schema/key.js";

const host: HostIdentity = { qemu: "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", machine: "microvm", accel: "tcg", cpu: "max" };
const engine: EngineFingerprint = { ...host, kernelKey: "k1", agentKey: "a1", agentVersion: "0.1.0" };
const inputs = (e: EngineFingerprint, over: Partial<SnapshotInputs> = {}): SnapshotInputs =>
  ({ parent: null, manifestDigest: "sha256:" + "a".repeat(64), module: null, engine: e, memoryMib: 256, vcpus: 1, ...over }) as SnapshotInputs;

describe("hostDifferences", () => {
  it("finds none between a host and itself, and each differing field with both values", () => {
    expect(hostDifferences(engine, host)).toEqual([]);
    expect(hostDifferences({ ...engine, cpu: "qemu64" }, host)).toEqual([{ field: "cpu", snapshot: "qemu64", host: "max" }]);
    const other = { ...engine, qemu: "QEMU emulator version 8.0.0", accel: "kvm", cpu: KVM_BASELINE_CPU };
    expect(hostDifferences(other, host).map((d) => d.field)).toEqual(["qemu", "accel", "cpu"]);
  });

  it("ignores the kernel and agent (those are not the host's)", () => {
    expect(hostDifferences({ ...engine, kernelKey: "other", agentVersion: "9" }, host)).toEqual([]);
  });

  it("takes a fingerprint of an older version (no machine, no cpu) for another host's, naming what it lacks", () => {
    const old = { qemu: host.qemu, accel: "tcg", kernelKey: "k1", agentKey: "a1", agentVersion: "0.1.0" };
    const d = hostDifferences(old, host);
    expect(d).toEqual([
      { field: "machine", snapshot: undefined, host: "microvm" },
      { field: "cpu", snapshot: undefined, host: "max" },
    ]);
    expect(d.map(describeDifference)).toEqual(['machine: the snapshot\'s is (not recorded), this host\'s is "microvm"', 'cpu: the snapshot\'s is (not recorded), this host\'s is "max"']);
    // Not even an object: every field differs, nothing throws.
    expect(hostDifferences(null, host).map((x) => x.field)).toEqual(["qemu", "machine", "accel", "cpu"]);
  });

  it("compares CPU flags as sets in order, and names only the flags one side lacks", () => {
    const kvmHost: HostIdentity = { ...host, accel: "kvm", cpu: "host", cpuFlags: ["avx", "avx2", "fpu", "sse4_2"] };
    expect(hostDifferences({ ...kvmHost }, kvmHost)).toEqual([]);
    const d = hostDifferences({ ...kvmHost, cpuFlags: ["avx", "avx512f", "fpu", "sse4_2"] }, kvmHost);
    expect(d.map((x) => x.field)).toEqual(["cpuFlags"]);
    expect(describeDifference(d[0]!)).toBe("cpuFlags: the snapshot's host has avx512f that this host lacks, this host has avx2 that it lacked");
    // A named model (no flags recorded) against -cpu host.
    const named = hostDifferences({ ...host, accel: "kvm", cpu: KVM_BASELINE_CPU }, kvmHost);
    expect(named.map((x) => x.field)).toEqual(["cpu", "cpuFlags"]);
    expect(describeDifference(named[1]!)).toBe("cpuFlags: the snapshot's is (none: a named CPU model), this host's is 4 host flags");
  });

  it("makes one SNAPSHOT_HOST_MISMATCH naming every field with both values, and saying what to do", () => {
    const err = hostMismatch("snapshot app", hostDifferences({ ...engine, qemu: "QEMU emulator version 9.9.9", cpu: "qemu64" }, host));
    expect(err).toMatchObject({ name: "ImageError", code: "SNAPSHOT_HOST_MISMATCH" });
    expect(err.message).toBe(`snapshot app was made on another host: qemu: the snapshot's is "QEMU emulator version 9.9.9", this host's is ${JSON.stringify(host.qemu)}; cpu: the snapshot's is "qemu64", this host's is "max"`);
    expect(err.hint).toMatch(/bake it on this host.*same QEMU package and SUPERMACHINE_CPU.*a front/);
  });
});

describe("recipeKeyOf", () => {
  const base = recipeKeyOf(inputs(engine), null);

  it("leaves out exactly the host fields", () => {
    expect(HOST_FIELDS).toEqual(["qemu", "machine", "accel", "cpu", "cpuFlags"]);
    const variants: EngineFingerprint[] = [
      { ...engine, qemu: "QEMU emulator version 8.2.0" },
      { ...engine, machine: "q35" },
      { ...engine, accel: "kvm" },
      { ...engine, cpu: "qemu64" },
      { ...engine, accel: "kvm", cpu: "host", cpuFlags: ["fpu", "sse4_2"] },
    ];
    for (const v of variants) {
      expect(keyOf(inputs(v)), JSON.stringify(v)).not.toBe(keyOf(inputs(engine)));
      expect(recipeKeyOf(inputs(v), null), JSON.stringify(v)).toBe(base);
    }
    for (const v of [{ ...engine, kernelKey: "k2" }, { ...engine, agentKey: "a2" }, { ...engine, agentVersion: "0.2.0" }]) {
      expect(recipeKeyOf(inputs(v), null), JSON.stringify(v)).not.toBe(base);
    }
    expect(recipeKeyOf(inputs(engine, { memoryMib: 512 }), null)).not.toBe(base);
  });

  it("names a child's parent by the parent's recipe, not its key", () => {
    const parentRecipe = base;
    const a = recipeKeyOf(inputs(engine, { parent: keyOf(inputs(engine)), manifestDigest: null }), parentRecipe);
    const b = recipeKeyOf(inputs({ ...engine, cpu: "qemu64" }, { parent: keyOf(inputs({ ...engine, cpu: "qemu64" })), manifestDigest: null }), parentRecipe);
    expect(a).toBe(b);
    expect(recipeKeyOf(inputs(engine, { parent: keyOf(inputs(engine)), manifestDigest: null }), "f".repeat(64))).not.toBe(a);
    // Never equal to a key of the same inputs.
    expect(base).not.toBe(keyOf(inputs(engine)));
    expect(base).toMatch(/^[0-9a-f]{64}$/);
  });
});

describe("the -cpu model", () => {
  it("is max under TCG and the baseline under KVM by default; SUPERMACHINE_CPU overrides", () => {
    expect(cpuModel("tcg", {})).toBe("max");
    expect(cpuModel("kvm", {})).toBe("Nehalem-v1,enforce");
    expect(cpuModel("tcg", { SUPERMACHINE_CPU: "qemu64" })).toBe("qemu64");
    expect(cpuModel("kvm", { SUPERMACHINE_CPU: " host " })).toBe("host");
    expect(cpuModel("kvm", { SUPERMACHINE_CPU: "Skylake-Server-v4,enforce,-hle" })).toBe("Skylake-Server-v4,enforce,-hle");
  });

  it("refuses what is not a -cpu argument, and host under TCG", () => {
    expect(() => cpuModel("tcg", { SUPERMACHINE_CPU: "max -device foo" })).toThrow(expect.objectContaining({ code: "OPTION_CPU_INVALID" }));
    expect(() => cpuModel("tcg", { SUPERMACHINE_CPU: "host" })).toThrow(expect.objectContaining({ code: "OPTION_CPU_INVALID", message: expect.stringContaining("needs KVM") }));
    expect(() => cpuModel("tcg", { SUPERMACHINE_CPU: "host,migratable=off" })).toThrow(expect.objectContaining({ code: "OPTION_CPU_INVALID" }));
  });

  it("puts the host's flags in the identity only when KVM passes the host CPU through", () => {
    expect(passesHostCpu("kvm", "host")).toBe(true);
    expect(passesHostCpu("kvm", "max")).toBe(true);
    expect(passesHostCpu("kvm", KVM_BASELINE_CPU)).toBe(false);
    expect(passesHostCpu("tcg", "max")).toBe(false);
    const flags = hostCpuFlags();
    expect(flags).toEqual([...new Set(flags)].sort());
  });
});

describe("why names a change of host", () => {
  it("names engine.cpu and engine.machine, and the CPU flags by those only one side has", () => {
    const kvm: EngineFingerprint = { ...engine, accel: "kvm", cpu: "host", cpuFlags: ["avx", "avx2", "fpu"] };
    const changes = diffInputs({ inputs: inputs(kvm) }, { inputs: inputs({ ...kvm, machine: "q35", cpuFlags: ["avx", "avx512f", "fpu"] }) });
    expect(changes).toEqual([
      { input: "engine.cpuFlags", before: ["avx2"], after: ["avx512f"] },
      { input: "engine.machine", before: "microvm", after: "q35" },
    ]);
    const old = { ...engine } as Partial<EngineFingerprint>;
    delete old.cpu;
    expect(diffInputs({ inputs: inputs(old as EngineFingerprint) }, { inputs: inputs(engine) })).toEqual([{ input: "engine.cpu", before: null, after: "max" }]);
  });
});
