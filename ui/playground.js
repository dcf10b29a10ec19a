// The playground: pick a model from /v1/models, build its request, run it (images as async jobs watched over
// their event stream, videos as jobs with a player, text as a streamed chat), and show the request as code.

import { call, json, events, blobUrl, curl, python, creds } from "./api.js";
import { MaskPainter } from "./mask.js";
import { addOutput, initGallery, loadGallery } from "./gallery.js";

const $ = (id) => document.getElementById(id);
let models = [];
let running = null; // AbortController of the current run
let lang = "curl";
let painter;
let editFile = null;
const chat = [];

const fmtPrice = (p) => {
  if (!p) return "free";
  if (p.unit === "1k_tokens") return `${p.input_per_1k} in / ${p.output_per_1k} out per 1K tokens`;
  return `${p.credits} credits per ${p.unit}`;
};

const current = () => models.find((m) => m.id === $("pg-model").value);
const kind = () => (current() ? current().meta.type : "image");
const mode = () => document.querySelector('input[name="mode"]:checked').value;

export async function loadModels() {
  const sel = $("pg-model");
  const keep = sel.value;
  try {
    models = (await json("/v1/models")).data;
  } catch (e) {
    showError(`Could not list models: ${e.message}`);
    return;
  }
  sel.replaceChildren();
  const groups = {};
  for (const m of models) (groups[m.meta.type] ||= []).push(m);
  for (const [type, list] of Object.entries(groups)) {
    const g = document.createElement("optgroup");
    g.label = type;
    for (const m of list) g.append(new Option(`${m.id} — ${m.meta.status}`, m.id));
    sel.append(g);
  }
  if (models.some((m) => m.id === keep)) sel.value = keep;
  onModel();
}

function onModel() {
  const m = current();
  const info = $("pg-model-info");
  info.replaceChildren();
  if (!m) return;
  const meta = m.meta;
  const rows = [
    ["Type", meta.type],
    ["Status", meta.status],
    ["Backends", meta.backends.map((b) => `${b.name} (${b.kind}${b.healthy ? "" : ", down"})`).join(", ") || "none"],
    ["Price", fmtPrice(meta.pricing)],
  ];
  if (meta.working_set) rows.push(["Working set", `${meta.working_set}${meta.host ? ` on ${meta.host}` : ""}`]);
  if (meta.description) rows.push(["About", meta.description]);
  if (meta.simulated) rows.push(["Note", "simulated: procedural output, no model runs"]);
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    if (k === "Status") dd.className = v === "ready" ? "ok" : v === "unavailable" ? "bad" : "warn";
    info.append(dt, dd);
  }
  const sizes = meta.sizes && meta.sizes.length ? meta.sizes : [meta.default_size];
  for (const id of ["pg-size", "pg-vsize"]) {
    const s = $(id);
    s.replaceChildren(...sizes.map((x) => new Option(x === meta.default_size ? `${x} (default)` : x, x)));
    s.value = meta.default_size;
  }
  $("pg-n").max = meta.max_n;
  for (const f of document.querySelectorAll("#pg-form fieldset[data-for]")) f.hidden = f.dataset.for !== meta.type;
  $("pg-go").textContent = meta.type === "text" ? "Send" : mode() === "edit" && meta.type === "image" ? "Edit" : "Generate";
  renderCode();
}

const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));
const str = (id) => $(id).value.trim() || undefined;

/** The request the form describes: {path, body | form, code}. */
function request() {
  const m = current();
  if (!m) return null;
  const model = m.id;
  const async = ["Prefer: respond-async"];
  if (kind() === "text") {
    const messages = [];
    if (str("pg-system")) messages.push({ role: "system", content: str("pg-system") });
    messages.push(...chat, { role: "user", content: $("pg-message").value });
    const body = { model, messages, stream: true };
    return {
      path: "/v1/chat/completions", body,
      curl: curl({ path: "/v1/chat/completions", body }),
      python: python({ method: "chat.completions.create", args: body }) + "\nfor chunk in result:\n    print(chunk.choices[0].delta.content or \"\", end=\"\")",
    };
  }
  if (kind() === "video") {
    const body = { model, prompt: $("pg-vprompt").value, size: $("pg-vsize").value, seconds: String(num("pg-seconds") ?? 4) };
    if (num("pg-vseed") !== undefined) body.seed = num("pg-vseed");
    return {
      path: "/v1/videos", body,
      curl: curl({ path: "/v1/videos", body }),
      python: python({ method: "videos.create", args: { model, prompt: body.prompt, size: body.size, seconds: body.seconds }, extra: { seed: body.seed } }),
    };
  }
  const fields = {
    model, prompt: $("pg-prompt").value, n: num("pg-n"), size: $("pg-size").value, response_format: "url",
    output_format: str("pg-format"), negative_prompt: str("pg-negative"), seed: num("pg-seed"), steps: num("pg-steps"),
    guidance_scale: num("pg-guidance"),
  };
  for (const k of Object.keys(fields)) if (fields[k] === undefined) delete fields[k];
  const std = ["model", "prompt", "n", "size", "response_format", "output_format"];
  const args = Object.fromEntries(Object.entries(fields).filter(([k]) => std.includes(k)));
  const extra = Object.fromEntries(Object.entries(fields).filter(([k]) => !std.includes(k)));
  if (mode() === "edit") {
    const form = Object.entries(fields).map(([k, v]) => [k, String(v)]);
    const image = editFile || new File([], "image.png");
    form.push(["image", image], ["mask", new File([], "mask.png")]);
    return {
      path: "/v1/images/edits", fields, form,
      curl: curl({ path: "/v1/images/edits", form, extraHeaders: async }),
      python: python({ method: "images.edit", args, extra, files: { image: image.name, mask: "mask.png" }, extraHeaders: { Prefer: "respond-async" } })
        + "\n# With Prefer: respond-async the answer is a job: GET /v1/jobs/{id} or its /events stream.",
    };
  }
  return {
    path: "/v1/images/generations", body: fields,
    curl: curl({ path: "/v1/images/generations", body: fields, extraHeaders: async }),
    python: python({ method: "images.generate", args, extra }) + "\nprint(result.data[0].url)",
  };
}

