// _images.mjs: helpers the python and node examples share (files starting with "_" are not examples).
//
// The python examples run on an offline test image: Debian bookworm with python3 and its
// standard library (no pip). It is built from the Debian mirror by
// test/fixtures/build-fixtures.mjs the first time (about 30 s) and cached in
// ${SUPERMACHINE_HOME:-~/.cache/supermachine}/fixtures afterwards. The node examples run on
// Debian bookworm with Debian's nodejs (Node 18, global fetch), built the same way by
// test/fixtures/node-fixture.mjs.
import { tagImage } from "supermachine";
import { ensureFixtures } from "../test/fixtures/build-fixtures.mjs";
import { ensureNodeFixture } from "../test/fixtures/node-fixture.mjs";

/** A log for the fixture builders that announces `what` once, when something has to be built. */
function announceOnce(what) {
  let announced = false;
  return (line) => {
    if (!announced) {
      announced = true;
      process.stderr.write(`Building the ${what} example image, about 30 s the first time ...\n`);
    }
    process.stderr.write(`  ${line}\n`);
  };
}

/** The image reference of the python image (`oci:<layout>:3-bookworm`), built if missing. */
export async function pythonImageRef() {
  // The log is called only when something has to be built.
  const { python } = await ensureFixtures({ only: ["python"], log: announceOnce("python (Debian bookworm + python3)") });
  return python.ref;
}

/** The image reference of the node image (`oci:<layout>:bookworm`), built if missing. */
export async function nodeImageRef() {
  const { ref } = await ensureNodeFixture({ log: announceOnce("node (Debian bookworm + nodejs 18)") });
  return ref;
}

/**
 * Makes the python image available as `python:3-bookworm` without a registry (what
 * `supermachine tag <fixture> python:3-bookworm` does), so projects can name it as users would.
 */
export async function tagPythonImage(name = "python:3-bookworm") {
  await tagImage(await pythonImageRef(), name);
  return name;
}
