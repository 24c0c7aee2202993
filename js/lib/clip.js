// The time axis of a video trajectory in the Trajectory Preview viewer (pure; no DOM).
// The node sends, for a video, data.clip = {unit, count, frames} (the clip frames each strip shows, left to right)
// and per trajectory frame figure_frames (the x0 drift of each latent frame). The viewer shows either the whole
// strip or one clip frame of it (drawn from the strip onto a canvas); these helpers turn a clip slider position
// into what to show.
import { formatNumber } from "./format.js";
// (frames.js parses data.clip into {unit, count, frames}: the clip frames each strip shows, ascending.)

/**
 * Clip slider position -> which clip frame to show: positions 0..n-1 are the strip's frames, n (the slider's
 * last stop) is the whole strip. Returns {all: true} or {all: false, slot, frame} (slot: position in the strip,
 * frame: the clip frame it shows).
 */
export function clipPosition(value, clip) {
  const n = clip ? clip.frames.length : 0;
  const v = Math.round(Number(value));
  if (!n || !Number.isFinite(v) || v >= n) return { all: true };
  const slot = Math.max(0, v);
  return { all: false, slot, frame: clip.frames[slot] };
}

/**
 * The part of the strip image (natural size width x height, n frames side by side) that shows one slot, as a
 * canvas drawImage source rectangle {sx, sy, sw, sh}; the whole image for the whole strip (or a bad size).
 */
export function slotRect(position, width, height, n) {
  const whole = { sx: 0, sy: 0, sw: width, sh: height };
  if (!position || position.all || !(n > 1) || !(width >= n) || !(height > 0)) return whole;
  const sw = Math.floor(width / n);
  return { sx: position.slot * sw, sy: 0, sw, sh: height };
}

/** "latent frame 3/21 · drift 0.124" (1-based), or "all 8 of 21 latent frames" for the whole strip. */
export function clipLabel(position, clip, figureFrames) {
  if (!clip) return "";
  const unit = clip.unit;
  if (!position || position.all) return `all ${clip.frames.length} of ${clip.count} ${unit}s`;
  const drift = Array.isArray(figureFrames) && unit === "latent frame" ? figureFrames[position.frame] : undefined;
  const d = typeof drift === "number" && Number.isFinite(drift) ? ` · drift ${formatNumber(drift)}` : "";
  return `${unit} ${position.frame + 1}/${clip.count}${d}`;
}

/** The frame of the clip that drifts most for one trajectory frame: {frame, value} or null. */
export function worstFrame(figureFrames) {
  if (!Array.isArray(figureFrames)) return null;
  let best = null;
  figureFrames.forEach((v, i) => {
    if (typeof v === "number" && Number.isFinite(v) && (best === null || v > best.value)) best = { frame: i, value: v };
  });
  return best;
}
