// Turn the Trajectory Preview node's UI message into viewer frames (pure; no DOM).

/** Coerce to a finite number or null. */
function num(x) {
  return typeof x === "number" && Number.isFinite(x) ? x : null;
}

/**
 * message: the node's UI output ({images: [{filename, subfolder, type}], ddim_trajectory: [{frames, ...}]}).
 * Returns {frames: [{index, step, sigma, figure, miss, image}], figureName, method, steps, sigmaMax, show,
 * reconstruction} or null when the message carries no trajectory data. Frames without a matching image keep
 * image = null. `reconstruction` (a caption, "" when absent) and each frame's `miss` (null when absent) come
 * with a Null-Text Inversion trajectory, whose reconstruction the node shows below the pivot.
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
      miss: num(f?.miss),
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
  };
}

/** Clamp a (possibly fractional/string) slider value to a valid frame position in [0, count-1]. */
export function clampFrame(value, count) {
  if (!(count > 0)) return 0;
  const v = Math.round(Number(value));
  if (!Number.isFinite(v)) return 0;
  return Math.min(count - 1, Math.max(0, v));
}
