import { test } from "node:test";
import assert from "node:assert/strict";
import { formatNumber, frameLabel, figureLabel } from "../lib/format.js";

test("formatNumber: ordinary, tiny, huge, non-finite", () => {
  assert.equal(formatNumber(0), "0");
  assert.equal(formatNumber(4.38), "4.38");
  assert.equal(formatNumber(14.600000381469727), "14.6");
  assert.equal(formatNumber(10), "10");
  assert.equal(formatNumber(100), "100");
  assert.equal(formatNumber(0.5), "0.5");
  assert.equal(formatNumber(-0.031565), "-0.0316");
  assert.equal(formatNumber(1234), "1230");
  assert.equal(formatNumber(29000), "2.90e+4");
  assert.equal(formatNumber(0.0001234), "1.23e-4");
  assert.equal(formatNumber(NaN), "–");
  assert.equal(formatNumber(Infinity), "–");
  assert.equal(formatNumber(null), "–");
  assert.equal(formatNumber("3"), "–");
  assert.equal(formatNumber(1.23456, 5), "1.2346");
});

test("frameLabel and figureLabel", () => {
  assert.equal(frameLabel({ step: 3, sigma: 4.38 }, 10), "step 3/10 · σ 4.38");
  assert.equal(frameLabel({ step: null, sigma: null }, null), "step ? · σ –");
  assert.equal(frameLabel(null, 10), "");
  assert.equal(figureLabel("x0 drift (RMS)", 0.12626), "x0 drift (RMS) 0.126");
  assert.equal(figureLabel("", 1), "figure 1");
  // a null-text reconstruction's miss follows the figure; none (null, undefined, NaN) adds nothing
  assert.equal(figureLabel("x0 drift (RMS)", 0.12626, 0.0031), "x0 drift (RMS) 0.126 · miss 0.0031");
  assert.equal(figureLabel("x0 drift (RMS)", 0.12626, 0), "x0 drift (RMS) 0.126 · miss 0");
  assert.equal(figureLabel("x0 drift (RMS)", 0.12626, null), "x0 drift (RMS) 0.126");
  assert.equal(figureLabel("x0 drift (RMS)", 0.12626, NaN), "x0 drift (RMS) 0.126");
});
