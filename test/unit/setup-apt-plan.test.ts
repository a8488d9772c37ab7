// The decision setup takes about missing Debian packages (src/setup/packages.ts), on injected facts:
// a machine cannot be made to miss a package for a test. The end-to-end case (a user without root
// or sudo, a package missing: one line, exit 1, nothing done) is in normal-user.test.ts.
import { describe, expect, it } from "vitest";
import { aptDecision, installLine } from "../../src/setup/packages.js";

const never = () => {
  throw new Error("sudo asked about although the decision does not need it");
};

describe("apt decision", () => {
  it("does nothing when nothing is missing (and does not ask about sudo)", () => {
    expect(aptDecision({ missing: [], uid: 1000, sudo: never })).toEqual({ action: "none" });
    expect(aptDecision({ missing: [], uid: 0, sudo: never })).toEqual({ action: "none" });
  });

  it("installs as root without sudo", () => {
    expect(aptDecision({ missing: ["zstd", "cargo"], uid: 0, sudo: never })).toEqual({ action: "install", prefix: [], packages: ["zstd", "cargo", "rustc"] });
  });

  it("installs through sudo -n for a user with password-less sudo", () => {
    expect(aptDecision({ missing: ["qemu-system-x86"], uid: 1000, sudo: () => true })).toEqual({ action: "install", prefix: ["sudo", "-n"], packages: ["qemu-system-x86"] });
  });

  it("asks a user without root or sudo to run one line, naming every package", () => {
    const d = aptDecision({ missing: ["qemu-system-x86", "busybox-static", "cargo"], uid: 1000, sudo: () => false });
    expect(d).toEqual({ action: "ask", line: "sudo apt-get install -y --no-install-recommends qemu-system-x86 busybox-static cargo rustc" });
    expect(installLine(["zstd"])).toBe("sudo apt-get install -y --no-install-recommends zstd");
  });
});
