#!/usr/bin/env node
// Browser check that example workflows load in the real ComfyUI frontend (no missing node types, no node in
// error, every widget value and link as saved). Driven by tests/server/test_browser.py:
//   node load_check.cjs <config.json>
// The config names:
//   url               ComfyUI server URL
//   chromium          Chromium executable
//   playwrightCore    path of the playwright-core package
//   readyType         a node type of the pack that must be registered before loading (the pack's nodes are in)
//   workflows         [{name, workflow}]: UI-format workflows, loaded one after the other with app.loadGraphData
//   hardTimeoutMs     the whole session's budget
// Prints one JSON object on stdout: per workflow what the frontend made of it (each node's type, whether the type
// is registered, has_errors, widget names, and the graph serialized back: widgets_values and links). The Python
// test makes the assertions. Exit 0 when the observations were gathered, 2 on a driver error ("driverError").
"use strict";

const fs = require("fs");
const os = require("os");
const path = require("path");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const log = (...a) => process.stderr.write(`[load_check ${new Date().toISOString().slice(11, 23)}] ${a.join(" ")}\n`);
const { chromium } = require(cfg.playwrightCore || "playwright-core");

const CHROMIUM_ARGS = [
  "--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-dev-shm-usage", "--mute-audio",
];

const out = { console: [], pageErrors: [], loads: {} };

async function main() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "ddiminv-chromium-"));
  let context;
  try {
    log("launching", cfg.chromium);
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: cfg.chromium, headless: true, args: CHROMIUM_ARGS,
      viewport: { width: 1400, height: 1000 }, timeout: 90000,
    });
    out.browserVersion = context.browser() ? context.browser().version() : null;
    const origin = new URL(cfg.url).origin;   // only the ComfyUI server: no outside requests
    await context.route((u) => u.origin !== origin && !u.protocol.startsWith("data") && !u.protocol.startsWith("blob"),
      (route) => route.abort("blockedbyclient"));
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(120000);
    page.on("console", (m) => out.console.push({ type: m.type(), text: m.text() }));
    page.on("pageerror", (e) => out.pageErrors.push({ message: String(e && e.message) }));

    const t0 = Date.now();
    // a loaded machine (2 shared cores) can take over a minute for the frontend's bundle: wait for the DOM only,
    // then for the app itself
    await page.goto(cfg.url, { waitUntil: "domcontentloaded", timeout: 150000 });
    await page.waitForFunction(({ type }) => {
      const app = window.app || window.comfyAPI?.app?.app;
      return !!(app && app.graph && app.canvas && window.LiteGraph?.registered_node_types?.[type]);
    }, { type: cfg.readyType }, { timeout: 150000, polling: 250 });
    out.readyMs = Date.now() - t0;
    log("UI ready in", out.readyMs, "ms");
    // the frontend may load its own default workflow after start-up: let it settle (a non-empty graph, or 5 s)
    await page.waitForFunction(() => {
      const app = window.app || window.comfyAPI?.app?.app;
      return ((app.graph.nodes || app.graph._nodes || []).length > 0);
    }, null, { timeout: 5000, polling: 100 }).catch(() => {});

    for (const { name, workflow } of cfg.workflows) {
      const want = workflow.nodes.map((n) => n.id).sort((a, b) => a - b);
      let seen = null;
      for (let k = 0; k < 3; k++) {     // reload when the frontend's own default workflow replaced ours
        seen = await page.evaluate(async ({ wf, name }) => {
          const app = window.app || window.comfyAPI.app.app;
          await app.loadGraphData(structuredClone(wf), true, true, name);
          await new Promise((r) => setTimeout(r, 1000));
          const g = app.graph;
          const nodes = g.nodes || g._nodes;
          const ser = g.serialize();
          return {
            ids: nodes.map((n) => n.id).sort((a, b) => a - b),
            nodes: nodes.map((n) => ({
              id: n.id, type: n.type, registered: !!window.LiteGraph.registered_node_types[n.type],
              hasErrors: !!n.has_errors, widgetNames: (n.widgets || []).map((w) => w.name),
              inputs: (n.inputs || []).map((i) => ({ name: i.name, link: i.link ?? null })),
            })),
            serialized: {
              nodes: ser.nodes.map((n) => ({ id: n.id, type: n.type, widgets_values: n.widgets_values ?? null })),
              links: ser.links,
            },
          };
        }, { wf: workflow, name });
        if (JSON.stringify(seen.ids) === JSON.stringify(want)) break;
      }
      out.loads[name] = seen;
      log("loaded", name, seen.nodes.length, "nodes");
    }
    out.totalMs = Date.now() - t0;
    return out;
  } finally {
    if (context) await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

const hardTimer = setTimeout(() => {
  out.driverError = "load_check: hard timeout";
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(3);
}, (cfg.hardTimeoutMs || 240000));
hardTimer.unref();

main().then(
  (res) => { process.stdout.write(JSON.stringify(res) + "\n"); process.exit(0); },
  (e) => {
    out.driverError = String((e && e.stack) || e);
    process.stdout.write(JSON.stringify(out) + "\n");
    process.exit(2);
  },
);
