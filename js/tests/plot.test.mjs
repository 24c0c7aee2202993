import { test } from "node:test";
import assert from "node:assert/strict";
import { scalePoints, pathData, markerX } from "../lib/plot.js";

test("scales min to bottom and max to top within the padding", () => {
  const { points, min, max } = scalePoints([1, 2, 3], 104, 24, 2);
  assert.equal(min, 1);
  assert.equal(max, 3);
  assert.deepEqual(points, [{ x: 2, y: 22 }, { x: 52, y: 12 }, { x: 102, y: 2 }]);
});

test("constant, single, empty and missing values", () => {
  assert.deepEqual(scalePoints([5, 5], 10, 10, 0).points, [{ x: 0, y: 5 }, { x: 10, y: 5 }]);
  assert.deepEqual(scalePoints([5], 10, 10, 0).points, [{ x: 5, y: 5 }]);
  assert.deepEqual(scalePoints([], 10, 10).points, []);
  const r = scalePoints([0, null, NaN, 1], 30, 10, 0);
  assert.deepEqual(r.points, [{ x: 0, y: 10 }, null, null, { x: 30, y: 0 }]);
  assert.deepEqual(scalePoints([null, null], 10, 10).points, [null, null]);
});

test("pathData breaks at gaps", () => {
  assert.equal(pathData([{ x: 0, y: 1 }, { x: 2, y: 3 }]), "M0 1 L2 3");
  assert.equal(pathData([{ x: 0, y: 1 }, null, { x: 2, y: 3 }, { x: 4, y: 5 }]), "M0 1 M2 3 L4 5");
  assert.equal(pathData([]), "");
  assert.equal(pathData(undefined), "");
});

test("markerX follows the point spacing and clamps", () => {
  assert.equal(markerX(0, 3, 104, 2), 2);
  assert.equal(markerX(1, 3, 104, 2), 52);
  assert.equal(markerX(9, 3, 104, 2), 102);
  assert.equal(markerX(0, 1, 104, 2), 52);
});
