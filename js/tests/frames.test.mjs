import { test } from "node:test";
import assert from "node:assert/strict";
import { parseTrajectoryMessage, clampFrame } from "../lib/frames.js";

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

test("a null-text trajectory's reconstruction caption and per-frame miss", () => {
  const d0 = parseTrajectoryMessage(message);
  assert.equal(d0.reconstruction, "");
  assert.deepEqual(d0.frames.map((f) => f.miss), [null, null, null]);
  const data = { ...message.ddim_trajectory[0], reconstruction: "below: null-text reconstruction at cfg 7.5" };
  data.frames = data.frames.map((f, i) => ({ ...f, miss: [0.004, "x", 0][i] }));
  const d = parseTrajectoryMessage({ ...message, ddim_trajectory: [data] });
  assert.equal(d.reconstruction, "below: null-text reconstruction at cfg 7.5");
  assert.deepEqual(d.frames.map((f) => f.miss), [0.004, null, 0]);
  assert.equal(parseTrajectoryMessage({ ...message, ddim_trajectory: [{ ...data, reconstruction: 7 }] }).reconstruction, "");
});
