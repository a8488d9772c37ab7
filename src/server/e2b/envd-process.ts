/**
 * The E2B profile's `process.Process` service: Start and Connect stream a process's events (start
 * first, then output, keepalives and the end); List, SendInput, CloseStdin, SendSignal and Update
 * act on a running one by pid or tag. Processes are `vm.spawn`s of the sandbox's VM, kept in its
 * process table, so they outlive the request that started them: a client that disconnects does
 * not kill them. A request's Connect deadline (the SDK's `timeoutMs`) is the process's own
 * timeout: the guest kills it then, as E2B's daemon does.
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import { type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import { Signal, type Process, type ProcessEventSchema, type ProcessSelector } from "./gen/process/process_pb.js";
import { ManagedProcess, type ProcessEvent } from "../processes.js";
import type { Sandbox } from "../sandboxes.js";
import { ServerError } from "../errors.js";
import { connectCall, toConnectError } from "./connect-errors.js";
import { guestPathFor, hasBash, isDirectory, resolveUser, userFromHeader } from "./guest.js";

/** How a handler finds its sandbox (set per request by the router). */
export type SandboxOf = (ctx: HandlerContext) => Sandbox;

/** Keepalive period the SDKs ask for (header in seconds); E2B's default when absent. */
function keepaliveMs(ctx: HandlerContext): number {
  const s = Number(ctx.requestHeader.get("keepalive-ping-interval"));
  return Number.isFinite(s) && s > 0 ? Math.max(1_000, Math.min(s * 1000, 300_000)) : 50_000;
}

type EventInit = MessageInitShape<typeof ProcessEventSchema>;

function toEvent(e: ProcessEvent | undefined): EventInit {
  if (e === undefined) return { event: { case: "keepalive", value: {} } };
  if (e.type === "data") return { event: { case: "data", value: { output: { case: e.stream, value: e.data } } } };
  const end = e.end;
  return { event: { case: "end", value: { exitCode: end.exitCode, exited: end.exited, status: end.status, ...(end.error ? { error: end.error } : {}) } } };
}

function selector(sel: ProcessSelector | undefined): { pid?: number; tag?: string } {
  if (sel?.selector.case === "pid") return { pid: sel.selector.value };
  if (sel?.selector.case === "tag") return { tag: sel.selector.value };
  throw new ServerError("SERVER_BAD_REQUEST", "the request names no process (selector with pid or tag)", { hint: "send process: { pid } or process: { tag }" });
}

async function* streamOf(proc: ManagedProcess, ctx: HandlerContext): AsyncGenerator<{ event: EventInit }> {
  const events = proc.follow(ctx.signal, keepaliveMs(ctx));
  yield { event: { event: { case: "start", value: { pid: proc.pid } } } };
  for await (const e of events) yield { event: toEvent(e) };
}

export function processService(sandboxOf: SandboxOf, onStart?: (sb: Sandbox) => void): ServiceImpl<typeof Process> {
  return {
    async *start(req, ctx) {
      const sb = sandboxOf(ctx);
      let proc: ManagedProcess;
      try {
        const user = await resolveUser(sb, userFromHeader(ctx.requestHeader.get("authorization")));
        const cfg = req.process;
        if (!cfg || !cfg.cmd) throw new ServerError("SERVER_BAD_REQUEST", "process.Process/Start: process.cmd is empty", { hint: "send process: { cmd, args }" });
        let argv = [cfg.cmd, ...cfg.args];
        if ((cfg.cmd === "/bin/bash" || cfg.cmd === "bash") && !(await hasBash(sb))) argv = ["/bin/sh", ...cfg.args.filter((a) => a !== "-l")];
        const timeoutMs = ctx.timeoutMs();
        const size = req.pty?.size;
        const child = await sb.vm.spawn({
          argv,
          env: { HOME: user.home, USER: user.name, LOGNAME: user.name, ...sb.env, ...cfg.envs },
          // A user without a home directory (nobody's is /nonexistent) starts where the image says.
          cwd: cfg.cwd || (await isDirectory(sb, user.home)) ? guestPathFor(user, cfg.cwd) : sb.vm.processDefaults.workingDir,
          ...(user.spec ? { user: user.spec } : {}),
          ...(timeoutMs !== undefined && timeoutMs > 0 ? { timeoutMs } : {}),
          ...(size ? { tty: true, winsize: { cols: Math.max(1, size.cols), rows: Math.max(1, size.rows) } } : {}),
        });
        if (req.stdin === false) await child.closeStdin();
        proc = new ManagedProcess(child.pid!, child, { cmd: cfg.cmd, args: cfg.args, envs: cfg.envs, cwd: cfg.cwd }, req.tag, size !== undefined);
        sb.processes.add(proc);
        onStart?.(sb);
      } catch (err) {
        throw toConnectError(err);
      }
      yield* streamOf(proc, ctx);
    },

    async *connect(req, ctx) {
      const sb = sandboxOf(ctx);
      let proc: ManagedProcess;
      try {
        proc = sb.processes.find(selector(req.process), "process.Process/Connect");
      } catch (err) {
        throw toConnectError(err);
      }
      yield* streamOf(proc, ctx);
    },

    list(_req, ctx) {
      const sb = sandboxOf(ctx);
      return {
        processes: sb.processes.running().map((p) => ({ pid: p.pid, config: { cmd: p.config.cmd, args: p.config.args, envs: p.config.envs, ...(p.config.cwd ? { cwd: p.config.cwd } : {}) }, ...(p.tag !== undefined ? { tag: p.tag } : {}) })),
      };
    },

    sendInput(req, ctx) {
      return connectCall(async () => {
        const proc = sandboxOf(ctx).processes.find(selector(req.process), "process.Process/SendInput");
        const input = req.input?.input;
        if (input?.case === "stdin" || input?.case === "pty") await proc.child.writeStdin(input.value);
        return {};
      });
    },

    closeStdin(req, ctx) {
      return connectCall(async () => {
        await sandboxOf(ctx).processes.find(selector(req.process), "process.Process/CloseStdin").child.closeStdin();
        return {};
      });
    },

    sendSignal(req, ctx) {
      return connectCall(async () => {
        const proc = sandboxOf(ctx).processes.find(selector(req.process), "process.Process/SendSignal");
        const signal = req.signal === Signal.SIGKILL ? "SIGKILL" : req.signal === Signal.SIGTERM ? "SIGTERM" : undefined;
        if (!signal) throw new ServerError("SERVER_BAD_REQUEST", `process.Process/SendSignal: signal ${req.signal} is not SIGTERM or SIGKILL`, { hint: "send SIGNAL_SIGTERM or SIGNAL_SIGKILL" });
        await proc.child.signal(signal);
        return {};
      });
    },

    update(req, ctx) {
      return connectCall(async () => {
        const proc = sandboxOf(ctx).processes.find(selector(req.process), "process.Process/Update");
        const size = req.pty?.size;
        if (size) await proc.child.resize(Math.max(1, size.cols), Math.max(1, size.rows));
        return {};
      });
    },

    streamInput() {
      throw toConnectError(new ServerError("SERVER_BAD_REQUEST", "process.Process/StreamInput is not served (the SDKs use SendInput)", { hint: "send input with SendInput" }));
    },
  };
}