function renderCode() {
  const r = request();
  $("pg-code-text").textContent = r ? r[lang] : "";
}

function showError(msg) {
  const e = $("pg-error");
  e.textContent = msg;
  e.hidden = !msg;
}

function setProgress(value, text) {
  if (value !== null) $("pg-progress").value = value;
  $("pg-progress-text").textContent = text;
}

function showImages(result, prompt, code) {
  const out = $("pg-result");
  out.replaceChildren();
  for (const d of (result && result.data) || []) {
    const src = d.url || `data:image/${result.output_format || "png"};base64,${d.b64_json}`;
    const img = document.createElement("img");
    img.src = src;
    img.alt = `Generated: ${prompt}`;
    img.className = "output";
    out.append(img);
    addOutput(src, prompt, code);
  }
  if (result && result.partial) showError(`Only ${result.partial.produced} of ${result.partial.requested} images: ${result.partial.error}`);
}

/** Follows a job's event stream until it ends (resuming with `Last-Event-ID` if the connection drops); resolves to
 * the last job object. */
async function watch(path, signal, onDone) {
  let last = null;
  let lastId = null;
  let ended = false;
  for (let attempt = 0; !ended && attempt < 5; attempt++) {
    const headers = lastId ? { "Last-Event-ID": lastId } : {};
    try {
      await events(path, { signal, headers }, (name, data, id) => {
        if (id) lastId = id;
        const more = onEvent(name, data);
        if (!more) ended = true;
        return more;
      });
    } catch (e) {
      if (e.name === "AbortError" || e.status) throw e;
    }
    if (!ended) await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
  }
  if (!ended) throw new Error(`lost the event stream of ${path}; the job goes on (GET ${path.replace(/\/events$/, "")})`);
  if (last && (last.status === "completed" || last.status === "succeeded")) await onDone(last);
  return last;

  function onEvent(name, data) {
    if (name === "preview") {
      const p = $("pg-preview");
      p.src = data.image;
      p.hidden = false;
      setProgress(data.progress, `running ${data.progress}%`);
      return true;
    }
    last = data;
    if (name === "queued") setProgress(0, data.queue_position ? `queued (position ${data.queue_position})` : "queued");
    else if (name === "started") setProgress(data.progress || 0, "started");
    else if (name === "progress") setProgress(data.progress, `running ${data.progress}%`);
    else if (name === "completed") {
      setProgress(100, "completed");
      $("pg-preview").hidden = true;
    }
    else if (name === "failed") {
      setProgress(null, data.status || "failed");
      showError((data.error && data.error.message) || "the job failed");
    }
    return name !== "completed" && name !== "failed";
  }
}

async function runImage(r, signal) {
  let resp;
  if (r.form) {
    if (!editFile) throw new Error("choose an image to edit first");
    if (!painter.painted) throw new Error("paint the area to change on the image (or press “Change everything”)");
    const fd = new FormData();
    for (const [k, v] of Object.entries(r.fields)) fd.append(k, String(v));
    fd.append("image", editFile, editFile.name);
    fd.append("mask", await painter.toBlob(), "mask.png");
    resp = await call(r.path, { body: fd, headers: { Prefer: "respond-async" }, signal });
  } else {
    resp = await call(r.path, { body: r.body, headers: { Prefer: "respond-async" }, signal });
  }
  const prompt = (r.fields || r.body).prompt;
  if (resp.status !== 202) return showImages(resp.body, prompt, r[lang]);
  const job = resp.body;
  setProgress(job.progress || 0, job.status);
  await watch(`/v1/jobs/${encodeURIComponent(job.id)}/events`, signal, (done) => showImages(done.result, prompt, r.curl));
}

