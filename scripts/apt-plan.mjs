// What setup does about missing Debian packages, decided from facts it gathers (kept apart from
// scripts/setup.mjs so a test can inject them): nothing; apt-get as root; apt-get through
// `sudo -n` for a user with password-less sudo; or, for a user without it, stop before doing
// anything else and print the one command to run.

/** "cargo" stands for the Rust toolchain: Debian's cargo and rustc packages. */
export const debianNames = (missing) => missing.flatMap((n) => (n === "cargo" ? ["cargo", "rustc"] : [n]));

/** The one line a user without root runs. */
export const installLine = (missing) => `sudo apt-get install -y --no-install-recommends ${debianNames(missing).join(" ")}`;

/**
 * @param {{ missing: string[], uid: number | undefined, sudo: () => boolean }} facts
 *   `sudo` says whether `sudo -n` may run commands (asked only when needed).
 * @returns {{ action: "none" } | { action: "install", prefix: string[], packages: string[] } | { action: "ask", line: string }}
 */
export function aptDecision({ missing, uid, sudo }) {
  if (missing.length === 0) return { action: "none" };
  const packages = debianNames(missing);
  if (uid === 0) return { action: "install", prefix: [], packages };
  if (sudo()) return { action: "install", prefix: ["sudo", "-n"], packages };
  return { action: "ask", line: installLine(missing) };
}
