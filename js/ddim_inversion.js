// ddim-inversion: in-node viewer for "Trajectory Preview" (DDIMInvTrajectoryPreview).
// Thin glue only: parsing, formatting, URL building and plot scaling live in ./lib (tested with node --test).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { parseTrajectoryMessage, clampFrame } from "./lib/frames.js";
import { frameLabel, figureLabel, formatNumber } from "./lib/format.js";
import { viewURL } from "./lib/url.js";
import { scalePoints, pathData, markerX } from "./lib/plot.js";
import { clipPosition, slotRect, clipLabel, worstFrame } from "./lib/clip.js";

const NODE_TYPE = "DDIMInvTrajectoryPreview";
const SVG_NS = "http://www.w3.org/2000/svg";
const PLOT_W = 240;
const PLOT_H = 60;
// The DOM widget's height is set by the frontend from getMinHeight (default 50 px): ask for room for the header,
// a >= 128 px image, the scrubber, two labels and the plot, and let the image take whatever the node adds.
const VIEWER_MIN_H = 16 + 128 + 20 + 16 + 16 + PLOT_H + 5 * 4;

function el(tag, style, text) {
  const e = document.createElement(tag);
  if (style) e.style.cssText = style;
  if (text !== undefined) e.textContent = text; // textContent: never interpreted as HTML
  return e;
}

function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

function buildViewer() {
  const root = el("div", "display:flex;flex-direction:column;gap:4px;font:12px sans-serif;color:var(--input-text,#ddd);" +
    "width:100%;height:100%;box-sizing:border-box;overflow:hidden;");
  root.className = "ddim-trajectory-viewer";
  const header = el("div", "flex:none;opacity:.8;", "Run the workflow to see the trajectory.");
  const img = el("img", "flex:1 1 0;min-height:0;width:100%;object-fit:contain;image-rendering:pixelated;background:#111;display:none;");
  img.alt = "trajectory frame";
  // a video trajectory's image is a strip of clip frames: one of them is drawn onto this canvas
  const canvas = el("canvas", "flex:1 1 0;min-height:0;width:100%;object-fit:contain;image-rendering:pixelated;background:#111;display:none;");
  const clipSlider = el("input", "flex:none;width:100%;margin:0;display:none;");
  clipSlider.type = "range";
  clipSlider.min = "0";
  clipSlider.step = "1";
  const clipText = el("div", "flex:none;opacity:.8;display:none;", "");
  clipText.className = "ddim-clip-label";
  const slider = el("input", "flex:none;width:100%;margin:0;");
  slider.type = "range";
  slider.min = "0";
  slider.max = "0";
  slider.step = "1";
  slider.value = "0";
  slider.disabled = true;
  const label = el("div", "flex:none;", "");
  label.className = "ddim-frame-label";
  const figure = el("div", "flex:none;opacity:.8;", "");
  figure.className = "ddim-figure-label";
  const svg = svgEl("svg", { viewBox: `0 0 ${PLOT_W} ${PLOT_H}`, width: "100%", height: PLOT_H, preserveAspectRatio: "none" });
  svg.style.cssText = "flex:none;background:rgba(0,0,0,.25);";
  const line = svgEl("path", { d: "", fill: "none", stroke: "#6cf", "stroke-width": 1.5 });
  const marker = svgEl("line", { x1: 0, x2: 0, y1: 0, y2: PLOT_H, stroke: "#fc6", "stroke-width": 1 });
  svg.append(line, marker);
  root.append(header, img, canvas, slider, label, clipSlider, clipText, figure, svg);

  const state = { data: null, frame: null };

  function drawClip() {
    const data = state.data;
    const clip = data?.clip;
    const f = state.frame;
    if (!clip || !f) {
      canvas.style.display = "none";
      clipSlider.style.display = clipText.style.display = "none";
      return;
    }
    clipSlider.style.display = clipText.style.display = "";
    const pos = clipPosition(clipSlider.value, clip);
    const worst = worstFrame(f.figureFrames);
    clipText.textContent = clipLabel(pos, clip, f.figureFrames) +
      (worst && clip.unit === "latent frame" ? ` · most drift: latent frame ${worst.frame + 1}` : "");
    root.dataset.clip = pos.all ? "all" : String(pos.frame);
    const ready = img.complete && img.naturalWidth > 0 && img.getAttribute("src");
    if (pos.all || !ready) {
      canvas.style.display = "none";
      if (img.getAttribute("src")) img.style.display = "";
      return;
    }
    const r = slotRect(pos, img.naturalWidth, img.naturalHeight, clip.frames.length);
    canvas.width = r.sw;
    canvas.height = r.sh;
    canvas.getContext("2d").drawImage(img, r.sx, r.sy, r.sw, r.sh, 0, 0, r.sw, r.sh);
    canvas.style.display = "";
    img.style.display = "none";
  }

  function show(pos) {
    const data = state.data;
    if (!data || !data.frames.length) return;
    const i = clampFrame(pos, data.frames.length);
    const f = data.frames[i];
    slider.value = String(i);
    label.textContent = `frame ${i + 1}/${data.frames.length} · ${frameLabel(f, data.steps)}`;
    figure.textContent = figureLabel(data.figureName, f.figure, f.miss);
    const url = viewURL(f.image, (p) => api.apiURL(p));
    if (url) {
      img.src = url;
      img.style.display = "";
    } else {
      img.removeAttribute("src");
      img.style.display = "none";
    }
    const x = markerX(i, data.frames.length, PLOT_W);
    marker.setAttribute("x1", String(x));
    marker.setAttribute("x2", String(x));
    root.dataset.frame = String(i);
    root.dataset.step = f.step === null ? "" : String(f.step);
    state.frame = f;
    drawClip();
  }

  function update(message) {
    const data = parseTrajectoryMessage(message);
    state.data = data;
    if (!data || !data.frames.length) {
      header.textContent = "No trajectory data.";
      slider.disabled = true;
      return;
    }
    header.textContent = `${data.method || "?"} · ${data.steps ?? "?"} steps · σmax ${formatNumber(data.sigmaMax)}` +
      (data.show ? ` · ${data.show}` : "") + (data.reconstruction ? ` · ${data.reconstruction}` : "");
    slider.max = String(data.frames.length - 1);
    slider.disabled = data.frames.length < 2;
    clipSlider.max = String(data.clip ? data.clip.frames.length : 0);   // the last stop: the whole strip
    clipSlider.value = clipSlider.max;
    root.dataset.frames = String(data.frames.length);
    const { points } = scalePoints(data.frames.map((f) => f.figure), PLOT_W, PLOT_H);
    line.setAttribute("d", pathData(points));
    show(0);
  }

  slider.addEventListener("input", () => show(slider.value));
  clipSlider.addEventListener("input", drawClip);
  img.addEventListener("load", drawClip);
  return { root, update };
}

app.registerExtension({
  name: "ddim_inversion.TrajectoryPreview",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const viewer = buildViewer();
      this.ddimViewer = viewer;
      this.addDOMWidget("ddim_trajectory_viewer", "ddim_viewer", viewer.root, {
        serialize: false,
        getMinHeight: () => VIEWER_MIN_H,
      });
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      try {
        this.ddimViewer?.update(message);
      } catch (e) {
        console.error("[ddim_inversion] trajectory viewer:", e);
      }
      return r;
    };
  },
});
