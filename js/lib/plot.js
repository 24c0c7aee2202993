// Scale a per-frame figure to pixel coordinates for a small SVG line plot (pure; no DOM).

/**
 * values: numbers (null/NaN = missing). Returns {points: [{x, y} | null], min, max} where x runs over
 * [pad, width-pad] by position and y over [height-pad (min) .. pad (max)] (SVG y grows downwards).
 * A constant series is drawn flat at mid-height; a single point sits at mid-width.
 */
export function scalePoints(values, width, height, pad = 4) {
  const vals = (values || []).map((v) => (typeof v === "number" && Number.isFinite(v) ? v : null));
  const finite = vals.filter((v) => v !== null);
  const min = finite.length ? Math.min(...finite) : null;
  const max = finite.length ? Math.max(...finite) : null;
  const n = vals.length;
  const w = Math.max(0, width - 2 * pad);
  const h = Math.max(0, height - 2 * pad);
  const points = vals.map((v, i) => {
    if (v === null) return null;
    const x = n === 1 ? pad + w / 2 : pad + (w * i) / (n - 1);
    const y = max === min ? pad + h / 2 : pad + h * (1 - (v - min) / (max - min));
    return { x: round2(x), y: round2(y) };
  });
  return { points, min, max };
}

function round2(x) {
  return Math.round(x * 100) / 100;
}

/** SVG path data through the points; a missing point (null) breaks the line. "" when nothing to draw. */
export function pathData(points) {
  let d = "";
  let pen = false;
  for (const p of points || []) {
    if (!p) { pen = false; continue; }
    d += `${pen ? "L" : "M"}${p.x} ${p.y} `;
    pen = true;
  }
  return d.trim();
}

/** x pixel of the marker for frame position i of n (same spacing as scalePoints). */
export function markerX(i, n, width, pad = 4) {
  const w = Math.max(0, width - 2 * pad);
  if (!(n > 1)) return round2(pad + w / 2);
  const c = Math.min(n - 1, Math.max(0, i));
  return round2(pad + (w * c) / (n - 1));
}
