import { test } from "node:test";
import assert from "node:assert/strict";
import { clipPosition, slotRect, clipLabel, worstFrame } from "../lib/clip.js";
import { parseTrajectoryMessage } from "../lib/frames.js";

function parseClip(clip) {   // through the message parser the glue uses
  return parseTrajectoryMessage({ images: [], ddim_trajectory: [{ frames: [{ index: 0, figure_frames: [0.5, null] }],
    clip }] }).clip;
}

const clip = { unit: "latent frame", count: 21, frames: [0, 3, 6, 10, 13, 16, 20] };

test("parses the node's clip data and refuses what is not one", () => {
  assert.deepEqual(parseClip(clip), clip);
  assert.equal(parseClip(undefined), null);
  assert.equal(parseClip({ frames: [] }), null);
  assert.deepEqual(parseClip({ frames: [0, "x", 2, -1] }), { unit: "frame", count: 3, frames: [0, 2] });
  const d = parseTrajectoryMessage({ images: [], ddim_trajectory: [{ frames: [{ index: 0, figure_frames: [0.5, "x"] },
    { index: 1 }] }] });
  assert.deepEqual(d.frames.map((f) => f.figureFrames), [[0.5, null], null]);
  assert.equal(d.clip, null);                               // an image trajectory has no time axis
});

test("the slider steps through the strip's frames, its last stop is the whole strip", () => {
  const c = parseClip(clip);
  assert.deepEqual(clipPosition(0, c), { all: false, slot: 0, frame: 0 });
  assert.deepEqual(clipPosition("3", c), { all: false, slot: 3, frame: 10 });
  assert.deepEqual(clipPosition(6.4, c), { all: false, slot: 6, frame: 20 });
  assert.deepEqual(clipPosition(7, c), { all: true });
  assert.deepEqual(clipPosition(-2, c), { all: false, slot: 0, frame: 0 });
  assert.deepEqual(clipPosition("nope", c), { all: true });
  assert.deepEqual(clipPosition(0, null), { all: true });
});

test("one slot is one frame's width of the strip; the whole strip otherwise", () => {
  const c = parseClip(clip);
  assert.deepEqual(slotRect(clipPosition(3, c), 7 * 64, 48, 7), { sx: 192, sy: 0, sw: 64, sh: 48 });
  assert.deepEqual(slotRect(clipPosition(0, c), 7 * 64, 48, 7), { sx: 0, sy: 0, sw: 64, sh: 48 });
  assert.deepEqual(slotRect(clipPosition(6, c), 7 * 64, 48, 7), { sx: 384, sy: 0, sw: 64, sh: 48 });
  assert.deepEqual(slotRect(clipPosition(7, c), 448, 48, 7), { sx: 0, sy: 0, sw: 448, sh: 48 });
  assert.deepEqual(slotRect(clipPosition(3, c), 0, 0, 7), { sx: 0, sy: 0, sw: 0, sh: 0 });   // not loaded yet
});

test("labels name the clip frame (1-based), its drift, or the whole strip", () => {
  const c = parseClip(clip);
  const ff = Array.from({ length: 21 }, (_, i) => i / 100);
  assert.equal(clipLabel(clipPosition(3, c), c, ff), "latent frame 11/21 · drift 0.1");
  assert.equal(clipLabel(clipPosition(3, c), c, null), "latent frame 11/21");
  assert.equal(clipLabel(clipPosition(7, c), c, ff), "all 7 of 21 latent frames");
  const decoded = parseClip({ unit: "frame", count: 81, frames: [0, 40, 80] });
  assert.equal(clipLabel(clipPosition(1, decoded), decoded, ff), "frame 41/81");   // drift is per latent frame
  assert.equal(clipLabel(clipPosition(0, null), null, ff), "");
});

test("the worst frame is the largest finite drift", () => {
  assert.deepEqual(worstFrame([0.1, null, 0.5, 0.2]), { frame: 2, value: 0.5 });
  assert.equal(worstFrame([null, NaN]), null);
  assert.equal(worstFrame(undefined), null);
});
