// Turn the Trajectory Preview node's UI message into viewer frames (pure; no DOM).

/** Coerce to a finite number or null. */
function num(x) {
  return typeof x === "number" && Number.isFinite(x) ? x : null;
}

/**
 * message: the node's UI output ({images: [{filename, subfolder, type}], ddim_trajectory: [{frames, ...}]}).
 * Returns {frames: [{index, step, sigma, figure, image}], figureName, method, steps, sigmaMax, show} or null
 * when the message carries no trajectory data. Frames without a matching image keep image = null.
 */
export function parseTrajectoryMessage(message) {
  if (!message || typeof message !== "object") return null;
  const data = Array.isArray(message.ddim_trajectory) ? message.ddim_trajectory[0] : null;
  if (!data || typeof data !== "object" || !Array.isArray(data.frames)) return null;
  const images = Array.isArray(message.images) ? message.images : [];
  const frames = data.frames.map((f, i) => {
    const index = Number.isInteger(f?.index) ? f.index : i;
    return {
      index,
      step: Number.isInteger(f?.step) ? f.step : null,
      sigma: num(f?.sigma),
      figure: num(f?.figure),
      image: images[index] && typeof images[index] === "object" ? images[index] : null,
    };
  });
  return {
    frames,
    figureName: typeof data.figure_name === "string" ? data.figure_name : "figure",
    method: typeof data.method === "string" ? data.method : "",
    show: typeof data.show === "string" ? data.show : "",
    steps: Number.isInteger(data.steps) ? data.steps : null,
    sigmaMax: num(data.sigma_max),
  };
}

/** Clamp a (possibly fractional/string) slider value to a valid frame position in [0, count-1]. */
export function clampFrame(value, count) {
  if (!(count > 0)) return 0;
  const v = Math.round(Number(value));
  if (!Number.isFinite(v)) return 0;
  return Math.min(count - 1, Math.max(0, v));
}

/** The frame position whose step is closest to `step` (first on ties); 0 for no frames. */
export function frameForStep(frames, step) {
  let best = 0;
  let bestD = Infinity;
  (frames || []).forEach((f, i) => {
    if (f.step === null || f.step === undefined) return;
    const d = Math.abs(f.step - step);
    if (d < bestD) { bestD = d; best = i; }
  });
  return best;
}

/**
 * Up to `max` positions in [0, count), evenly spaced, always including both ends (same rule as the node's
 * frame selection), for thinning ticks or thumbnails.
 */
export function evenlySpaced(count, max) {
  if (!(count > 0)) return [];
  if (count === 1) return [0];
  const k = Math.max(2, Math.min(Math.floor(max), count));
  const out = new Set();
  for (let j = 0; j < k; j++) out.add(Math.round((j * (count - 1)) / (k - 1)));
  return [...out].sort((a, b) => a - b);
}
