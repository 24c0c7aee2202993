// Turn the Trajectory Preview node's UI message into viewer frames (pure; no DOM).

/** Coerce to a finite number or null. */
function num(x) {
  return typeof x === "number" && Number.isFinite(x) ? x : null;
}

/**
 * message: the node's UI output ({images: [{filename, subfolder, type}], ddim_trajectory: [{frames, ...}]}).
 * Returns {frames: [{index, step, sigma, figure, miss, image}], figureName, method, steps, sigmaMax, show,
 * reconstruction, clip} or null when the message carries no trajectory data. Frames without a matching image keep
 * image = null. `reconstruction` (a caption, "" when absent) and each frame's `miss` (null when absent) come
 * with a Null-Text Inversion trajectory, whose reconstruction the node shows below the pivot. A video
 * trajectory also has `clip` (see clip.js; null for images) and each frame `figureFrames` (the drift per latent
 * frame; null when absent).
 */
/** data.clip -> {unit, count, frames} (frames: ascending non-negative integers) or null for an image trajectory. */
function parseClip(clip) {
  if (!clip || typeof clip !== "object" || !Array.isArray(clip.frames)) return null;
  const frames = clip.frames.filter((f) => Number.isInteger(f) && f >= 0);
  if (!frames.length) return null;
  const count = Number.isInteger(clip.count) && clip.count > 0 ? clip.count : frames[frames.length - 1] + 1;
  return { unit: typeof clip.unit === "string" && clip.unit ? clip.unit : "frame", count, frames };
}

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
      miss: num(f?.miss),
      figureFrames: Array.isArray(f?.figure_frames) ? f.figure_frames.map(num) : null,
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
    reconstruction: typeof data.reconstruction === "string" ? data.reconstruction : "",
    clip: parseClip(data.clip),
  };
}

/** Clamp a (possibly fractional/string) slider value to a valid frame position in [0, count-1]. */
export function clampFrame(value, count) {
  if (!(count > 0)) return 0;
  const v = Math.round(Number(value));
  if (!Number.isFinite(v)) return 0;
  return Math.min(count - 1, Math.max(0, v));
}
