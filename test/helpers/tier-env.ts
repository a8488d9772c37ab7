// Vitest setup file of every tier, run in the worker before each test file: the environment that
// test/helpers/tier-home.ts chose for the tier. Child processes (the CLI, examples, fixtures'
// builders) inherit it.
import { inject } from "vitest";

process.env.SUPERMACHINE_HOME = inject("supermachineHome");
process.env.SUPERMACHINE_TEST_SETUP_HOME = inject("setupHome");
process.env.SUPERMACHINE_TEST_FIXTURES = inject("fixturesDir");
