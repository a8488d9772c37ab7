/**
 * The remote client of `supermachine serve`: `connect()` and the classes it hands out, which
 * have the interface of the local Pool, Vm, ExecChild and TcpForwarder. A low layer: it uses
 * fetch and ws, the option schemas and the error classes, never the engine or the server.
 */
export { connect, RemotePool, type RemotePools, type ConnectOptions, type AcquireOptions, type RemotePoolStats } from "./client.js";
export { RemoteVm, type SandboxInfo, type SnapshotInfo } from "./vm.js";
export { RemoteExecChild, type RemoteWaitResult } from "./child.js";
export { RemoteTcpForwarder } from "./tcp.js";
