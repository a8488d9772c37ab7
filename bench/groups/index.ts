/** The benchmark groups, in the order `npm run bench` runs them. */
import { acquireGroup } from "./acquire.js";
import { bakeGroup } from "./bake.js";
import { cacheGroup } from "./cache.js";
import { cacheWanGroup } from "./cache-wan.js";
import { densityGroup } from "./density.js";
import { egressGroup } from "./egress.js";
import { fleetGroup } from "./fleet.js";
import { floodGroup } from "./flood.js";
import { forkBombGroup } from "./fork-bomb.js";
import { installGroup } from "./install.js";
import { loadGroup } from "./load.js";
import { pageGroup } from "./page.js";
import { poolCycleGroup } from "./pool-cycle.js";
import { projectGroup } from "./project.js";
import { registryGroup } from "./registry.js";
import { restoreGroup } from "./restore.js";
import { runtimesGroup } from "./runtimes.js";
import { serveGroup } from "./serve.js";
import { staleLockGroup } from "./stale-lock.js";
import { streamsGroup } from "./streams.js";
import { tcpGroup } from "./tcp.js";
import { bootGroup, execGroup, memoryGroup } from "./vm.js";
import { watchGroup } from "./watch.js";
import type { BenchGroup } from "../harness.js";

/** In the order they run: the groups that share one VM come first (the streaming ones after the memory figures, each cleaning up after itself). */
export const GROUPS: readonly BenchGroup[] = [
  bootGroup,
  execGroup,
  memoryGroup,
  streamsGroup,
  tcpGroup,
  floodGroup,
  forkBombGroup,
  restoreGroup,
  bakeGroup,
  acquireGroup,
  runtimesGroup,
  poolCycleGroup,
  loadGroup,
  densityGroup,
  registryGroup,
  projectGroup,
  watchGroup,
  egressGroup,
  serveGroup,
  pageGroup,
  fleetGroup,
  cacheGroup,
  cacheWanGroup,
  staleLockGroup,
  installGroup,
];
