// Drives the feed page (dist/, built by `npm run build`) in headless Chromium
// (Debian's /usr/bin/chromium) with playwright-core, one step at a time:
// tests/browser.rs writes one JSON command per line on stdin and reads one
// JSON answer per line on stdout ({"ok":true,...} or {"ok":false,"error":...}).
// Between steps the test triggers workflows and reads counts through herald's API.
//
// Commands (each may set "timeout" in ms, default 15000):
//   {"cmd":"open","url":...}          load the page; wait for the bell and the first feed GET
//   {"cmd":"waitSocket"}              wait until the feed's channel join was answered ok
//   {"cmd":"badge"}                   the bell's count now (0 when no badge shows)
//   {"cmd":"waitBadge","count":N}     wait until the bell shows N (0: no badge)
//   {"cmd":"waitItem","text":...}     wait until a feed cell holding the text is in the page
//   {"cmd":"items"}                   the feed cells: rendered HTML, unread dot, visible
//   {"cmd":"openPopover"}             click the bell; wait until the popover shows
//   {"cmd":"clickItem","text":...}    click the cell holding the text
//   {"cmd":"markAllRead"}             click "Mark all as read"; wait for herald's answer
//   {"cmd":"waitResponse","match":re} wait for a response whose "METHOD url" matches (from the start)
//   {"cmd":"state"}                   page loads, requests, socket frames, console errors
//   {"cmd":"screenshot","path":...}
//   {"cmd":"close"}
//
// CHROMIUM (env) overrides the browser's path; CHROMIUM_ARGS adds flags.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
// Without the background-networking flags Chromium keeps trying Google's hosts,
// which this machine's closed network refuses. playwright-core gives each launch
// a fresh, empty profile directory.
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    // Extra flags for debugging, space-separated.
    ...(process.env.CHROMIUM_ARGS || "").split(" ").filter(Boolean),
  ],
});
const page = await browser.newPage();

const log = { loads: 0, requests: [], sockets: [], console: [], pageErrors: [] };
page.on("framenavigated", (frame) => {
  if (frame === page.mainFrame()) log.loads += 1;
});
page.on("console", (m) => {
  if (m.type() === "error" || m.type() === "warning") log.console.push(`${m.type()}: ${m.text()}`);
});
page.on("pageerror", (e) => log.pageErrors.push(String(e)));
page.on("requestfinished", async (request) => {
  const response = await request.response().catch(() => null);
  log.requests.push({ method: request.method(), url: request.url(), status: response ? response.status() : null });
});
page.on("requestfailed", (request) => {
  log.requests.push({ method: request.method(), url: request.url(), status: null, failure: request.failure()?.errorText });
});
page.on("websocket", (ws) => {
  const socket = { url: ws.url(), sent: [], received: [], closed: false };
  log.sockets.push(socket);
  const parse = (payload) => {
    try {
      return JSON.parse(payload);
    } catch {
      return payload;
    }
  };
  ws.on("framesent", (f) => socket.sent.push(parse(f.payload)));
  ws.on("framereceived", (f) => socket.received.push(parse(f.payload)));
  ws.on("socketerror", (e) => (socket.error = String(e)));
  ws.on("close", () => (socket.closed = true));
});

const BELL = 'button[aria-label="Open notification feed"]';
const BADGE = ".rnf-unseen-badge__count";
const CELL = ".rnf-notification-cell";
const CONTENT = ".rnf-notification-cell__content";
const POPOVER = ".rnf-notification-feed-popover";

async function until(what, timeout, check) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== null && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function badge() {
  const el = await page.$(BADGE);
  if (!el) return { count: 0, text: null };
  const text = (await el.textContent()).trim();
  return { count: Number.parseInt(text, 10), text };
}

function responded(re, since = 0) {
  return log.requests.slice(since).find((r) => r.status !== null && re.test(`${r.method} ${r.url}`));
}

// The ok reply to a phx_join of a feeds: topic, on the newest socket.
function joined() {
  for (const socket of [...log.sockets].reverse()) {
    const joins = socket.sent.filter((f) => Array.isArray(f) && f[3] === "phx_join" && String(f[2]).startsWith("feeds:"));
    for (const join of joins.reverse()) {
      const reply = socket.received.find((f) => Array.isArray(f) && f[3] === "phx_reply" && f[1] === join[1]);
      if (reply) return { url: socket.url, topic: join[2], join: join[4], reply: reply[4] };
    }
  }
  return null;
}

