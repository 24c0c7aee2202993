#!/usr/bin/env node
// Browser check of the Trajectory Preview viewer (js/ddim_inversion.js) in the real ComfyUI frontend.
//
// Driven by tests/server/test_browser.py:  node viewer_check.cjs <config.json>
// Uses playwright-core (no bundled browser; the system Chromium via executablePath). The config names:
//   url               ComfyUI server URL
//   chromium          Chromium executable
//   playwrightCore    path of the playwright-core package (or "playwright-core" to resolve via NODE_PATH)
//   screenshot        PNG path for the page screenshot
//   workflow          UI-format workflow (app.loadGraphData) -- or --
//   apiWorkflow       API-format prompt (app.loadApiJson)
//   patches           [{type, widget, value}]: widget values to set (by node type and widget name) after loading
//   previewType       node type of the viewer node (DDIMInvTrajectoryPreview)
//   extensionName     the registerExtension name ("ddim_inversion.TrajectoryPreview")
//   extensionPath     URL path prefix of the pack's web files ("/extensions/ddim-inversion/")
//   timeoutMs         overall budget for the execution wait
// Prints one JSON object (the observations) on stdout; the Python test makes the assertions. Progress and
// diagnostics go to stderr. Exit code 0 when the observations were gathered (even if they show a failure),
// 2 on a driver error (the JSON then has "driverError").
"use strict";

const fs = require("fs");
const path = require("path");

const common = require("./common.cjs");

const { cfg, log } = common.setup("viewer_check");

const out = {
  console: [], pageErrors: [], failedRequests: [], extensionRequests: [], steps: [],
};

