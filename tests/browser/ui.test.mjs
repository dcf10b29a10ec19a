// The web page in headless Chromium (Debian's, driven by playwright-core) against the real easel binary with keys
// on: create a key with the admin token and see its balance, generate an image and watch its progress bar move,
// edit it with a mask painted by mouse and by keyboard, watch the fleet page show a backend going down and list the
// failed request's full message, and activate working sets on a host (real child processes, tests/fake_backend.py)
// from the fleet page; the gallery lists the key's outputs again after a reload. No console errors allowed; a screenshot of each page goes to $EASEL_ARTIFACTS (default
// ~/.cache/easel-artifacts).
// Run by scripts/test.sh: `node --test tests/browser/` with EASEL_BIN set and playwright-core on NODE_PATH.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { createServer as createTcpServer } from "node:net";
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir, homedir } from "node:os";
import { join } from "node:path";
import { createRequire } from "node:module";

// The package lives outside the checkout (NODE_PATH), which ES `import` does not search; `require` does.
const { chromium } = createRequire(import.meta.url)("playwright-core");

const ADMIN = "admin-secret-for-the-browser-test";
const ARTIFACTS = process.env.EASEL_ARTIFACTS || join(homedir(), ".cache", "easel-artifacts");
const CHROMIUM = process.env.EASEL_CHROMIUM || "/usr/bin/chromium";

let upstream, easel, dir, url, browser, page;
const consoleErrors = [];

// An OpenAI-shaped upstream (a model list, a streamed chat) that is healthy until the test stops it.
function startUpstream() {
  const s = createServer((req, res) => {
    if (req.method === "POST" && req.url.endsWith("/chat/completions")) {
      req.resume();
      res.writeHead(200, { "content-type": "text/event-stream" });
      const head = { id: "chatcmpl-1", object: "chat.completion.chunk", created: 1, model: "up-llm" };
      for (const piece of ["Hello", " from", " upstream."]) {
        res.write(`data: ${JSON.stringify({ ...head, choices: [{ index: 0, delta: { content: piece }, finish_reason: null }] })}\n\n`);
      }
      res.end("data: [DONE]\n\n");
      return;
    }
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ object: "list", data: [{ id: "up-img", object: "model" }] }));
  });
  return new Promise((r) => s.listen(0, "127.0.0.1", () => r(s)));
}

