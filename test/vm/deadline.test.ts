// Host-side deadlines: a guest that stops answering (its QEMU process stopped with SIGSTOP)
// never hangs a caller; every call gives up at its deadline with CALL_TIMEOUT, and the VM
// works again once it runs.
import { afterAll, describe, expect, it } from "vitest";
import { DeadlineError } from "../../src/index.js";
import { HOST_GRACE_MS } from "../../src/session/session.js";
import { useBusyboxVm } from "../helpers/vm.js";

const env = useBusyboxVm();

afterAll(() => {
  // Never leave a stopped QEMU behind, whatever failed (the pool's own hook kills it next).
  try {
    process.kill(env.vm.pid, "SIGCONT");
  } catch {
    /* gone */
  }
});

async function timed<T>(p: Promise<T>): Promise<{ err: unknown; ms: number }> {
  const t0 = Date.now();
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  return { err, ms: Date.now() - t0 };
}

describe("a guest that stops answering", () => {
  it("cannot hang exec, spawn, files, workloadSignal or snapshot", async () => {
    expect((await env.vm.exec({ argv: ["true"] })).exitCode).toBe(0);
    process.kill(env.vm.pid, "SIGSTOP");
    try {
      const exec = await timed(env.vm.exec({ argv: ["sleep", "1"], timeoutMs: 500 }));
      expect(exec.err).toBeInstanceOf(DeadlineError);
      expect(exec.err).toMatchObject({ code: "CALL_TIMEOUT" });
      expect(exec.ms).toBeGreaterThanOrEqual(500 + HOST_GRACE_MS - 50);
      expect(exec.ms).toBeLessThan(500 + HOST_GRACE_MS + 3_000);

      const results = await Promise.all([
        timed(env.vm.readFile("/etc/passwd", { timeoutMs: 800 })),
        timed(env.vm.writeFile("/tmp/x", "x", { timeoutMs: 800 })),
        timed(env.vm.readFileStream("/etc/passwd", { timeoutMs: 800 })),
        timed(env.vm.workloadSignal(15, { timeoutMs: 800 })),
        timed(env.vm.snapshot("/tmp/sm-deadline-never", { timeoutMs: 800 })),
      ]);
      for (const r of results) {
        expect(r.err).toMatchObject({ code: "CALL_TIMEOUT" });
        expect(r.ms).toBeLessThan(4_000);
      }
      // An abort is as good as a deadline.
      const ac = new AbortController();
      setTimeout(() => ac.abort(new Error("caller gave up")), 300);
      const spawn = await timed(env.vm.spawn({ argv: ["true"], signal: ac.signal }));
      expect((spawn.err as Error).message).toBe("caller gave up");
      expect(spawn.ms).toBeLessThan(3_000);
    } finally {
      process.kill(env.vm.pid, "SIGCONT");
    }
    // Running again, the VM answers; nothing was left half-open on the channel.
    expect((await env.vm.exec({ argv: ["echo", "back"] })).stdout.toString()).toBe("back\n");
    await new Promise((r) => setTimeout(r, 500));
    expect(env.vm.machine.agent.openStreams).toBe(0);
  });
});
