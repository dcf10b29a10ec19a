// The official OpenAI Node SDK against the real easel binary: a streamed chat completion relayed as it arrives
// (content chunks, a tool call, the usage chunk), errors raised as the SDK's APIError, and an image generation.
// Run by scripts/test.sh: `node --test tests/node/` with EASEL_BIN set and the `openai` package on NODE_PATH.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createRequire } from "node:module";

// The package lives outside the checkout (NODE_PATH), which ES `import` does not search; `require` does.
const OpenAI = createRequire(import.meta.url)("openai");

const HEAD = { id: "chatcmpl-1", object: "chat.completion.chunk", created: 1, model: "up-llm" };
const chunk = (delta, finish = null) => ({ ...HEAD, choices: [{ index: 0, delta, finish_reason: finish }] });
const TOOL_STREAM = [
  chunk({ role: "assistant", content: "" }),
  chunk({ content: "Checking" }),
  chunk({ content: " the weather." }),
  chunk({ tool_calls: [{ index: 0, id: "call_1", type: "function", function: { name: "get_weather", arguments: "" } }] }),
  chunk({ tool_calls: [{ index: 0, function: { arguments: '{"city":' } }] }),
  chunk({ tool_calls: [{ index: 0, function: { arguments: '"Paris"}' } }] }),
  chunk({}, "tool_calls"),
];
const USAGE = { prompt_tokens: 9, completion_tokens: 5, total_tokens: 14 };

// Set by a test: the upstream holds the rest of its stream until this promise resolves.
let gate = null;
const received = [];

function upstream(req, res) {
  if (req.method === "GET") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ object: "list", data: [{ id: "up-llm", object: "model" }] }));
    return;
  }
  let raw = "";
  req.on("data", (d) => (raw += d));
  req.on("end", async () => {
    const body = raw ? JSON.parse(raw) : {};
    received.push(body);
    const msg = body.messages?.[0]?.content ?? "";
    if (msg === "too long") {
      res.writeHead(400, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: { message: "This model's maximum context length is 8 tokens", type: "invalid_request_error", param: "messages", code: "context_length_exceeded" } }));
      return;
    }
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    const events = TOOL_STREAM.slice();
    if (body.stream_options?.include_usage) events.push({ ...HEAD, choices: [], usage: USAGE });
    for (const [i, e] of events.entries()) {
      res.write(`data: ${JSON.stringify(e)}\n\n`);
      if (i === 0 && gate) await gate;
    }
    res.end("data: [DONE]\n\n");
  });
}

let server, easel, dir, url;

before(async () => {
  server = createServer(upstream);
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const up = `http://127.0.0.1:${server.address().port}`;
  dir = mkdtempSync(join(tmpdir(), "easel-node-"));
  writeFileSync(
    join(dir, "easel.yaml"),
    `auth: {mode: none}
backends:
  llm: {kind: openai, url: "${up}/v1", timeout: 20s}
  sim: {kind: simulated}
models:
  - {id: chat-llm, type: text, backends: [llm], upstream_model: up-llm}
  - {id: easel-sim, aliases: [gpt-image-1, dall-e-2], backends: [sim], default_size: 64x64}
`,
  );
  const bin = process.env.EASEL_BIN;
  assert.ok(bin, "set EASEL_BIN to the built easel binary (scripts/test.sh does)");
  const env = { ...process.env, NO_COLOR: "1" };
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
});

after(() => {
  easel?.kill("SIGTERM");
  server?.close();
  server?.closeAllConnections();
  rmSync(dir, { recursive: true, force: true });
});

// The upstream's chunks as the client sees them: easel names the model as the client asked (`chat-llm`).
const AS_ASKED = TOOL_STREAM.map((c) => ({ ...c, model: "chat-llm" }));

const client = () => new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0, timeout: 30_000 });