// A port nothing listens on right now (for the managed fake backends).
const freePort = () =>
  new Promise((resolve) => {
    const s = createTcpServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

// A managed backend on the host: the fake image server started by easel when its working set is activated.
const managed = (name, port) => {
  const script = join(process.cwd(), "tests", "fake_backend.py");
  const cmd = JSON.stringify(["python3", script, "--port", String(port)]);
  return `  ${name}:\n    kind: openai\n    url: http://127.0.0.1:${port}/v1\n    timeout: 20s\n    process: {cmd: ${cmd}, ready_timeout: 20s, stop: {grace: 2s}}\n`;
};

before(async () => {
  upstream = await startUpstream();
  const [portA, portB] = [await freePort(), await freePort()];
  dir = mkdtempSync(join(tmpdir(), "easel-browser-"));
  mkdirSync(ARTIFACTS, { recursive: true });
  writeFileSync(
    join(dir, "easel.yaml"),
    `auth: {mode: keys}
health: {interval: 1s, unhealthy_threshold: 1}
backends:
  sim: {kind: simulated, latency: 2s}
  up: {kind: openai, url: "http://127.0.0.1:${upstream.address().port}/v1", timeout: 5s}
${managed("fa", portA)}${managed("fb", portB)}hosts:
  gpu0: {mode: manual}
working_sets:
  one: {host: gpu0, backends: [fa]}
  two: {host: gpu0, backends: [fb]}
models:
  - {id: easel-sim, backends: [sim], default_size: 256x256, sizes: [256x256, 512x512], credits: 2}
  - {id: easel-clip, type: video, backends: [sim]}
  - {id: remote-img, backends: [up], upstream_model: up-img}
  - {id: chat, type: text, backends: [up], upstream_model: up-llm}
  - {id: set-one-img, backends: [fa], upstream_model: fake-model, working_set: one}
  - {id: set-two-img, backends: [fb], upstream_model: fake-model, working_set: two}
`,
  );
  const bin = process.env.EASEL_BIN;
  assert.ok(bin, "set EASEL_BIN to the built easel binary (scripts/test.sh does)");
  const env = { ...process.env, NO_COLOR: "1", EASEL_ADMIN_TOKEN: ADMIN };
  delete env.EASEL_CONFIG;
  easel = spawn(bin, ["serve", "--listen", "127.0.0.1:0"], { cwd: dir, env, stdio: ["ignore", "ignore", "pipe"] });
  url = await new Promise((resolve, reject) => {
    let log = "";
    const timer = setTimeout(() => reject(new Error(`easel did not start:\n${log}`)), 30_000);
    easel.stderr.on("data", (d) => {
      log += d;
      const m = /listening on (http:\/\/\S+)/.exec(log.replace(/\x1b\[[0-9;]*m/g, ""));
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    easel.on("exit", (code) => reject(new Error(`easel exited (${code}):\n${log}`)));
  });
  // A fresh profile each run (Playwright takes it as the persistent context's directory, not as an argument).
  browser = await chromium.launchPersistentContext(join(dir, "chromium-profile"), {
    executablePath: CHROMIUM,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    viewport: { width: 1280, height: 900 },
  });
  page = browser.pages()[0] || (await browser.newPage());
  page.setDefaultTimeout(20_000);
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
});

after(async () => {
  await browser?.close();
  easel?.kill("SIGTERM");
  upstream?.close();
  upstream?.closeAllConnections();
  rmSync(dir, { recursive: true, force: true });
});

const shot = (name) => page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });

// Records every value the progress bar takes from now on.
const watchProgress = () =>
  page.evaluate(() => {
    window.__progress = [];
    const bar = document.getElementById("pg-progress");
    new MutationObserver(() => window.__progress.push(Number(bar.value))).observe(bar, { attributes: true });
  });

const outputs = () => page.locator("#pg-result img.output");

async function waitLoaded(img) {
  await img.waitFor();
  await page.waitForFunction((el) => el.complete && el.naturalWidth > 0, await img.elementHandle());
}

test("the page: a key with its balance, a job with progress, an edit with a mask, the fleet live, working sets", async () => {
  try {
    await walkThrough();
  } catch (e) {
    // What the page showed when it failed, beside the other screenshots.
    await shot("failure").catch(() => {});
    throw new Error(`${e.message}\nconsole errors: ${JSON.stringify(consoleErrors)}`, { cause: e });
  }
  assert.deepEqual(consoleErrors, [], "no console errors");
});

async function walkThrough() {
  // The page itself needs no key; the account page asks for one before calling anything.
  const resp = await page.goto(`${url}/ui/#account`);
  assert.equal(resp.status(), 200);
  assert.match(resp.headers()["content-type"], /^text\/html/);
  await page.getByText("Enter the admin token to manage keys.").waitFor();

  // Admin token in, a key made; its secret is shown once and can be used here.
  await page.locator("#creds summary").click();
  await page.getByLabel("Admin token").fill(ADMIN);
  await page.locator("#creds-form").getByRole("button", { name: "Save" }).click();
  await page.getByLabel("Name").fill("browser");
  await page.getByLabel("Credits").fill("50");
  await page.getByRole("button", { name: "Create key" }).click();
  const secret = page.locator("#key-secret-value");
  await secret.waitFor();
  const key = (await secret.textContent()).trim();
  assert.ok(key.length > 16, `a secret was shown: ${key}`);
  await page.getByRole("button", { name: "Use this key here" }).click();
  await page.waitForFunction(() => document.querySelector('#me dd[data-field="available"]')?.textContent === "50 credits");
  assert.equal(await page.locator("#keys tbody tr").filter({ hasText: "browser" }).count(), 1, "the key is listed");
  await shot("account");

  // Playground: the models grouped by type, the image model's sizes offered.
  await page.getByRole("link", { name: "Playground" }).click();
  const picker = page.locator("#page-playground").getByRole("combobox", { name: /^Model/ });
  await page.waitForFunction(() => document.querySelectorAll("#pg-model option").length === 6);
  const groups = await page.locator("#pg-model optgroup").evaluateAll((gs) => gs.map((g) => g.label));
  assert.deepEqual(groups.sort(), ["image", "text", "video"]);
  await picker.selectOption("easel-sim");
  assert.deepEqual(await page.locator("#pg-size option").evaluateAll((o) => o.map((x) => x.value)), ["256x256", "512x512"]);
  assert.match(await page.locator("#pg-model-info").textContent(), /2 credits per image/);
  await page.getByLabel("Seed").first().fill("7");
  const code = await page.locator("#pg-code-text").textContent();
  assert.match(code, /Prefer: respond-async/);
  assert.ok(!code.includes(key), "the shown request never contains the key");

  // Generate: an async job whose progress bar moves, then the image through its signed URL.
  await watchProgress();
  await page.getByRole("button", { name: "Generate" }).click();
  await waitLoaded(outputs().first());
  const seen = await page.evaluate(() => window.__progress);
  assert.ok(seen.some((v) => v > 0 && v < 100), `the bar showed progress between 0 and 100: ${seen}`);
  assert.equal(seen.at(-1), 100, `the bar ended full: ${seen}`);
  const src = await outputs().first().getAttribute("src");
  assert.match(src, /\/v1\/files\/.+sig=/, "the image loads from a signed URL");
  assert.ok(!src.includes(key), "no key in the image URL");
  assert.equal(await page.locator("#gallery li").count(), 1);
  await page.locator("#pg-code summary").click();
  await page.locator("#toast").waitFor({ state: "hidden" });
  await shot("playground");
  await page.emulateMedia({ colorScheme: "dark" });
  await shot("playground-dark");
  await page.emulateMedia({ colorScheme: "light" });

  // Edit: the generated picture uploaded, half of it painted over, sent with its mask.
  const png = Buffer.from(await (await fetch(src)).arrayBuffer());
  await page.getByRole("radio", { name: "Edit" }).check();
  await page.getByLabel("Image to edit").setInputFiles({ name: "input.png", mimeType: "image/png", buffer: png });
  const mask = page.locator("#pg-mask");
  await mask.waitFor();
  await mask.scrollIntoViewIfNeeded();
  // By keyboard first: focus shows a cursor; Space paints a dab under it, Space held while moving paints a line.
  const alphaAt = (fx, fy) =>
    page.evaluate(([fx, fy]) => {
      const c = document.getElementById("pg-mask");
      return c.getContext("2d").getImageData(Math.floor(fx * c.width), Math.floor(fy * c.height), 1, 1).data[3];
    }, [fx, fy]);
  assert.equal(await page.getByRole("application", { name: /^Mask/ }).count(), 1, "the mask canvas is labelled");
  await mask.focus();
  const cursor = page.locator("#pg-mask-cursor");
  await cursor.waitFor();
  assert.equal(await alphaAt(0.5, 0.5), 0, "nothing painted yet");
  await page.keyboard.press(" ");
  assert.ok((await alphaAt(0.5, 0.5)) > 0, "Space painted under the cursor");
  assert.equal(await alphaAt(0.25, 0.25), 0, "and nowhere else");
  const at = await cursor.boundingBox();
  await page.keyboard.press("Shift+ArrowUp");
  await page.keyboard.press("Shift+ArrowUp");
  await page.keyboard.press("Shift+ArrowLeft");
  await page.keyboard.press("Shift+ArrowLeft");
  const moved = await cursor.boundingBox();
  assert.ok(moved.x < at.x && moved.y < at.y, "the visible cursor moved up and left");
  assert.equal(await alphaAt(0.3, 0.3), 0, "moving without Space paints nothing");
  await page.keyboard.down(" ");
  for (let i = 0; i < 4; i++) await page.keyboard.press("ArrowRight");
  await page.keyboard.up(" ");
  assert.ok((await alphaAt(0.35, 0.3)) > 0, "holding Space while moving painted a line");
  await page.getByRole("button", { name: "Clear mask" }).click();
  await mask.focus();
  await page.keyboard.press("Enter");
  assert.ok((await alphaAt(0.4, 0.3)) > 0, "Enter paints too");
  await shot("mask-keyboard");
  const box = await mask.boundingBox();
  await page.mouse.move(box.x + 10, box.y + box.height / 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width - 10, box.y + box.height / 2, { steps: 8 });
  await page.mouse.up();
  await page.locator("#pg-prompt").fill("the same lighthouse, at night");
  let editRequest = null;
  page.on("request", (r) => r.url().endsWith("/v1/images/edits") && (editRequest = r));
  await page.getByRole("button", { name: "Edit", exact: true }).click();
  await page.waitForFunction(() => document.querySelectorAll("#gallery li").length === 2);
  await waitLoaded(outputs().first());
  assert.ok(editRequest, "the edit went to /v1/images/edits");
  assert.match(editRequest.headers()["content-type"], /^multipart\/form-data/);
  assert.notEqual(await outputs().first().getAttribute("src"), src, "a new image, not the input");
  assert.equal(await page.locator("#pg-error").isHidden(), true, await page.locator("#pg-error").textContent());
  await shot("edit");

  // A video job: made, watched, played.
  await page.getByRole("radio", { name: "Generate" }).check();
  await picker.selectOption("easel-clip");
  await page.getByLabel("Seconds").fill("1");
  await page.getByRole("button", { name: "Generate" }).click();
  const clip = page.locator("#pg-result .clip");
  await clip.waitFor();
  assert.match(await clip.getAttribute("src"), /^blob:/, "the clip was fetched with the key, not by URL");
  await page.waitForFunction(
    (el) => (el.tagName === "IMG" ? el.complete && el.naturalWidth > 0 : el.readyState >= 1),
    await clip.elementHandle(),
  );
  assert.equal(await page.locator("#pg-error").isHidden(), true, await page.locator("#pg-error").textContent());
  await shot("video");

  // The gallery outlives the visit: after a reload it lists this key's three outputs (the clip once, with its
  // poster), newest first, each with the request that made it, from signed URLs.
  await page.waitForFunction(() => document.querySelectorAll("#gallery li").length === 3);
  await page.reload();
  await page.waitForFunction(() => document.querySelectorAll("#gallery li").length === 3);
  const tiles = page.locator("#gallery li button");
  assert.match(await tiles.nth(0).textContent(), /video/, "the newest is the clip, marked as a video");
  await tiles.nth(1).click();
  await page.locator("#viewer").waitFor();
  assert.match(await page.locator("#viewer-req").textContent(), /the same lighthouse, at night/);
  assert.match(await page.locator("#viewer-req").textContent(), /"operation": "edits"/);
  const full = page.locator("#viewer-img");
  await page.waitForFunction((el) => el.complete && el.naturalWidth > 0, await full.elementHandle());
  const dl = await page.locator("#viewer-dl").getAttribute("href");
  assert.match(dl, /\/v1\/files\/img_.+sig=/, "download from a signed URL");
  assert.ok(!dl.includes(key), "no key in the download URL");
  await shot("gallery");
  await page.locator("#viewer-close").click();

  // A text model: the chat answer streams in.
  await picker.selectOption("chat");
  await page.getByLabel("Message").fill("Say hello");
  await page.getByRole("button", { name: "Send" }).click();
  await page.locator("#chat-log .assistant").getByText("Hello from upstream.").waitFor();
  assert.equal(await page.locator("#chat-log .user").textContent(), "Say hello");
  await shot("chat");
  await picker.selectOption("easel-sim");

  // Phone width: the form still fits.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  const wide = await page.evaluate(() => [...document.querySelectorAll("body *")].filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1).slice(0, 5).map((e) => e.tagName + "#" + e.id + "." + e.className));
  assert.ok(overflow <= 0, `no sideways scrolling at phone width (${overflow}px too wide: ${wide.join(", ")})`);
  await shot("playground-phone");
  await page.setViewportSize({ width: 1280, height: 900 });

  // Fleet: both backends with their gauges; stopping the upstream shows it going down without a reload.
  await page.getByRole("link", { name: "Fleet" }).click();
  const up = page.locator('article[data-backend="up"]');
  await up.getByText("healthy", { exact: true }).waitFor();
  await page.locator('article[data-backend="sim"] meter').first().waitFor();
  upstream.close();
  upstream.closeAllConnections();
  await up.getByText("down", { exact: true }).waitFor();
  assert.match(await page.locator("#fleet-overall").textContent(), /degraded/);

  // The chat request that fails now (sent from outside the page) is listed with its full message, live.
  const failed = await fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify({ model: "chat", messages: [{ role: "user", content: "hi" }] }),
  });
  assert.ok(failed.status >= 500, `the chat failed upstream: ${failed.status}`);
  const failure = (await failed.json()).error.message;
  const row = page.locator(`#fleet-errors tbody tr[data-request="${failed.headers.get("x-request-id")}"]`);
  await row.waitFor();
  assert.equal(await row.locator("td.message").textContent(), failure, "the whole message is shown");
  assert.match(await row.textContent(), /POST \/v1\/chat\/completions/);

  // Working sets: nothing runs on the manual host until the admin activates a set from the page, then the other.
  const host = page.locator('article[aria-label="Host gpu0"]');
  await host.getByText(/active none/).waitFor();
  await host.getByRole("button", { name: "Activate one" }).click();
  await host.getByText(/active one(?! →)/).waitFor();
  await page.locator('article[data-backend="fa"]').getByText("healthy", { exact: true }).waitFor();
  assert.equal(await host.getByRole("button", { name: "Activate one" }).isDisabled(), true, "the active set's button is off");
  await host.getByRole("button", { name: "Activate two" }).click();
  await host.getByText(/active two(?! →)/).waitFor();
  await page.locator('article[data-backend="fb"]').getByText("healthy", { exact: true }).waitFor();
  await shot("fleet");

  // Back to the account: the two images were charged.
  await page.getByRole("link", { name: "Account" }).click();
  await page.waitForFunction(() => document.querySelector('#me dd[data-field="available"]')?.textContent === "46 credits");
  await page.locator("#usage tbody tr").filter({ hasText: "easel-sim" }).waitFor();
  await page.getByRole("button", { name: "Check the ledger" }).click();
  await page.locator("#ledger-result").getByText("clean").waitFor();
  await shot("account-after");

  // Grant credits back, then make a spare key and revoke it.
  page.once("dialog", (d) => d.accept("4"));
  await page.getByRole("button", { name: "Grant credits to browser" }).click();
  await page.waitForFunction(() => document.querySelector('#me dd[data-field="available"]')?.textContent === "50 credits");
  await page.getByLabel("Name").fill("spare");
  await page.getByRole("button", { name: "Create key" }).click();
  await page.locator("#keys tbody tr").filter({ hasText: "spare" }).waitFor();
  page.once("dialog", (d) => d.accept());
  await page.getByRole("button", { name: "Revoke spare" }).click();
  await page.locator("#keys tbody tr").filter({ hasText: "spare" }).getByText("revoked").waitFor();
  assert.equal(await page.getByRole("button", { name: "Revoke spare" }).isDisabled(), true);
}
