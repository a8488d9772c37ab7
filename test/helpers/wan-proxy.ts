// The latency proxy lives with the benchmarks (bench/wan-proxy.ts), which measure through it too.
export { startWanProxy, type WanProxy, type WanProxyOptions, type WanStats } from "../../bench/wan-proxy.js";