test("a streamed chat completion arrives chunk by chunk with its tool call and usage", async () => {
  // The upstream sends its first chunk, then waits until the SDK has it: a relay that buffered would hang here.
  let open;
  gate = new Promise((r) => (open = r));
  const stream = await client().chat.completions.create({
    model: "chat-llm",
    messages: [{ role: "user", content: "What is the weather in Paris?" }],
    tools: [{ type: "function", function: { name: "get_weather", parameters: { type: "object" } } }],
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const c of stream) {
    chunks.push(c);
    if (chunks.length === 1) open();
  }
  gate = null;
  assert.equal(chunks.length, TOOL_STREAM.length + 1, "every chunk and the usage chunk, none merged or lost");
  assert.deepEqual(chunks.slice(0, -1), AS_ASKED, "each chunk as the upstream sent it, named as the client asked");
  const text = chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("");
  assert.equal(text, "Checking the weather.");
  const calls = chunks.flatMap((c) => c.choices[0]?.delta?.tool_calls ?? []);
  assert.equal(calls[0].id, "call_1");
  assert.equal(calls[0].function.name, "get_weather");
  assert.deepEqual(JSON.parse(calls.map((t) => t.function.arguments ?? "").join("")), { city: "Paris" });
  assert.equal(chunks.at(-2).choices[0].finish_reason, "tool_calls");
  assert.deepEqual(chunks.at(-1).choices, []);
  assert.deepEqual(chunks.at(-1).usage, USAGE);
  assert.equal(received.at(-1).model, "up-llm", "easel asked the upstream by its own name");
});

test("a stream without usage asked gets none, though easel asked it upstream", async () => {
  const stream = await client().chat.completions.create({
    model: "chat-llm",
    messages: [{ role: "user", content: "hi" }],
    stream: true,
  });
  const chunks = [];
  for await (const c of stream) chunks.push(c);
  assert.deepEqual(chunks, AS_ASKED);
  assert.deepEqual(received.at(-1).stream_options, { include_usage: true });
});

test("errors are the SDK's APIError: easel's own and the upstream's", async () => {
  await assert.rejects(
    client().chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "hi" }], stream: true }),
    (e) => {
      assert.ok(e instanceof OpenAI.APIError, `not an APIError: ${e}`);
      assert.ok(e.status >= 400 && e.status < 500, `status ${e.status}`);
      assert.match(e.message, /no-such-model/);
      assert.equal(typeof e.error?.type, "string");
      return true;
    },
  );
  await assert.rejects(
    client().chat.completions.create({ model: "chat-llm", messages: [{ role: "user", content: "too long" }], stream: true }),
    (e) => {
      assert.ok(e instanceof OpenAI.APIError, `not an APIError: ${e}`);
      assert.match(e.message, /maximum context length/);
      return true;
    },
  );
});

test("an image generation", async () => {
  const res = await client().images.generate({ model: "easel-sim", prompt: "a red fox", size: "64x64", response_format: "b64_json" });
  assert.equal(res.data.length, 1);
  const png = Buffer.from(res.data[0].b64_json, "base64");
  assert.deepEqual([...png.subarray(1, 4)], [...Buffer.from("PNG")]);
});

function tinyPng() {
  // A 1x1 opaque PNG (the simulated backend resizes inputs to the asked size).
  return Buffer.from(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==",
    "base64",
  );
}

test("images.createVariation through an alias", async () => {
  const file = await OpenAI.toFile(tinyPng(), "in.png", { type: "image/png" });
  const res = await client().images.createVariation({ image: file, model: "dall-e-2", n: 2, size: "32x32", response_format: "b64_json" });
  assert.equal(res.data.length, 2);
  assert.equal(res.size, "32x32");
  const png = Buffer.from(res.data[0].b64_json, "base64");
  assert.equal(png.readUInt32BE(16), 32);
});

test("a gpt-image-1 call reads quality and background, and no usage is invented", async () => {
  const res = await client().images.generate({ model: "gpt-image-1", prompt: "a fox", quality: "high", background: "transparent" });
  assert.equal(res.quality, "high");
  assert.equal(res.background, "transparent");
  assert.equal(res.output_format, "png");
  assert.equal(res.usage, undefined, "the simulated backend reports no token usage");
  assert.ok(res.data[0].b64_json || res.data[0].url);
});
