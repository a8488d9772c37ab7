/**
 * The E2B profile's envd REST surface: `GET /health` (204 while the sandbox's VM runs), and
 * `GET`/`POST /files` for reading and writing whole files. A read streams the guest file (flow
 * controlled, no size cap); a write takes `multipart/form-data` (one part per file; a part's
 * filename is its path when `path` is absent) or, as envd 0.5.7+ does, `application/octet-stream`
 * with `path`, optionally gzip-compressed (`Content-Encoding: gzip`). Relative paths resolve
 * against the user's home, and written files belong to the user.
 */
import { posix } from "node:path";
import { createGunzip } from "node:zlib";
import type { Readable } from "node:stream";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import type {} from "@fastify/multipart";
import type { Sandbox } from "../sandboxes.js";
import { ServerError } from "../errors.js";
import { guestPathFor, resolveUser, userFromHeader } from "./guest.js";

export interface FilesDeps {
  /** The sandbox an envd request was routed to (by the server's routing hook). */
  sandboxOf: (req: FastifyRequest) => Sandbox;
}

interface FilesQuery {
  path?: string;
  username?: string;
}

async function target(req: FastifyRequest<{ Querystring: FilesQuery }>, sb: Sandbox, path: string | undefined) {
  const user = await resolveUser(sb, req.query.username || userFromHeader(req.headers.authorization));
  return { user, path: guestPathFor(user, path) };
}

const written = (path: string) => ({ path, name: posix.basename(path), type: "file" });

export function registerEnvdFiles(app: FastifyInstance, deps: FilesDeps): void {
  app.get<{ Querystring: FilesQuery }>("/files", async (req, reply) => {
    const sb = deps.sandboxOf(req);
    if (!req.query.path) throw new ServerError("SERVER_BAD_REQUEST", "GET /files needs ?path=", { hint: "name the file to read" });
    const { path } = await target(req, sb, req.query.path);
    const stream = await sb.vm.readFileStream(path);
    return reply.type("application/octet-stream").send(stream);
  });

  app.post<{ Querystring: FilesQuery }>("/files", async (req, reply) => {
    const sb = deps.sandboxOf(req);
    const results: ReturnType<typeof written>[] = [];
    if (req.isMultipart()) {
      for await (const part of req.parts()) {
        if (part.type !== "file") continue;
        const { user, path } = await target(req, sb, req.query.path || part.filename);
        await sb.vm.writeFileStream(path, part.file, { user: `${user.uid}:${user.gid}` });
        results.push(written(path));
      }
    } else {
      if (!req.query.path) throw new ServerError("SERVER_BAD_REQUEST", "POST /files with an octet-stream body needs ?path=", { hint: "name the file to write, or send multipart/form-data" });
      const { user, path } = await target(req, sb, req.query.path);
      let body = req.body as Readable;
      const encoding = String(req.headers["content-encoding"] ?? "identity").toLowerCase();
      if (encoding === "gzip") body = body.pipe(createGunzip());
      else if (encoding !== "identity") throw new ServerError("SERVER_BAD_REQUEST", `Content-Encoding ${JSON.stringify(encoding)} is not accepted`, { hint: "send the file as is or gzip-compressed" });
      await sb.vm.writeFileStream(path, body, { user: `${user.uid}:${user.gid}` });
      results.push(written(path));
    }
    return reply.code(200).send(results);
  });
}

/** Answers an envd `GET /health`: 204 while the sandbox's VM runs, 502 once it is gone. */
export function envdHealth(sb: Sandbox, reply: FastifyReply): FastifyReply {
  return sb.vm.isReleased || !sb.vm.machine.alive ? reply.code(502).send({ code: 502, message: `sandbox ${sb.id} is gone` }) : reply.code(204).send();
}
