import { describe, expect, it } from "vitest";
import { parseDockerRef } from "../../src/oci/docker-ref.js";

const D = "sha256:" + "ab".repeat(32);

describe("Docker reference grammar", () => {
  it.each([
    ["alpine", "docker.io", "library/alpine", "latest", undefined],
    ["alpine:3.20", "docker.io", "library/alpine", "3.20", undefined],
    ["library/alpine", "docker.io", "library/alpine", "latest", undefined],
    ["user/app:v1", "docker.io", "user/app", "v1", undefined],
    ["index.docker.io/library/alpine", "docker.io", "library/alpine", "latest", undefined],
    ["ghcr.io/owner/img:tag", "ghcr.io", "owner/img", "tag", undefined],
    ["localhost:5000/ns/name:tag", "localhost:5000", "ns/name", "tag", undefined],
    ["localhost/name", "localhost", "name", "latest", undefined],
    ["127.0.0.1:5000/a/b/c", "127.0.0.1:5000", "a/b/c", "latest", undefined],
    ["[::1]:5000/x", "[::1]:5000", "x", "latest", undefined],
    [`name@${D}`, "docker.io", "library/name", undefined, D],
    [`reg.example.com:443/a/b:t@${D}`, "reg.example.com:443", "a/b", "t", D],
    ["ns_x/a.b-c_d__e", "docker.io", "ns_x/a.b-c_d__e", "latest", undefined],
  ])("%s", (ref, registry, repository, tag, digest) => {
    expect(parseDockerRef(ref)).toMatchObject({ registry, repository, tag, digest });
  });

  it("builds the canonical form; the digest is kept beside the tag", () => {
    expect(parseDockerRef("alpine").canonical).toBe("docker.io/library/alpine:latest");
    expect(parseDockerRef(`busybox:1.36@${D}`).canonical).toBe(`docker.io/library/busybox:1.36@${D}`);
  });

  it.each([
    ["", /empty/],
    ["Alpine", /upper-case/],
    ["alpine:", /tag "" is not valid/],
    ["alpine:-bad", /tag "-bad"/],
    ["alpine@sha256:abc", /not a sha256 digest/],
    ["alpine@md5:zz!", /digest .* malformed/],
    ["foo//bar", /empty component/],
    ["foo/ba--r_", /component "ba--r_"/],
    ["local host/x", /white space/],
    ["host:99999/x", /port 99999/],
    [`a/${"b".repeat(260)}`, /longer than 255/],
  ])("refuses %j naming the bad part", (ref, why) => {
    let err: Error & { code?: string; message: string } = new Error("no error");
    try {
      parseDockerRef(ref);
    } catch (e) {
      err = e as typeof err;
    }
    expect(err.code).toBe("REF_INVALID");
    expect(err.message).toContain(JSON.stringify(ref));
    expect(err.message).toMatch(why);
  });
});