async function main() {
  const timeoutMs = cfg.timeoutMs || 120000;
  const onBlocked = () => { out.blockedRequests = (out.blockedRequests || 0) + 1; };
  return common.withBrowser(cfg, log, out, { launchTimeout: 60000, onBlocked }, async (page) => {
    page.setDefaultTimeout(60000);

    page.on("console", (m) => {
      const loc = m.location() || {};
      out.console.push({ type: m.type(), text: m.text(), url: loc.url || "", line: loc.lineNumber ?? null });
    });
    page.on("pageerror", (e) => out.pageErrors.push({ message: String(e && e.message), stack: String(e && e.stack) }));
    page.on("requestfailed", (r) => out.failedRequests.push({ url: r.url(), error: (r.failure() || {}).errorText || "" }));
    page.on("response", (r) => {
      const u = r.url();
      if (u.includes(cfg.extensionPath)) out.extensionRequests.push({ url: u, status: r.status() });
      if (r.status() >= 400) out.failedRequests.push({ url: u, error: `HTTP ${r.status()}` });
    });

    const t0 = Date.now();
    await page.goto(cfg.url, { waitUntil: "load" });
    // the app is ready when the graph exists, our node type is registered and our extension is loaded
    await page.waitForFunction(
      ({ type, ext }) => {
        const app = window.app || window.comfyAPI?.app?.app;
        return !!(app && app.graph && app.canvas && window.LiteGraph?.registered_node_types?.[type] &&
          (app.extensions || []).some((e) => e && e.name === ext));
      },
      { type: cfg.previewType, ext: cfg.extensionName },
      { timeout: 90000, polling: 250 },
    );
    out.steps.push({ step: "ui-ready", ms: Date.now() - t0 });
    log("UI ready in", Date.now() - t0, "ms");

    // newer frontends (1.49) load their own default workflow asynchronously after start-up, which can
    // replace ours: let that settle first (a non-empty graph, or 5 s), and reload ours if it was replaced
    await page.waitForFunction(() => {
      const app = window.app || window.comfyAPI?.app?.app;
      return ((app.graph.nodes || app.graph._nodes || []).length > 0);
    }, null, { timeout: 5000, polling: 100 }).catch(() => {});
    const loadOnce = async () => page.evaluate(async ({ workflow, apiWorkflow, type }) => {
      const app = window.app || window.comfyAPI.app.app;
      if (apiWorkflow) await app.loadApiJson(apiWorkflow, "ddiminv_browser_test.json");
      else await app.loadGraphData(workflow, true, true, "ddiminv_browser_test");
      await new Promise((r) => setTimeout(r, 1000));
      return (app.graph.nodes || app.graph._nodes).some((n) => n.type === type);
    }, { workflow: cfg.workflow || null, apiWorkflow: cfg.apiWorkflow || null, type: cfg.previewType });
    out.loadAttempts = 0;
    for (let k = 0; k < 3; k++) {
      out.loadAttempts += 1;
      if (await loadOnce()) break;
    }

    // patch widgets by node type + widget name, look at the viewer before execution
    out.loaded = await page.evaluate(async ({ patches, type }) => {
      const app = window.app || window.comfyAPI.app.app;
      const nodes = app.graph.nodes || app.graph._nodes;
      const patched = [];
      const missing = [];
      for (const p of patches) {
        const targets = nodes.filter((n) => n.type === p.type);
        let hit = false;
        for (const n of targets) {
          const w = (n.widgets || []).find((x) => x.name === p.widget);
          if (!w) continue;
          w.value = p.value;
          if (typeof w.callback === "function") { try { w.callback(p.value); } catch (e) { /* ignore */ } }
          hit = true;
          patched.push({ id: n.id, type: n.type, widget: p.widget, value: w.value });
        }
        if (!hit) missing.push(p);
      }
      const previews = nodes.filter((n) => n.type === type);
      const node = previews[0];
      const widget = node ? (node.widgets || []).find((w) => w.name === "ddim_trajectory_viewer") : null;
      const root = widget ? widget.element : null;
      app.graph.setDirtyCanvas(true, true);
      return {
        nodeCount: nodes.length,
        types: nodes.map((n) => n.type),
        previewCount: previews.length,
        previewId: node ? node.id : null,
        patched, missing,
        viewerWidget: !!widget,
        viewerSerialize: widget ? widget.serialize ?? widget.options?.serialize ?? null : null,
        rootClass: root ? root.className : null,
        rootIsDdimViewer: !!(root && node.ddimViewer && node.ddimViewer.root === root),
        headerBefore: root ? root.firstChild.textContent : null,
        sliderDisabledBefore: root ? root.querySelector('input[type="range"]').disabled : null,
      };
    }, { patches: cfg.patches || [], type: cfg.previewType });
    log("loaded:", JSON.stringify(out.loaded));
    if (!out.loaded.previewId) throw new Error(`no ${cfg.previewType} node after loading the workflow`);

    // queue; watch the API's events for the outcome
    const t1 = Date.now();
    out.queue = await page.evaluate(async () => {
      const app = window.app || window.comfyAPI.app.app;
      const api = window.comfyAPI?.api?.api || app.api;
      window.__ddimEvents = [];
      for (const ev of ["execution_start", "executed", "execution_error", "execution_success",
        "execution_interrupted"]) {
        api.addEventListener(ev, (e) => window.__ddimEvents.push({ ev, detail: e.detail }));
      }
      try {
        const r = await app.queuePrompt(0, 1);
        return { ok: true, result: r === undefined ? null : r };
      } catch (e) {
        return { ok: false, error: String(e && (e.stack || e.message || e)) };
      }
    });
    log("queued:", JSON.stringify(out.queue));

    // wait for the viewer to be filled (or for an execution error)
    const previewId = out.loaded.previewId;
    const waited = await page.waitForFunction(({ id }) => {
      const app = window.app || window.comfyAPI.app.app;
      const ev = window.__ddimEvents || [];
      if (ev.some((e) => e.ev === "execution_error" || e.ev === "execution_interrupted")) return "error";
      const node = app.graph.getNodeById(id);
      const root = node?.ddimViewer?.root;
      return root && root.dataset.frames ? "filled" : false;
    }, { id: previewId }, { timeout: timeoutMs, polling: 200 }).then((h) => h.jsonValue()).catch((e) => `timeout: ${e.message}`);
    out.waitResult = waited;
    out.executeMs = Date.now() - t1;
    const readEvents = () => page.evaluate(() => (window.__ddimEvents || []).map((e) => ({
      ev: e.ev,
      node: e.detail?.node ?? e.detail?.node_id ?? null,
      // execution_error carries the exception; executed the UI output (keep it small)
      error: e.ev === "execution_error" ? { type: e.detail?.exception_type, message: e.detail?.exception_message,
        node_type: e.detail?.node_type } : undefined,
      outputKeys: e.ev === "executed" && e.detail?.output ? Object.keys(e.detail.output) : undefined,
      trajectoryFrames: e.ev === "executed" && e.detail?.output?.ddim_trajectory
        ? e.detail.output.ddim_trajectory[0]?.frames?.length : undefined,
    })));
    out.events = await readEvents();
    log("wait:", waited, "in", out.executeMs, "ms");
    if (waited !== "filled") {
      await page.screenshot({ path: cfg.screenshot }).catch(() => {});
      return out;
    }

    // let the rest of the workflow finish, so the screenshot shows a finished run
    out.finished = await page.waitForFunction(() => {
      const ev = window.__ddimEvents || [];
      if (ev.some((e) => e.ev === "execution_error" || e.ev === "execution_interrupted")) return "error";
      return ev.some((e) => e.ev === "execution_success") ? "success" : false;
    }, null, { timeout: Math.max(5000, timeoutMs - (Date.now() - t1)), polling: 200 })
      .then((h) => h.jsonValue()).catch((e) => `timeout: ${e.message}`);
    out.finishMs = Date.now() - t1;
    log("finished:", out.finished, "in", out.finishMs, "ms");
    out.events = await readEvents();

    // bring the node into view at zoom 1 so the DOM widget is shown, then measure it against the node
    await page.evaluate(({ id }) => {
      const app = window.app || window.comfyAPI.app.app;
      const node = app.graph.getNodeById(id);
      app.canvas.ds.scale = 1;
      app.canvas.centerOnNode(node);
      app.canvas.selectNode?.(node);
      app.graph.setDirtyCanvas(true, true);
      app.canvas.draw?.(true, true);
    }, { id: previewId });
    await page.waitForTimeout(500);

    const readState = ({ id }) => {
      const app = window.app || window.comfyAPI.app.app;
      const node = app.graph.getNodeById(id);
      const root = node.ddimViewer.root;
      const slider = root.querySelector('input[type="range"]');
      const img = root.querySelector("img");
      const label = root.querySelector(".ddim-frame-label");
      const marker = root.querySelector("svg line");
      const pathEl = root.querySelector("svg path");
      return {
        sliderMin: slider.min, sliderMax: slider.max, sliderValue: slider.value, sliderDisabled: slider.disabled,
        label: label.textContent, header: root.firstChild.textContent,
        figure: root.querySelector(".ddim-figure-label")?.textContent ?? null,  // by class: the clip controls sit between
        imgSrc: img.getAttribute("src"), imgDisplay: img.style.display,
        imgComplete: img.complete, imgNatural: [img.naturalWidth, img.naturalHeight],
        dataFrame: root.dataset.frame, dataStep: root.dataset.step, dataFrames: root.dataset.frames,
        markerX: marker ? marker.getAttribute("x1") : null,
        plotPath: pathEl ? pathEl.getAttribute("d") : null,
      };
    };
    const waitImage = () => page.waitForFunction(({ id }) => {
      const app = window.app || window.comfyAPI.app.app;
      const img = app.graph.getNodeById(id).ddimViewer.root.querySelector("img");
      return img.complete && img.naturalWidth > 0;
    }, { id: previewId }, { timeout: 20000 }).then(() => true).catch(() => false);

    out.imageLoaded0 = await waitImage();
    out.initial = await page.evaluate(readState, { id: previewId });

    // where is the viewer on screen, compared with the node's box on the canvas?
    out.geometry = await page.evaluate(({ id }) => {
      const app = window.app || window.comfyAPI.app.app;
      const node = app.graph.getNodeById(id);
      const root = node.ddimViewer.root;
      const c = app.canvas.canvas.getBoundingClientRect();
      const dpr = window.devicePixelRatio || 1;
      const title = window.LiteGraph?.NODE_TITLE_HEIGHT || 30;
      const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
      const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
      const nodeRect = { left: c.left + x0 / dpr, top: c.top + y0 / dpr, right: c.left + x1 / dpr, bottom: c.top + y1 / dpr };
      const r = root.getBoundingClientRect();
      const cs = getComputedStyle(root);
      let hiddenBy = null;
      for (let e = root; e; e = e.parentElement) {
        const s = getComputedStyle(e);
        if (s.display === "none" || s.visibility === "hidden") { hiddenBy = e.tagName + "." + e.className; break; }
      }
      const box = (e) => {
        const b = e.getBoundingClientRect();
        return { left: b.left, top: b.top, right: b.right, bottom: b.bottom, width: b.width, height: b.height };
      };
      const parts = {};
      for (const [k, sel] of [["img", "img"], ["slider", "input[type=range]"], ["label", ".ddim-frame-label"],
        ["plot", "svg"]]) {
        const e = root.querySelector(sel);
        if (e) parts[k] = box(e);
      }
      const inside = (b) => b.left >= nodeRect.left - 1 && b.right <= nodeRect.right + 1 &&
        b.top >= nodeRect.top - 1 && b.bottom <= nodeRect.bottom + 1;
      const partsOutsideNode = Object.entries(parts).filter(([, b]) => !inside(b)).map(([k]) => k);
      const widgets = (node.widgets || []).map((w) => ({
        name: w.name, type: w.type, y: w.y ?? w.last_y ?? null, computedHeight: w.computedHeight ?? null,
      }));
      const cx = (r.left + r.right) / 2;
      const cy = (r.top + r.bottom) / 2;
      const hit = document.elementFromPoint(cx, Math.min(r.bottom - 2, r.top + 40));
      return {
        connected: root.isConnected,
        viewerRect: { left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width, height: r.height },
        nodeRect, nodeSize: [node.size[0], node.size[1]],
        hiddenBy, opacity: cs.opacity,
        parts, partsOutsideNode, widgets, nodeImgs: (node.imgs || []).length,
        rootScroll: [root.scrollHeight, root.clientHeight],
        centerInsideNode: cx >= nodeRect.left && cx <= nodeRect.right && cy >= nodeRect.top && cy <= nodeRect.bottom,
        topmostAtViewerIsOurs: !!(hit && root.contains(hit)),
        topmostTag: hit ? hit.tagName + "." + (hit.className?.baseVal ?? hit.className) : null,
      };
    }, { id: previewId });

    // scrub 1: set the value and dispatch 'input' (what a drag does)
    const scrubTo = (value) => page.evaluate(({ id, value }) => {
      const app = window.app || window.comfyAPI.app.app;
      const slider = app.graph.getNodeById(id).ddimViewer.root.querySelector('input[type="range"]');
      slider.value = String(value);
      slider.dispatchEvent(new Event("input", { bubbles: true }));
    }, { id: previewId, value });
    const max = Number(out.initial.sliderMax);
    await scrubTo(max);
    out.imageLoadedLast = await waitImage();
    out.afterScrubLast = await page.evaluate(readState, { id: previewId });
    const mid = Math.floor(max / 2);
    await scrubTo(mid);
    out.afterScrubMid = await page.evaluate(readState, { id: previewId });

    // scrub 2: keyboard on the focused range input (Home, then ArrowRight) -- the real input path
    const sliderLoc = page.locator(".ddim-trajectory-viewer input[type=range]").first();
    try {
      await sliderLoc.focus({ timeout: 5000 });
      await page.keyboard.press("Home");
      out.afterKeyHome = await page.evaluate(readState, { id: previewId });
      await page.keyboard.press("ArrowRight");
      out.afterKeyRight = await page.evaluate(readState, { id: previewId });
    } catch (e) {
      out.keyboardError = String(e.message || e);
    }

    // scrub 3: a real mouse click near the right end of the range input (pointer events reach the widget?)
    try {
      const box = await sliderLoc.boundingBox({ timeout: 5000 });
      if (box) {
        await page.mouse.click(box.x + box.width - 3, box.y + box.height / 2);
        await page.waitForTimeout(200);
        out.afterMouseEnd = await page.evaluate(readState, { id: previewId });
        out.sliderBox = box;
      }
    } catch (e) {
      out.mouseError = String(e.message || e);
    }

    // leave a middle frame shown for the screenshot
    await scrubTo(mid);
    await waitImage();
    await page.evaluate(() => {
      const app = window.app || window.comfyAPI.app.app;
      app.graph.setDirtyCanvas(true, true);
    });
    await page.waitForTimeout(300);
    fs.mkdirSync(path.dirname(cfg.screenshot), { recursive: true });
    await page.screenshot({ path: cfg.screenshot });
    out.screenshot = cfg.screenshot;
    out.totalMs = Date.now() - t0;
    return out;
  });
}

common.run("viewer_check", out, main, cfg.hardTimeoutMs || 170000);