async function runVideo(r, signal) {
  const v = await json(r.path, { body: r.body, signal });
  setProgress(v.progress || 0, v.status);
  await watch(`/v1/videos/${encodeURIComponent(v.id)}/events`, signal, async () => {
    const { url, type } = await blobUrl(`/v1/videos/${encodeURIComponent(v.id)}/content`);
    // Some backends make animated images (the simulated one a GIF): those play in an <img>.
    const still = type.startsWith("image/");
    const video = document.createElement(still ? "img" : "video");
    video.src = url;
    video.className = "clip";
    if (still) video.alt = `Clip: ${r.body.prompt}`;
    else {
      video.controls = true;
      video.loop = true;
      video.setAttribute("aria-label", `Clip: ${r.body.prompt}`);
    }
    const dl = document.createElement("a");
    dl.href = url;
    dl.download = `${v.id}.${(type.split("/")[1] || "bin").split(";")[0]}`;
    dl.textContent = "Download";
    $("pg-result").replaceChildren(video, dl);
    loadGallery(true);
  });
}

async function runText(r, signal) {
  const log = $("chat-log");
  const user = $("pg-message").value;
  const bubble = (role, text) => {
    const d = document.createElement("div");
    d.className = `msg ${role}`;
    d.textContent = text;
    log.append(d);
    log.scrollTop = log.scrollHeight;
    return d;
  };
  bubble("user", user);
  const answer = bubble("assistant", "");
  setProgress(null, "streaming");
  let text = "";
  await events(r.path, {
    method: "POST", signal, body: JSON.stringify(r.body),
    h: new Headers({ "Content-Type": "application/json", ...(creds.key ? { Authorization: `Bearer ${creds.key}` } : {}) }),
  }, (_name, data) => {
    if (data === "[DONE]") return false;
    const delta = data && data.choices && data.choices[0] && data.choices[0].delta;
    if (delta && delta.content) {
      text += delta.content;
      answer.textContent = text;
    }
    return true;
  });
  chat.push({ role: "user", content: user }, { role: "assistant", content: text });
  $("pg-message").value = "";
  setProgress(null, "done");
  renderCode();
}

async function run(ev) {
  ev.preventDefault();
  const r = request();
  if (!r) return;
  showError("");
  $("pg-preview").hidden = true;
  if (kind() !== "text") $("pg-result").replaceChildren();
  setProgress(0, "sending");
  running = new AbortController();
  $("pg-go").disabled = true;
  $("pg-cancel").hidden = false;
  try {
    if (kind() === "text") await runText(r, running.signal);
    else if (kind() === "video") await runVideo(r, running.signal);
    else await runImage(r, running.signal);
  } catch (e) {
    if (e.name === "AbortError") setProgress(null, "canceled");
    else {
      setProgress(null, "failed");
      showError(e.message);
    }
  } finally {
    running = null;
    $("pg-go").disabled = false;
    $("pg-cancel").hidden = true;
  }
}

function chooseFile(file) {
  if (!file) return;
  editFile = file;
  const img = new Image();
  img.onload = () => {
    painter.load(img);
    $("pg-mask-wrap").hidden = false;
    $("pg-mask-tools").hidden = false;
    URL.revokeObjectURL(img.src);
    renderCode();
  };
  img.onerror = () => showError(`${file.name} is not an image the browser can show`);
  img.src = URL.createObjectURL(file);
}

export function initPlayground() {
  painter = new MaskPainter($("pg-base"), $("pg-mask"), $("pg-brush"));
  initGallery();
  $("pg-model").addEventListener("change", onModel);
  $("pg-form").addEventListener("input", renderCode);
  $("pg-form").addEventListener("submit", run);
  $("pg-cancel").addEventListener("click", () => running && running.abort());
  for (const r of document.querySelectorAll('input[name="mode"]')) {
    r.addEventListener("change", () => {
      $("pg-edit").hidden = mode() !== "edit";
      onModel();
    });
  }
  $("pg-file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  const drop = $("pg-drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("pg-file").click(); } });
  $("pg-mask-all").addEventListener("click", () => painter.all());
  $("pg-mask-clear").addEventListener("click", () => painter.clear());
  for (const t of document.querySelectorAll("#pg-code .tab")) {
    t.addEventListener("click", () => {
      lang = t.dataset.lang;
      for (const o of document.querySelectorAll("#pg-code .tab")) o.setAttribute("aria-selected", String(o === t));
      renderCode();
    });
  }
  $("pg-copy").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("pg-code-text").textContent));
  loadModels();
}
