import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { RefError } from "../../src/errors.js";
import { parseImageRef } from "../../src/image/reference.js";

describe("parseImageRef", () => {
  it("parses oci: refs with and without a tag", () => {
    expect(parseImageRef("oci:/images/alpine")).toEqual({ kind: "oci", ref: "oci:/images/alpine", dir: "/images/alpine" });
    expect(parseImageRef("oci:/images/alpine:3.20")).toMatchObject({ dir: "/images/alpine", tag: "3.20" });
    expect(parseImageRef("oci:rel/dir:latest", "/work")).toMatchObject({ dir: join("/work", "rel/dir"), tag: "latest" });
    // A suffix that cannot be a tag stays part of the directory.
    expect(parseImageRef("oci:/a:b/c")).toEqual({ kind: "oci", ref: "oci:/a:b/c", dir: "/a:b/c" });
  });

  it("parses builtin refs", () => {
    expect(parseImageRef("builtin:busybox")).toEqual({ kind: "builtin", ref: "builtin:busybox", name: "busybox" });
    expect(() => parseImageRef("builtin:ubuntu")).toThrow(expect.objectContaining({ code: "REF_UNKNOWN_BUILTIN" }));
  });

  it("parses registry refs with Docker's defaults", () => {
    expect(parseImageRef("alpine:latest")).toMatchObject({ kind: "registry", registry: { canonical: "docker.io/library/alpine:latest" } });
    expect(parseImageRef("docker://ghcr.io/o/i:1")).toMatchObject({ kind: "registry", registry: { registry: "ghcr.io", repository: "o/i", tag: "1" } });
  });

  it("parses docker-archive refs with and without a name", () => {
    expect(parseImageRef("docker-archive:/x/img.tar")).toEqual({ kind: "docker-archive", ref: "docker-archive:/x/img.tar", file: "/x/img.tar" });
    expect(parseImageRef("docker-archive:rel.tar:busybox:latest", "/w")).toMatchObject({ file: "/w/rel.tar", name: "busybox:latest" });
    expect(() => parseImageRef("docker-archive:/x/img.tar:Bad Name")).toThrow(expect.objectContaining({ code: "REF_INVALID" }));
  });

  it("refuses unknown transports, naming the accepted forms", () => {
    let err: unknown;
    try {
      parseImageRef("gopher://host/img");
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(RefError);
    expect(err).toMatchObject({ code: "REF_UNSUPPORTED" });
    expect((err as RefError).message).toContain('"gopher://host/img"');
    expect((err as RefError).hint).toContain("oci:<dir>[:<tag>]");
  });

  it("refuses oci: without a directory", () => {
    expect(() => parseImageRef("oci:")).toThrow(expect.objectContaining({ code: "REF_INVALID" }));
  });
});
