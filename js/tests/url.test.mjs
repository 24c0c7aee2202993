import { test } from "node:test";
import assert from "node:assert/strict";
import { viewURL } from "../lib/url.js";

test("builds an encoded /view URL", () => {
  const u = viewURL({ filename: "ComfyUI_temp_abc_00001_.png", subfolder: "", type: "temp" });
  assert.equal(u, "/view?filename=ComfyUI_temp_abc_00001_.png&type=temp&subfolder=");
});

test("encodes every component", () => {
  const u = viewURL({ filename: "a b&c=d?.png", subfolder: "x/y#z", type: "output" });
  assert.equal(u, "/view?filename=a%20b%26c%3Dd%3F.png&type=output&subfolder=x%2Fy%23z");
});

test("uses apiURL (base path) and stays same-origin", () => {
  assert.equal(viewURL({ filename: "f.png", subfolder: "", type: "temp" }, (p) => "/comfy" + p),
    "/comfy/view?filename=f.png&type=temp&subfolder=");
  assert.equal(viewURL({ filename: "f.png", type: "temp" }, (p) => "https://evil.example" + p), null);
  assert.equal(viewURL({ filename: "f.png", type: "temp" }, (p) => "//evil.example" + p), null);
});

test("rejects invalid images", () => {
  assert.equal(viewURL(null), null);
  assert.equal(viewURL({}), null);
  assert.equal(viewURL({ filename: "" }), null);
  assert.equal(viewURL({ filename: "f.png", type: "javascript" }), null);
  assert.equal(viewURL({ filename: 3, type: "temp" }), null);
  assert.equal(viewURL({ filename: "f.png" }), "/view?filename=f.png&type=output&subfolder=");
});
