// QEMU dies with its owner. `exit`: acquire, then process.exit() with nothing released (the exit
// hook kills QEMU and removes its runtime directory). `hang`: acquire and wait to be SIGKILLed
// (QEMU's parent-death signal ends it). Prints QEMU's pid first, for the test to watch.
import { busyboxPool, report } from "./_lib.mjs";

const mode = process.argv[2] ?? "exit";
const pool = await busyboxPool();
const vm = await pool.acquire();
report({ scenario: "owner", mode, qemuPid: vm.pid, ownerPid: process.pid });
if (mode === "exit") process.exit(0);
setInterval(() => {}, 60_000);
