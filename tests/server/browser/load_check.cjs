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

const common = require("./common.cjs");

const { cfg, log } = common.setup("load_check");

const out = { console: [], pageErrors: [], loads: {} };

async function main() {
  return common.withBrowser(cfg, log, out, { launchTimeout: 90000 }, async (page) => {
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
  });
}

common.run("load_check", out, main, cfg.hardTimeoutMs || 240000);
