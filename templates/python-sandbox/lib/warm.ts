// The python image's warmup, a helper of its own: part of the image's key, so `supermachine why
// python` names this file when it changes.
import type { WarmupVm } from "supermachine";

/** Modules the sandboxed code is expected to import: imported once so their files are cached. */
const PRELOAD = ["json", "re", "decimal", "sandbox_tools"];

export async function warmPython(vm: WarmupVm): Promise<void> {
  // Compiled once here, so no VM compiles it again.
  const compile = await vm.exec({ argv: ["python3", "-m", "py_compile", "/opt/sandbox/sandbox_tools.py"] });
  if (compile.exitCode !== 0) throw new Error(`sandbox_tools.py does not compile: ${compile.stderr.toString()}`);
  const r = await vm.exec({ argv: ["python3", "-c", `import ${PRELOAD.join(", ")}; print(sandbox_tools.describe())`] });
  if (r.exitCode !== 0) throw new Error(`warmup imports failed: ${r.stderr.toString()}`);
}
