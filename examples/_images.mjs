// _images.mjs: a helper the python examples share (files starting with "_" are not examples).
//
// The python examples run on an offline test image: Debian bookworm with python3 and its
// standard library (no pip). It is built from the Debian mirror by
// test/fixtures/build-fixtures.mjs the first time (about 30 s) and cached in
// ${SUPERMACHINE_HOME:-~/.cache/supermachine}/fixtures afterwards.
import { tagImage } from "supermachine";
import { ensureFixtures } from "../test/fixtures/build-fixtures.mjs";

/** The image reference of the python image (`oci:<layout>:3-bookworm`), built if missing. */
export async function pythonImageRef() {
  let announced = false;
  const { python } = await ensureFixtures({
    only: ["python"],
    // Called only when something has to be built.
    log: (line) => {
      if (!announced) {
        announced = true;
        process.stderr.write("Building the python example image (Debian bookworm + python3), about 30 s the first time ...\n");
      }
      process.stderr.write(`  ${line}\n`);
    },
  });
  return python.ref;
}

/**
 * Makes the python image available as `python:3-bookworm` without a registry (what
 * `supermachine tag <fixture> python:3-bookworm` does), so projects can name it as users would.
 */
export async function tagPythonImage(name = "python:3-bookworm") {
  await tagImage(await pythonImageRef(), name);
  return name;
}
