/**
 * The schemas of config files: an image definition (a defineImage module) and
 * supermachine.config.ts. Their fields are the option table's (./options.ts: Image.build,
 * image.pool), so a field accepts the same values with the same messages. Nothing here applies a
 * default: a child image inherits from its parent, so the graph resolves build options, and
 * image.pool resolves pool options.
 */
import { z } from "zod";
import { buildDeclarationFields, poolDeclarationFields, poolSchema } from "./options.js";
import { checkExtraFiles, intIn } from "./fields.js";
import type { ImageBase, ImageDefinition, ImageDefinitionFn, ImageDecl, PoolDeclaration } from "./project.js";

/** Image names: the rule of Image.build's `name`, so a name can also name a snapshot directory. */
export const IMAGE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const IMAGE_NAME_TEXT = "[A-Za-z0-9][A-Za-z0-9._-]* (at most 128 characters)";
export const POOL_NAME = /^[A-Za-z_][A-Za-z0-9_-]*$/;

/**
 * Pool names that would shadow a member of the pools object the runtime returns (`pools.close()`,
 * a `then` that makes it a thenable, Object.prototype's members). One list: extend it here.
 */
export const RESERVED_POOL_NAMES: readonly string[] = [
  ...new Set(["close", "then", "catch", "finally", ...Object.getOwnPropertyNames(Object.prototype)]),
].sort();

/** An object literal (not an array, a class instance or an object with another prototype). */
export function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (v === null || typeof v !== "object") return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

/** What defineImage returns: an object, or a function of the environment returning one. */
export function isDefinitionLike(v: unknown): v is ImageDefinition | ImageDefinitionFn {
  return isPlainObject(v) || typeof v === "function";
}

// ---- image definitions -------------------------------------------------------------------------

const buildFields = buildDeclarationFields;

const fromSchema = z
  .custom<ImageBase>((v) => (typeof v === "string" ? IMAGE_NAME.test(v) : isDefinitionLike(v)), {
    error: (iss) =>
      typeof iss.input === "string"
        ? `must be the name of an image of this project, ${IMAGE_NAME_TEXT}`
        : "must be an imported image definition (another image module's default export) or an image name",
    params: { hint: 'from builds on another image of the project (import its module, or give its name); to start from an OCI image, use ref (for example ref: "python:3-bookworm")' },
  })
  .optional();

export const imageDefinitionSchema = z
  .object({ ...buildFields, from: fromSchema })
  .strict()
  .superRefine((o, ctx) => {
    if (o.ref !== undefined && o.from !== undefined) {
      ctx.addIssue({
        code: "custom",
        path: ["from"],
        input: o.from,
        message: "cannot be combined with ref (an image starts either from an image reference or from another image of the project)",
        params: { hint: "keep ref to start from the reference, or from to build on the parent image's snapshot" },
      });
    } else if (o.ref === undefined && o.from === undefined) {
      ctx.addIssue({
        code: "custom",
        path: ["ref"],
        message: "is required when there is no from",
        params: { hint: 'set ref (for example ref: "python:3-bookworm"), or from: another image of the project (its imported definition or its name)' },
      });
    }
    checkExtraFiles(o.extraFiles, ctx);
  });

// The loader's ImageDecl is this schema's output without `from`: keep the two in step.
((d: Omit<z.output<typeof imageDefinitionSchema>, "from">): ImageDecl => d) satisfies unknown;

// ---- supermachine.config.ts --------------------------------------------------------------------

const poolFields = poolDeclarationFields;

export const poolDeclarationSchema = z
  .object({
    image: z
      .string({ error: "must be the name of an image of the project (a string)" })
      .regex(IMAGE_NAME, { error: `must be the name of an image of the project, ${IMAGE_NAME_TEXT}` }),
    ...poolFields,
  })
  .strict()
  .superRefine((o, ctx) => {
    // The cross-field checks of image.pool (min <= max), on what was set.
    const { image: _image, ...options } = o;
    const r = poolSchema.safeParse(options);
    if (!r.success) for (const issue of r.error.issues) ctx.addIssue(issue as z.core.$ZodRawIssue);
  });

const poolName = z
  .string()
  .regex(POOL_NAME, { error: "must match [A-Za-z_][A-Za-z0-9_-]*" })
  .refine((n) => !RESERVED_POOL_NAMES.includes(n), {
    error: "is a reserved name: it would shadow a member of the pools object",
    params: { hint: `pick another pool name; reserved: ${RESERVED_POOL_NAMES.join(", ")}` },
  });

const globList = z.array(
  z.string({ error: "must be a glob pattern of image modules (a string)" }).min(1, { error: "must be a glob pattern of image modules, not empty" }),
);
const imageRecord = z.record(
  z.string().regex(IMAGE_NAME, { error: `is not a valid image name: ${IMAGE_NAME_TEXT}` }),
  z.custom<ImageDefinition | ImageDefinitionFn>(isDefinitionLike, { error: "must be an image definition: defineImage({ ... }) or a function returning one" }),
);

// A union would report both branches' complaints; pick the branch by the value's shape instead.
const imagesSchema = z
  .custom<string[] | Record<string, ImageDefinition | ImageDefinitionFn>>((v) => Array.isArray(v) || isPlainObject(v), {
    error: "must be an array of glob patterns of image modules, or a record of image name → definition",
    params: { hint: 'for example images: ["./sandboxes/*.ts"], or images: { python: defineImage({ ref: "python:3" }) }' },
  })
  .superRefine((v, ctx) => {
    const r = (Array.isArray(v) ? globList : imageRecord).safeParse(v);
    if (!r.success) for (const issue of r.error.issues) ctx.addIssue(issue as z.core.$ZodRawIssue);
  });

export const configSchema = z
  .object({
    images: imagesSchema,
    pools: z
      .record(poolName, poolDeclarationSchema, {
        error: (iss) => (iss.code === "invalid_type" ? "must be an object of pool name → { image, min?, max?, ... }" : undefined),
      })
      .optional(),
    snapshotsDir: buildFields.snapshotsDir,
    concurrency: intIn(1, 1024).optional(),
    cache: z
      .object({
        from: z.string({ error: "must be a directory or a registry repository host[:port]/repo (a string)" }).min(1, { error: "must not be empty" }).optional(),
        to: z.string({ error: "must be a directory or a registry repository host[:port]/repo (a string)" }).min(1, { error: "must not be empty" }).optional(),
        trust: z
          .union([z.literal("unsigned"), z.array(z.string().regex(/^ed25519:[A-Za-z0-9+/]{43}=$/, { error: 'must be a public key as `supermachine cache keygen` prints it ("ed25519:<base64>")' })).max(64)], {
            error: 'must be a list of public keys ("ed25519:<base64>") or "unsigned"',
          })
          .optional(),
        signingKey: z.string({ error: "must be the path of an ed25519 private key file (a string)" }).min(1, { error: "must not be empty" }).optional(),
      })
      .strict()
      .optional(),
  })
  .strict();

// PoolDeclaration is what a pool entry validates to: keep the two in step.
((p: z.output<typeof poolDeclarationSchema>): PoolDeclaration => p) satisfies unknown;
