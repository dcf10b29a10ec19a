// The gallery: stored outputs from `GET /v1/files` (the key's own with keys on), newest first, a page at a time,
// kept across visits; a full-size view with download and the request that made each. Base64 answers are not
// stored by the server, so those stay in this page only.

import { call, ApiError } from "./api.js";

const $ = (id) => document.getElementById(id);
const PAGE = 24;
let cursor = null;
let loading = null;

function view(item) {
  const isVideo = item.kind === "video" && item.mime.startsWith("video/");
  const img = $("viewer-img");
  const video = $("viewer-video");
  img.hidden = isVideo;
  video.hidden = !isVideo;
  if (isVideo) {
    video.src = item.src;
    video.poster = item.poster || "";
    img.removeAttribute("src");
  } else {
    img.src = item.src;
    img.alt = item.caption;
    video.removeAttribute("src");
  }
  $("viewer-req").textContent = item.request;
  $("viewer-meta").textContent = item.meta;
  $("viewer-dl").href = item.src;
  $("viewer-dl").setAttribute("download", item.filename || "");
  $("viewer").showModal();
}

function tile(item) {
  const li = document.createElement("li");
  if (item.id) li.dataset.id = item.id;
  const b = document.createElement("button");
  b.type = "button";
  b.setAttribute("aria-label", `Open: ${item.caption}`);
  if (!item.poster && item.mime.startsWith("video/")) {
    const v = document.createElement("video");
    v.src = item.src;
    v.muted = true;
    v.preload = "metadata";
    v.setAttribute("aria-hidden", "true");
    b.append(v);
  } else {
    const img = document.createElement("img");
    img.src = item.poster || item.src;
    img.alt = item.caption;
    img.loading = "lazy";
    b.append(img);
  }
  if (item.kind === "video") {
    const tag = document.createElement("span");
    tag.className = "badge tile-kind";
    tag.textContent = "video";
    b.append(tag);
  }
  b.addEventListener("click", () => view(item));
  li.append(b);
  return li;
}

function fromFile(f) {
  const req = f.request || {};
  const when = new Date(f.created_at * 1000).toLocaleString();
  return {
    id: f.id,
    kind: f.kind,
    mime: f.mime_type,
    src: f.url,
    poster: f.poster_url || null,
    filename: f.filename,
    caption: req.prompt || f.id,
    request: JSON.stringify(req, null, 2),
    meta: `${f.model || ""} · ${when} · ${Math.round(f.bytes / 1024)} KiB`,
  };
}

function hint(text) {
  const h = $("gal-hint");
  h.textContent = text;
  h.hidden = !text;
}

/** Loads the next page (or the first, with `reset`). */
export function loadGallery(reset = false) {
  if (loading && !reset) return loading;
  if (reset) cursor = null;
  const after = cursor ? `&after=${encodeURIComponent(cursor)}` : "";
  loading = (async () => {
    try {
      const { body } = await call(`/v1/files?limit=${PAGE}${after}`);
      const list = $("gallery");
      if (reset) list.replaceChildren(...list.querySelectorAll("li.local"));
      for (const f of body.data) {
        if (!list.querySelector(`li[data-id="${CSS.escape(f.id)}"]`)) list.append(tile(fromFile(f)));
      }
      cursor = body.last_id || cursor;
      $("gal-more").hidden = !body.has_more;
      hint(list.children.length ? "" : "Nothing made yet: generate something above.");
    } catch (e) {
      $("gal-more").hidden = true;
      if (e instanceof ApiError && e.status === 401) hint("Enter your API key (top right) to see what it made.");
      else hint(`Cannot list outputs: ${e.message}`);
    } finally {
      loading = null;
    }
  })();
  return loading;
}

/** A fresh answer: stored outputs come back from the server's list (with their request); base64 ones are shown
 * here only. */
export function addOutput(src, caption, request) {
  if (!src.startsWith("data:")) return loadGallery(true);
  const li = tile({ src, caption, request, kind: "image", mime: "image/png", meta: "not stored (base64 answer)", filename: "" });
  li.classList.add("local");
  $("gallery").prepend(li);
  hint("");
  return Promise.resolve();
}

export function initGallery() {
  $("gal-more").addEventListener("click", () => loadGallery(false));
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("viewer").addEventListener("close", () => $("viewer-video").pause());
  loadGallery(true);
}
