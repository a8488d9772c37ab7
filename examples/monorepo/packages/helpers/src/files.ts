import type { WarmupVm } from "supermachine";

/** Writes a JSON document into the guest (parents are created). */
export async function writeJson(vm: WarmupVm, path: string, value: unknown): Promise<void> {
  await vm.writeFile(path, JSON.stringify(value, null, 2) + "\n");
}
