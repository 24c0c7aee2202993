// What the browser checks (load_check.cjs, viewer_check.cjs) share: reading the config named on the command line,
// the progress log on stderr, Chromium through playwright-core (a persistent context in a temporary profile, headless,
// no request leaving the ComfyUI server), and the run: one JSON object on stdout, exit 0 when the observations were
// gathered, 2 on a driver error, 3 on the hard timeout (the JSON then has "driverError").
"use strict";

const fs = require("fs");
const os = require("os");
const path = require("path");

const CHROMIUM_ARGS = [
  "--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-dev-shm-usage", "--mute-audio",
];

/** {cfg, log}: the config file argv[2] names, and a logger prefixing `name` and the time; fails at once when
 * playwright-core (cfg.playwrightCore) cannot be loaded. */
function setup(name) {
  const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const log = (...a) => process.stderr.write(`[${name} ${new Date().toISOString().slice(11, 23)}] ${a.join(" ")}\n`);
  require(cfg.playwrightCore || "playwright-core");
  return { cfg, log };
}

/** body(page, context) in a fresh Chromium profile (removed afterwards); requests to anything but the ComfyUI
 * server (cfg.url) are aborted, each counted by onBlocked() when given. Sets out.browserVersion. */
async function withBrowser(cfg, log, out, { launchTimeout, onBlocked }, body) {
  const { chromium } = require(cfg.playwrightCore || "playwright-core");
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "ddiminv-chromium-"));
  let context;
  try {
    log("launching", cfg.chromium);
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: cfg.chromium, headless: true, args: CHROMIUM_ARGS,
      viewport: { width: 1400, height: 1000 }, timeout: launchTimeout,
    });
    out.browserVersion = context.browser() ? context.browser().version() : null;
    // only the ComfyUI server: no outside requests (the frontend asks api.comfy.org etc.; offline here anyway)
    const origin = new URL(cfg.url).origin;
    await context.route((u) => u.origin !== origin && !u.protocol.startsWith("data") && !u.protocol.startsWith("blob"),
      (route) => { if (onBlocked) onBlocked(); return route.abort("blockedbyclient"); });
    const page = context.pages()[0] || (await context.newPage());
    return await body(page, context);
  } finally {
    if (context) await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

/** Run main(), print its result (or `out` with driverError) as one JSON line and exit; hardMs ends it anyway. */
function run(name, out, main, hardMs) {
  const hardTimer = setTimeout(() => {
    out.driverError = `${name}: hard timeout`;
    process.stdout.write(JSON.stringify(out) + "\n");
    process.exit(3);
  }, hardMs);
  hardTimer.unref();
  main().then(
    (res) => { process.stdout.write(JSON.stringify(res) + "\n"); process.exit(0); },
    (e) => {
      out.driverError = String((e && e.stack) || e);
      process.stdout.write(JSON.stringify(out) + "\n");
      process.exit(2);
    },
  );
}

module.exports = { CHROMIUM_ARGS, setup, withBrowser, run };
