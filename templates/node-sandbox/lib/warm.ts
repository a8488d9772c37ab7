// The node image's warmup, a helper of its own: part of the image's key, so `supermachine why
// node` names this file when it changes.
import type { WarmupVm } from "supermachine";

/** Evaluates the JavaScript expression given as its argument and prints `{ "result": ... }`. */
export const RUNNER = `const value = await (0, eval)(process.argv[2] ?? "undefined");
console.log(JSON.stringify({ result: value ?? null }));
`;

export async function warmNode(vm: WarmupVm): Promise<void> {
  await vm.writeFile("/srv/runner.mjs", RUNNER);
  const r = await vm.exec({ argv: ["node", "/srv/runner.mjs", "[process.version, 6 * 7]"] });
  if (r.exitCode !== 0) throw new Error(`the runner does not start: ${r.stderr.toString()}`);
}
