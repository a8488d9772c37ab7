// pattern-1-one-shot-exec.mjs: run untrusted programs in isolation and collect the results
// (a CI job, a code verifier, an LLM's candidate solutions).
// Each candidate is staged into a VM with `stageFiles`, run with a time limit, and its VM thrown
// away afterwards (`restoreOnRelease: true`), so no candidate sees what another one did. All
// candidates are submitted at once; the pool runs at most `max` of them at a time.
//
//   node examples/pattern-1-one-shot-exec.mjs
// (uses the offline python image: see _images.mjs)
import { Image, connect } from "supermachine";
import { pythonImageRef } from "./_images.mjs";

const candidates = {
  "sum-of-squares": "print(sum(i * i for i in range(10)))",
  "reads-env": "import os\nprint('home is', os.environ.get('HOME', '(unset)'))",
  "tampers": "import os\nos.remove('/usr/bin/python3')\nprint('deleted python3')",
  "checks-python": "import os\nprint('python3 still there:', os.path.exists('/usr/bin/python3'))",
  "crashes": "raise ValueError('bad candidate')",
  "never-ends": "while True:\n    pass",
};

// With SUPERMACHINE_URL (and SUPERMACHINE_API_KEY) set, the pool is the "pattern1" pool of a
// `supermachine serve` there, declared with the same options (docs/serve.md): the rest is unchanged.
const pool = process.env.SUPERMACHINE_URL
  ? (await connect(process.env.SUPERMACHINE_URL)).pattern1
  : await (await Image.build({ ref: await pythonImageRef(), memoryMib: 512 })).pool({ min: 0, max: 2, restoreOnRelease: true });

async function runCandidate(source) {
  const vm = await pool.acquire();
  try {
    const out = await vm.exec({
      argv: ["python3", "/tmp/code.py"],
      stageFiles: { "/tmp/code.py": Buffer.from(source) },
      timeoutMs: 5_000,
    });
    if (out.timedOut) return "timed out after 5 s (killed)";
    if (out.exitCode !== 0) return `failed, exit ${out.exitCode}: ${out.stderr.toString().trim().split("\n").at(-1)}`;
    return `ok: ${out.stdout.toString().trim()}`;
  } finally {
    await vm.release();
  }
}

try {
  const names = Object.keys(candidates);
  const t0 = Date.now();
  const results = await Promise.all(names.map((name) => runCandidate(candidates[name])));
  names.forEach((name, i) => console.log(`${name.padEnd(15)} ${results[i]}`));
  console.log(`${names.length} candidates in ${((Date.now() - t0) / 1000).toFixed(1)} s, at most ${pool.stats().max} at a time`);
} finally {
  await pool.shutdown();
}
