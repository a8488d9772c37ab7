/**
 * The serve page: `/` is its HTML, `/ui/*` its script and styles, all built into `dist/web/` when
 * the package is built (scripts/build-web.mjs), so nothing comes from a CDN. The files are public
 * (they hold no data); everything the page shows comes from the `/v1` API with the key the user
 * types. A strict Content-Security-Policy keeps anything but the page's own script from running
 * where that key lives.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { FastifyInstance, FastifyReply } from "fastify";
import fastifyStatic from "@fastify/static";
import { packageRoot } from "../engine/artifacts.js";

/** Where the built page is (dist/web of the package). */
export const webDir = (): string => join(packageRoot(), "dist", "web");

export const PAGE_CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'";

/** Paths of the page, which need no key. */
export const isPagePath = (path: string): boolean => path === "/" || path === "/index.html" || path.startsWith("/ui/");

export function registerPage(app: FastifyInstance): void {
  const dir = webDir();
  const headers = (reply: FastifyReply) => {
    void reply.header("content-security-policy", PAGE_CSP).header("x-content-type-options", "nosniff").header("referrer-policy", "no-referrer");
  };
  if (!existsSync(join(dir, "index.html"))) {
    const missing = async (_req: unknown, reply: FastifyReply) =>
      reply.code(503).send({ code: 503, message: `the serve page is not built: ${join(dir, "index.html")} is missing`, errorCode: "SERVER_STARTING", hint: "run npm run build (or npm run setup) in the supermachine checkout" });
    app.get("/", missing);
    app.get("/ui/*", missing);
    return;
  }
  void app.register(fastifyStatic, {
    root: dir,
    prefix: "/ui/",
    index: false,
    // The page is rebuilt with the package; a reload after an upgrade must not run an old script.
    cacheControl: true,
    maxAge: 0,
    setHeaders: headers,
  });
  app.get("/", async (_req, reply) => {
    headers(reply);
    return reply.header("cache-control", "no-store").sendFile("index.html");
  });
}
