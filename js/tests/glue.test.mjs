// Static checks of the browser glue: every ./lib import resolves to an export, and nothing the browser
// would load (every .js under js/, served by WEB_DIRECTORY) is a test or imports from outside ComfyUI.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync, statSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const JS_DIR = join(dirname(fileURLToPath(import.meta.url)), "..");

function walk(dir) {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    if (n === "node_modules") return [];
    return statSync(p).isDirectory() ? walk(p) : [p];
  });
}

const IMPORT_RE = /import\s*\{([^}]*)\}\s*from\s*"([^"]+)"/g;

test("glue imports resolve to real exports of ./lib modules", async () => {
  const src = readFileSync(join(JS_DIR, "ddim_inversion.js"), "utf8");
  const imports = [...src.matchAll(IMPORT_RE)];
  assert.ok(imports.length >= 4);
  for (const [, names, spec] of imports) {
    if (spec.startsWith("../../scripts/")) continue; // ComfyUI's own frontend modules
    assert.match(spec, /^\.\/lib\/[a-z_]+\.js$/, `unexpected import ${spec}`);
    const mod = await import(pathToFileURL(join(JS_DIR, spec)).href);
    for (const name of names.split(",").map((s) => s.trim()).filter(Boolean)) {
      assert.equal(typeof mod[name], "function", `${spec} does not export ${name}`);
    }
  }
});

test("browser-served .js files are not tests and fetch nothing external", () => {
  for (const f of walk(JS_DIR).filter((p) => p.endsWith(".js"))) {
    const rel = relative(JS_DIR, f);
    assert.ok(!rel.startsWith("tests"), `${rel}: tests must be .mjs (every .js under js/ is loaded by the browser)`);
    const src = readFileSync(f, "utf8");
    assert.ok(!/https?:\/\//.test(src.replace(/http:\/\/www\.w3\.org\/2000\/svg/g, "")), `${rel} references an external URL`);
    assert.ok(!/\binnerHTML\b|\beval\(|new Function\(/.test(src), `${rel} uses innerHTML/eval`);
    for (const [, , spec] of src.matchAll(IMPORT_RE)) {
      assert.ok(spec.startsWith("./") || spec.startsWith("../../scripts/"), `${rel} imports ${spec}`);
    }
  }
});

test("every export of ./lib is used by the glue (code the tests cover is code the browser runs)", async () => {
  const src = readFileSync(join(JS_DIR, "ddim_inversion.js"), "utf8");
  const imported = new Set();
  for (const [, names, spec] of src.matchAll(IMPORT_RE)) {
    if (!spec.startsWith("./lib/")) continue;
    for (const n of names.split(",").map((x) => x.trim()).filter(Boolean)) imported.add(`${spec}:${n}`);
  }
  const libs = readdirSync(join(JS_DIR, "lib")).filter((n) => n.endsWith(".js"));
  assert.ok(libs.length >= 4);
  for (const lib of libs) {
    const mod = await import(pathToFileURL(join(JS_DIR, "lib", lib)).href);
    for (const name of Object.keys(mod)) {
      assert.ok(imported.has(`./lib/${lib}:${name}`), `./lib/${lib} exports ${name}, which ddim_inversion.js never imports`);
    }
  }
});
