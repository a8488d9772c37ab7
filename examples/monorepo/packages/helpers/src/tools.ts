import type { WarmupVm } from "supermachine";

/** Installs a shell script as a command on PATH. */
export async function installTool(vm: WarmupVm, name: string, script: string): Promise<void> {
  await vm.writeFile(`/usr/local/bin/${name}`, `#!/bin/sh\n${script}\n`, { mode: 0o755 });
}
