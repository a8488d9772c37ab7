// Vitest setup file of the unit tier: proof that it boots nothing. SUPERMACHINE_QEMU points at a
// stand-in that refuses to run and records the attempt, for this process and every child it
// starts (the CLI, a child Node); after the file's tests, any attempt fails the file, naming the
// arguments QEMU was given. A unit test that needs QEMU belongs in test/host (QEMU without a
// guest) or test/vm (a guest).
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll } from "vitest";

const dir = mkdtempSync(join(tmpdir(), "sm-unit-guard-"));
const calls = join(dir, "calls");
const fake = join(dir, "qemu-system-x86_64");
writeFileSync(calls, "");
writeFileSync(
  fake,
  `#!/bin/sh\nprintf '%s\\n' "$*" >> '${calls}'\necho "supermachine unit tier: QEMU must not run here (qemu-system-x86_64 $*); move the test to test/host or test/vm" >&2\nexit 97\n`,
);
chmodSync(fake, 0o755);
process.env.SUPERMACHINE_QEMU = fake;

afterAll(() => {
  const attempts = readFileSync(calls, "utf8").trim();
  rmSync(dir, { recursive: true, force: true });
  if (attempts) throw new Error(`a unit test ran QEMU (the unit tier boots nothing and runs no QEMU); it was given:\n${attempts}`);
});
