// The page's shell: the key form, the pages behind #playground / #fleet / #account, and short notices.

import { creds } from "./api.js";
import { initPlayground, loadModels } from "./playground.js";
import { loadGallery } from "./gallery.js";
import { showFleet } from "./fleet.js";
import { initAccount, refreshAccount } from "./account.js";

const $ = (id) => document.getElementById(id);
const PAGES = ["playground", "fleet", "account"];
let playgroundReady = false;
let toastTimer;

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
}

function credsState() {
  const parts = [];
  if (creds.key) parts.push("key");
  if (creds.admin) parts.push("admin");
  $("creds-state").textContent = parts.length ? `(${parts.join(" + ")})` : "";
  $("api-key").value = creds.key;
  $("admin-token").value = creds.admin;
}

function show() {
  const page = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : "playground";
  for (const p of PAGES) $(`page-${p}`).hidden = p !== page;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `easel · ${page[0].toUpperCase()}${page.slice(1)}`;
  // Each page loads what it shows when first shown (the playground needs a key where keys are on).
  if (page === "playground") {
    if (!playgroundReady) initPlayground();
    playgroundReady = true;
  }
  showFleet(page === "fleet");
  if (page === "account") refreshAccount();
}

document.addEventListener("DOMContentLoaded", () => {
  credsState();
  $("creds-form").addEventListener("submit", (e) => {
    e.preventDefault();
    creds.set($("api-key").value.trim(), $("admin-token").value.trim());
    $("creds").open = false;
    toast("Saved for this tab");
  });
  $("creds-clear").addEventListener("click", () => {
    creds.set("", "");
    toast("Forgotten");
  });
  window.addEventListener("easel:creds", () => {
    credsState();
    if (playgroundReady) {
      loadModels();
      loadGallery(true);
    }
    show();
  });
  initAccount(toast);
  window.addEventListener("hashchange", show);
  show();
});
