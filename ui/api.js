// Talking to easel: the key and admin token from session storage, JSON calls that raise easel's error message,
// a fetch-based Server-Sent Events reader (EventSource cannot send a key), and the request shown as code.

const KEY = "easel.apiKey";
const ADMIN = "easel.adminToken";

export const creds = {
  get key() { return sessionStorage.getItem(KEY) || ""; },
  get admin() { return sessionStorage.getItem(ADMIN) || ""; },
  set(key, admin) {
    key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY);
    admin ? sessionStorage.setItem(ADMIN, admin) : sessionStorage.removeItem(ADMIN);
    window.dispatchEvent(new CustomEvent("easel:creds"));
  },
};

/** An answer that was not 2xx, with easel's (OpenAI-shaped) error. */
export class ApiError extends Error {
  constructor(status, body) {
    const e = body && body.error;
    super(e && e.message ? e.message : `HTTP ${status}`);
    this.status = status;
    this.code = e && e.code;
    this.body = body;
  }
}

function headers(opts) {
  const h = new Headers(opts.headers || {});
  const token = opts.admin ? creds.admin : creds.key;
  if (token) h.set("Authorization", `Bearer ${token}`);
  return h;
}

/** Calls `path`; a plain object body is sent as JSON, FormData as multipart. Resolves to {status, body, headers}. */
export async function call(path, opts = {}) {
  const h = headers(opts);
  let body = opts.body;
  if (body && !(body instanceof FormData) && typeof body !== "string") {
    h.set("Content-Type", "application/json");
    body = JSON.stringify(body);
  }
  const resp = await fetch(path, { method: opts.method || (body ? "POST" : "GET"), headers: h, body, signal: opts.signal });
  const text = await resp.text();
  let parsed = text;
  try { parsed = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!resp.ok && !opts.allowError) throw new ApiError(resp.status, parsed);
  return { status: resp.status, body: parsed, headers: resp.headers };
}

export const json = async (path, opts) => (await call(path, opts)).body;

/** Reads a `text/event-stream` answer, calling `onEvent(name, data, id)` per event (data parsed as JSON when it is). */
export async function events(path, opts, onEvent) {
  const resp = await fetch(path, { method: opts.method || "GET", headers: opts.h || headers(opts), body: opts.body, signal: opts.signal });
  if (!resp.ok) {
    let b = null;
    try { b = await resp.json(); } catch { /* empty */ }
    throw new ApiError(resp.status, b);
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
      let name = "message", id = null;
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "event") name = val;
        else if (field === "data") data.push(val);
        else if (field === "id") id = val;
      }
      if (!data.length) continue;
      let d = data.join("\n");
      try { d = JSON.parse(d); } catch { /* plain text, e.g. [DONE] */ }
      if (onEvent(name, d, id) === false) { reader.cancel(); return; }
    }
  }
}

/** Fetches a binary resource with the key (for content a signed URL does not cover): {url, type}, an object URL. */
export async function blobUrl(path) {
  const resp = await fetch(path, { headers: headers({}) });
  if (!resp.ok) throw new ApiError(resp.status, null);
  const blob = await resp.blob();
  return { url: URL.createObjectURL(blob), type: blob.type };
}

const sq = (s) => `'${String(s).replace(/'/g, `'\\''`)}'`;

/** The request as a shell command; the key stays `$EASEL_API_KEY`. `form` lists multipart fields [name, value|File]. */
export function curl({ path, body, form, extraHeaders = [] }) {
  const base = location.origin;
  const lines = [`curl ${sq(base + path)}`, `  -H "Authorization: Bearer $EASEL_API_KEY"`];
  for (const h of extraHeaders) lines.push(`  -H ${sq(h)}`);
  if (form) {
    for (const [k, v] of form) lines.push(v instanceof File ? `  -F ${sq(`${k}=@${v.name}`)}` : `  -F ${sq(`${k}=${v}`)}`);
  } else if (body) {
    lines.push(`  -H 'Content-Type: application/json'`, `  -d ${sq(JSON.stringify(body, null, 2))}`);
  }
  return lines.join(" \\\n");
}

const py = (v) => (v === null ? "None" : v === true ? "True" : v === false ? "False" : JSON.stringify(v));

/** The request with the official OpenAI Python SDK; easel's own fields travel in `extra_body`. */
export function python({ method, args, extra = {}, files = {}, extraHeaders = {} }) {
  const out = ["from openai import OpenAI", "", `client = OpenAI(base_url=${py(location.origin + "/v1")}, api_key=os.environ["EASEL_API_KEY"])`, ""];
  out.unshift("import os");
  const lines = Object.entries(args).filter(([, v]) => v !== undefined && v !== "").map(([k, v]) => `    ${k}=${py(v)},`);
  for (const [k, name] of Object.entries(files)) lines.push(`    ${k}=open(${py(name)}, "rb"),`);
  const ex = Object.entries(extra).filter(([, v]) => v !== undefined && v !== "");
  if (ex.length) lines.push(`    extra_body={${ex.map(([k, v]) => `${py(k)}: ${py(v)}`).join(", ")}},`);
  if (Object.keys(extraHeaders).length) lines.push(`    extra_headers=${JSON.stringify(extraHeaders)},`);
  out.push(`result = client.${method}(`, ...lines, ")");
  return out.join("\n");
}
