import type { WarmupVm } from "supermachine";

/** Records which image a VM was baked as, in /etc/acme/images (one line per layer of the chain). */
export async function stamp(vm: WarmupVm, image: string): Promise<void> {
  const r = await vm.exec({ argv: ["sh", "-c", `mkdir -p /etc/acme && echo ${image} >> /etc/acme/images`] });
  if (r.exitCode !== 0) throw new Error(`stamp ${image}: ${r.stderr.toString()}`);
}
