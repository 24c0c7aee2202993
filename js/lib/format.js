// Pure formatting helpers for the Trajectory Preview viewer (no DOM, no side effects).

/** A finite number as short text: fixed for ordinary magnitudes, exponent for tiny/huge; "–" otherwise. */
export function formatNumber(x, digits = 3) {
  if (typeof x !== "number" || !Number.isFinite(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e4 || a < 1e-3) return x.toExponential(Math.max(0, digits - 1));
  // significant digits, without trailing zeros
  const s = x.toPrecision(digits);
  return s.includes(".") && !s.includes("e") ? s.replace(/\.?0+$/, "") : String(Number(s));
}

/** Label of one frame: "step 3/10 · σ 4.38". */
export function frameLabel(frame, steps) {
  if (!frame) return "";
  const step = Number.isInteger(frame.step) ? String(frame.step) : "?";
  const total = Number.isInteger(steps) ? `/${steps}` : "";
  return `step ${step}${total} · σ ${formatNumber(frame.sigma)}`;
}

/**
 * Label of the figure value of one frame: "x0 drift (RMS) 0.126", and with a null-text reconstruction's miss
 * (a number; null/undefined = none): "x0 drift (RMS) 0.126 · miss 0.0031".
 */
export function figureLabel(name, value, miss) {
  const n = typeof name === "string" && name ? name : "figure";
  const m = typeof miss === "number" && Number.isFinite(miss) ? ` · miss ${formatNumber(miss)}` : "";
  return `${n} ${formatNumber(value)}${m}`;
}
