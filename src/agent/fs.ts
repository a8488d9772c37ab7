/**
 * The FS_* messages' answers as the host sees them (PROTOCOL.md, *File system*): a file's fields
 * decoded into a FileInfo, a watch record into a DirEvent. Everything is checked: the guest is
 * untrusted, and a field out of range fails the connection like any other violation.
 */
import { AgentError } from "../errors.js";
import type { DirEvent, FileInfo } from "../schema/calls.js";
import { Fields, Tag } from "./protocol.js";

export type { DirEvent, FileInfo };

const TYPES = ["other", "file", "directory", "symlink"] as const;
const KINDS = [undefined, "create", "write", "remove", "rename", "chmod"] as const;

function need<T>(v: T | undefined, what: string, field: string): T {
  if (v === undefined) throw new AgentError("AGENT_PROTOCOL", `${what}: field ${field} missing`);
  return v;
}

/** A file's fields (FS_STAT's OK, an FS_LIST record). */
export function fileInfoOf(f: Fields, what: string): FileInfo {
  const T = Tag.fileInfo;
  const type = TYPES[need(f.u8(T.type), what, "type")];
  if (!type) throw new AgentError("AGENT_PROTOCOL", `${what}: file type ${f.u8(T.type)}`);
  const nsec = f.u32(T.mtimeNsec) ?? 0;
  if (nsec > 999_999_999) throw new AgentError("AGENT_PROTOCOL", `${what}: mtime_nsec ${nsec}`);
  const info: FileInfo = {
    path: need(f.string(T.path), what, "path"),
    name: need(f.string(T.name), what, "name"),
    type,
    size: Number(need(f.u64(T.size), what, "size")),
    mode: need(f.u32(T.mode), what, "mode") & 0o7777,
    uid: need(f.u32(T.uid), what, "uid"),
    gid: need(f.u32(T.gid), what, "gid"),
    mtimeMs: Number(need(f.i64(T.mtimeSec), what, "mtime_sec")) * 1000 + nsec / 1e6,
  };
  const target = f.string(T.target);
  if (type === "symlink" && target !== undefined) info.symlinkTarget = target;
  return info;
}

/** One FS_WATCH record. */
export function dirEventOf(raw: Buffer): DirEvent {
  const f = new Fields(raw, "FS_WATCH event");
  const kind = KINDS[need(f.u8(Tag.fsEvent.kind), "FS_WATCH event", "kind")];
  if (!kind) throw new AgentError("AGENT_PROTOCOL", `FS_WATCH event: kind ${f.u8(Tag.fsEvent.kind)}`);
  return { type: kind, name: need(f.string(Tag.fsEvent.name), "FS_WATCH event", "name") };
}
