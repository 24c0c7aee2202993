import { test } from "node:test";
import assert from "node:assert/strict";
import { escapeHTML, formatNumber, frameLabel, figureLabel } from "../lib/format.js";

test("escapeHTML escapes markup and quotes", () => {
  assert.equal(escapeHTML(`<img src=x onerror="a('b')">&\``), "&lt;img src=x onerror=&quot;a(&#39;b&#39;)&quot;&gt;&amp;&#96;");
  assert.equal(escapeHTML(null), "");
  assert.equal(escapeHTML(undefined), "");
  assert.equal(escapeHTML(3.5), "3.5");
  assert.equal(escapeHTML("plain"), "plain");
});

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
});