const commands = {
  async open({ url, timeout }) {
    const since = log.requests.length;
    await page.goto(url, { waitUntil: "load", timeout });
    await page.locator(BELL).waitFor({ state: "visible", timeout });
    const feed = await until("the first feed GET", timeout, () => responded(/^GET .*\/v1\/users\/[^/]+\/feeds\/[^/?]+(\?|$)/, since));
    return { feedStatus: feed.status, feedUrl: feed.url };
  },
  async waitSocket({ timeout }) {
    const j = await until("the feed channel's join to be answered", timeout, () => joined());
    if (j.reply?.status !== "ok") throw new Error(`the join was refused: ${JSON.stringify(j)}`);
    return j;
  },
  badge,
  async waitBadge({ count, timeout }) {
    const started = Date.now();
    let last;
    try {
      await until(`the badge to show ${count}`, timeout, async () => {
        last = await badge();
        return last.count === count;
      });
    } catch (e) {
      throw new Error(`${e.message}; it shows ${JSON.stringify(last)}`);
    }
    return { ...last, elapsedMs: Date.now() - started };
  },
  async waitItem({ text, timeout }) {
    const started = Date.now();
    const cell = page.locator(CONTENT).filter({ hasText: text }).first();
    await cell.waitFor({ state: "attached", timeout });
    return { html: await cell.innerHTML(), visible: await cell.isVisible(), elapsedMs: Date.now() - started };
  },
  async items() {
    const cells = await page.$$(CELL);
    const items = [];
    for (const cell of cells) {
      const content = await cell.$(CONTENT);
      items.push({
        html: content ? await content.innerHTML() : null,
        text: content ? (await content.textContent()).trim() : null,
        unread: (await cell.$(".rnf-notification-cell__unread-dot")) !== null,
        visible: await cell.isVisible(),
      });
    }
    return { items };
  },
  async openPopover({ timeout }) {
    await page.locator(BELL).click({ timeout });
    await until("the popover to show", timeout, () => page.$eval(POPOVER, (el) => getComputedStyle(el).visibility === "visible"));
    return {};
  },
  async clickItem({ text, timeout }) {
    await page.locator(CELL).filter({ hasText: text }).first().click({ timeout });
    const clicked = await until("the click to reach the page", timeout, () => page.evaluate(() => window.heraldClicked));
    return { clicked };
  },
  async markAllRead({ timeout }) {
    const since = log.requests.length;
    const button = page.locator(".rnf-mark-all-as-read");
    await until("Mark all as read to be enabled", timeout, () => button.isEnabled());
    await button.click({ timeout });
    const r = await until("herald's answer to mark all as read", timeout, () => responded(/^POST .*\/messages\/bulk\/read/, since));
    return { status: r.status, url: r.url };
  },
  async waitResponse({ match, timeout }) {
    const r = await until(`a response matching ${match}`, timeout, () => responded(new RegExp(match)));
    return r;
  },
  async state() {
    return log;
  },
  async screenshot({ path }) {
    await page.screenshot({ path, fullPage: true });
    return { path };
  },
  async close() {
    await browser.close();
    return {};
  },
};

function reply(answer) {
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}

reply({ ok: true, ready: true, browser: browser.version() });
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let command;
  try {
    command = JSON.parse(line);
  } catch (e) {
    reply({ ok: false, error: `not JSON: ${line}` });
    continue;
  }
  const run = commands[command.cmd];
  if (!run) {
    reply({ ok: false, cmd: command.cmd, error: `unknown command ${command.cmd}` });
    continue;
  }
  try {
    const value = await run({ timeout: 15000, ...command });
    reply({ ok: true, cmd: command.cmd, ...value });
  } catch (e) {
    reply({ ok: false, cmd: command.cmd, error: String(e?.message || e) });
  }
  if (command.cmd === "close") break;
}
await browser.close().catch(() => {});
process.exit(0);
