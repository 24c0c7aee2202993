import { test } from "node:test";
import assert from "node:assert/strict";
import { parseTrajectoryMessage, clampFrame, frameForStep, evenlySpaced } from "../lib/frames.js";

const message = {
  images: [
    { filename: "a_00001_.png", subfolder: "", type: "temp" },
    { filename: "a_00002_.png", subfolder: "", type: "temp" },
    { filename: "a_00003_.png", subfolder: "", type: "temp" },
  ],
  animated: [false],
  ddim_trajectory: [{
    frames: [
      { index: 0, step: 0, sigma: 0, figure: 0.03 },
      { index: 1, step: 5, sigma: 7.3, figure: 0.15 },
      { index: 2, step: 10, sigma: 14.6, figure: null },
    ],
    figure_name: "x0 drift (RMS)", method: "ddim", steps: 10, sigma_max: 14.6, show: "states",
  }],
};

test("parses the node's UI message", () => {
  const d = parseTrajectoryMessage(message);
  assert.equal(d.frames.length, 3);
  assert.deepEqual(d.frames.map((f) => f.step), [0, 5, 10]);
  assert.equal(d.frames[1].image.filename, "a_00002_.png");
  assert.equal(d.frames[2].figure, null);
  assert.equal(d.figureName, "x0 drift (RMS)");
  assert.equal(d.method, "ddim");
  assert.equal(d.steps, 10);
  assert.equal(d.sigmaMax, 14.6);
  assert.equal(d.show, "states");
});

test("tolerates missing or malformed data", () => {
  assert.equal(parseTrajectoryMessage(null), null);
  assert.equal(parseTrajectoryMessage({ images: [] }), null);
  assert.equal(parseTrajectoryMessage({ ddim_trajectory: [{}] }), null);
  const d = parseTrajectoryMessage({ ddim_trajectory: [{ frames: [{ step: "x", sigma: "1" }, {}], method: 3 }] });
  assert.deepEqual(d.frames.map((f) => [f.index, f.step, f.sigma, f.image]), [[0, null, null, null], [1, null, null, null]]);
  assert.equal(d.method, "");
  assert.equal(d.figureName, "figure");
});

test("clampFrame", () => {
  assert.equal(clampFrame("2", 3), 2);
  assert.equal(clampFrame(7, 3), 2);
  assert.equal(clampFrame(-1, 3), 0);
  assert.equal(clampFrame(1.6, 3), 2);
  assert.equal(clampFrame("abc", 3), 0);
  assert.equal(clampFrame(1, 0), 0);
});

test("frameForStep picks the nearest frame", () => {
  const d = parseTrajectoryMessage(message);
  assert.equal(frameForStep(d.frames, 0), 0);
  assert.equal(frameForStep(d.frames, 4), 1);
  assert.equal(frameForStep(d.frames, 9), 2);
  assert.equal(frameForStep([], 3), 0);
});

test("evenlySpaced matches the node's rule: both ends, unique, at most max", () => {
  for (let count = 1; count < 40; count++) {
    for (let max = 2; max < 45; max++) {
      const idx = evenlySpaced(count, max);
      assert.equal(idx[0], 0);
      assert.equal(idx[idx.length - 1], count - 1);
      assert.equal(new Set(idx).size, idx.length);
      assert.equal(idx.length, Math.min(count, max));
      assert.deepEqual(idx, [...idx].sort((a, b) => a - b));
    }
  }
  assert.deepEqual(evenlySpaced(11, 4), [0, 3, 7, 10]); // same as select_frames(11, 4) in nodes/preview.py
  assert.deepEqual(evenlySpaced(0, 4), []);
});
