/**
 * How a sandbox's id (and its access token, and a snapshot's id) names the node that holds it, so
 * that any front routes any request without shared state: the last 6 characters are the node's
 * tag, drawn from a CSPRNG each time a node process starts. A node that restarts gets a new tag,
 * so ids of sandboxes that died with the old process never reach the new one: a front reports
 * them lost (SANDBOX_NODE_LOST) instead.
 */
import { randomBytes } from "node:crypto";

export const TAG_LENGTH = 6;
const ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789";

/** `n` characters from [a-z0-9], uniform (rejection sampling). */
export function randomAlnum(n: number): string {
  let out = "";
  while (out.length < n) {
    for (const b of randomBytes(n * 2)) {
      if (b < 252 && out.length < n) out += ALPHABET[b % 36];
    }
  }
  return out;
}

/** A node's tag for this process. */
export const newNodeTag = (): string => randomAlnum(TAG_LENGTH);

/** The node tag an id or token carries, or undefined when it cannot carry one. */
export function tagOf(idOrToken: string | undefined): string | undefined {
  if (!idOrToken || idOrToken.length <= TAG_LENGTH || !/^[a-z0-9]+$/.test(idOrToken)) return undefined;
  return idOrToken.slice(-TAG_LENGTH);
}
