/**
 * The native API's OpenAPI 3.1 document, generated from the route table and the zod schemas of
 * schemas.ts (zod's JSON Schema output is draft 2020-12, which OpenAPI 3.1 uses as is). Served
 * at `GET /openapi.json`. WebSocket routes appear as GET operations answering 101, with their
 * framing described in text and the message schemas under components.
 */
import { z } from "zod";
import { ROUTES, clientControl, errorBody, serverControl, startMessage, type RouteSpec } from "./schemas.js";

type Json = Record<string, unknown>;

const schemaOf = (t: z.ZodType, io: "input" | "output"): Json => {
  const { $schema: _drop, ...rest } = z.toJSONSchema(t, { io, unrepresentable: "any", target: "draft-2020-12" }) as Json;
  return rest;
};

const openApiPath = (path: string): string => path.replace(/:([A-Za-z]+)/g, "{$1}");

/** Path and query parameters of a route, from its object schemas. */
function parameters(route: RouteSpec): Json[] {
  const out: Json[] = [];
  const add = (t: z.ZodType | undefined, where: "path" | "query") => {
    if (!t) return;
    const js = schemaOf(t, "input");
    const props = (js.properties ?? {}) as Record<string, Json>;
    const required = new Set((js.required ?? []) as string[]);
    for (const [name, schema] of Object.entries(props)) out.push({ name, in: where, required: where === "path" || required.has(name), schema });
    if (where === "query" && !js.properties && js.additionalProperties) {
      out.push({ name: "filters", in: "query", required: false, style: "form", explode: true, schema: { type: "object", additionalProperties: { type: "string" } } });
    }
  };
  add(route.params, "path");
  add(route.query, "query");
  const named = new Set(out.filter((p) => p.in === "path").map((p) => p.name));
  for (const m of route.path.matchAll(/:([A-Za-z]+)/g)) {
    if (!named.has(m[1])) out.push({ name: m[1], in: "path", required: true, schema: { type: "string" } });
  }
  return out;
}

const ERROR = { description: "An error: the library's code in errorCode, with a hint", content: { "application/json": { schema: { $ref: "#/components/schemas/Error" } } } };

function operation(route: RouteSpec): Json {
  const responses: Json = {};
  const r = route.response;
  if (route.websocket) {
    responses["101"] = { description: "Switching to the WebSocket protocol (see the description for the framing)" };
  } else if (r.sse) {
    responses[String(r.status)] = { description: `Server-Sent Events: ${r.sse}`, content: { "text/event-stream": { schema: { type: "string" } } } };
  } else if (r.text) {
    responses[String(r.status)] = { description: "Plain text", content: { "text/plain": { schema: { type: "string" } } } };
  } else if (r.raw) {
    responses[String(r.status)] = { description: "The bytes", content: { "application/octet-stream": { schema: { type: "string", contentMediaType: "application/octet-stream" } } } };
  } else if (r.schema) {
    responses[String(r.status)] = { description: "OK", content: { "application/json": { schema: schemaOf(r.schema, "output") } } };
  } else {
    responses[String(r.status)] = { description: "Done" };
  }
  responses["4XX"] = ERROR;
  responses["5XX"] = ERROR;
  const op: Json = {
    operationId: `${route.method.toLowerCase()}${route.path.replace(/^\/v1/, "").replace(/\/:?([a-z])/gi, (_m, c: string) => c.toUpperCase()).replace(/[^A-Za-z]/g, "")}`,
    summary: route.summary,
    parameters: parameters(route),
    responses,
    ...(route.open ? { security: [] } : {}),
  };
  if (route.websocket) {
    op.description =
      "Upgrade with `Connection: Upgrade` and `Upgrade: websocket`. Binary frames: one byte naming the stream (0 stdin, 1 stdout, 2 stderr) then the bytes. " +
      "Text frames: JSON control messages (components StartMessage, ClientControl, ServerControl). TCP sockets carry the connection's bytes as binary frames and `{\"type\":\"end\"}` as a half-close.";
  }
  if (route.body) op.requestBody = { required: true, content: { "application/json": { schema: schemaOf(route.body, "input") } } };
  if (route.rawBody) op.requestBody = { required: true, content: { "application/octet-stream": { schema: { type: "string", contentMediaType: "application/octet-stream" } } } };
  return op;
}

let cached: Json | undefined;

export function openApiDocument(): Json {
  if (cached) return cached;
  const paths: Record<string, Json> = {};
  for (const route of ROUTES) {
    const p = (paths[openApiPath(route.path)] ??= {});
    p[route.method.toLowerCase()] = operation(route);
  }
  cached = {
    openapi: "3.1.0",
    info: {
      title: "supermachine serve: native API",
      version: "1",
      description: "A project's pools over HTTP (docs/serve.md). Every /v1 route but GET /v1/node needs an API key in X-API-KEY or Authorization: Bearer.",
    },
    jsonSchemaDialect: "https://json-schema.org/draft/2020-12/schema",
    components: {
      securitySchemes: { apiKey: { type: "apiKey", in: "header", name: "X-API-KEY" }, bearer: { type: "http", scheme: "bearer" } },
      schemas: {
        Error: schemaOf(errorBody, "output"),
        StartMessage: schemaOf(startMessage, "input"),
        ClientControl: schemaOf(clientControl, "input"),
        ServerControl: schemaOf(serverControl, "output"),
      },
    },
    security: [{ apiKey: [] }, { bearer: [] }],
    paths,
  };
  return cached;
}
