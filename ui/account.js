// Account and admin: the key's balance and usage (/v1/me, /v1/usage); with the admin token, the keys (create with
// the secret shown once, revoke, grant credits) and the ledger check.

import { json, call, creds } from "./api.js";

const $ = (id) => document.getElementById(id);
let toast;

const cell = (text) => {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  return td;
};

async function loadMe() {
  const me = $("me");
  const tbody = $("usage").querySelector("tbody");
  me.replaceChildren();
  tbody.replaceChildren();
  $("me-none").hidden = !!creds.key;
  if (!creds.key) return;
  try {
    const m = await json("/v1/me");
    const rows = [
      ["Key", m.name],
      ["Available", `${m.credits.available} credits`],
      ["Held", `${m.credits.held} credits`],
      ["Models", m.allowed_models ? m.allowed_models.join(", ") : "all"],
    ];
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      dd.dataset.field = k.toLowerCase();
      me.append(dt, dd);
    }
    const usage = await json("/v1/usage");
    for (const u of usage.data) {
      const tr = document.createElement("tr");
      tr.append(cell(u.day), cell(u.model), cell(u.requests), cell(u.images), cell(u.credits));
      tbody.append(tr);
    }
  } catch (e) {
    $("me-none").hidden = false;
    $("me-none").textContent = e.message;
  }
}

async function loadKeys() {
  const tbody = $("keys").querySelector("tbody");
  tbody.replaceChildren();
  const on = !!creds.admin;
  $("admin-none").hidden = on;
  for (const e of $("admin").querySelectorAll("form, table, #ledger-check")) e.hidden = !on;
  if (!on) return;
  try {
    const keys = await json("/v1/admin/keys", { admin: true });
    for (const k of keys.data) {
      const tr = document.createElement("tr");
      const actions = document.createElement("td");
      const grant = document.createElement("button");
      grant.type = "button";
      grant.className = "secondary";
      grant.textContent = "Grant";
      grant.setAttribute("aria-label", `Grant credits to ${k.name}`);
      grant.addEventListener("click", async () => {
        const v = prompt(`Credits to add to ${k.name} (negative to take back):`, "10");
        if (v === null || v.trim() === "" || !Number.isFinite(Number(v))) return;
        await act(() => json(`/v1/admin/keys/${encodeURIComponent(k.id)}/credits`, { admin: true, body: { credits: Number(v) } }), `Granted ${v} to ${k.name}`);
      });
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.className = "danger";
      revoke.textContent = "Revoke";
      revoke.disabled = k.revoked;
      revoke.setAttribute("aria-label", `Revoke ${k.name}`);
      revoke.addEventListener("click", async () => {
        if (!confirm(`Revoke ${k.name}? Requests with it will be refused.`)) return;
        await act(() => json(`/v1/admin/keys/${encodeURIComponent(k.id)}`, { admin: true, method: "DELETE" }), `Revoked ${k.name}`);
      });
      actions.append(grant, " ", revoke);
      tr.append(cell(k.name), cell(k.prefix), cell(k.credits.available), cell(k.credits.held), cell(k.revoked ? "revoked" : "active"), actions);
      tbody.append(tr);
    }
  } catch (e) {
    $("admin-none").hidden = false;
    $("admin-none").textContent = e.message;
  }
}

async function act(f, done) {
  try {
    await f();
    toast(done);
  } catch (e) {
    toast(e.message);
  }
  await Promise.all([loadKeys(), loadMe()]);
}

export function refreshAccount() {
  return Promise.all([loadMe(), loadKeys()]);
}

export function initAccount(showToast) {
  toast = showToast;
  $("key-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { name: $("key-name").value.trim(), credits: Number($("key-credits").value || 0) };
    const models = $("key-models").value.split(",").map((s) => s.trim()).filter(Boolean);
    if (models.length) body.models = models;
    try {
      const k = await json("/v1/admin/keys", { admin: true, body });
      $("key-secret-name").textContent = k.name;
      $("key-secret-value").textContent = k.secret;
      $("key-secret").hidden = false;
      $("key-use").focus();
    } catch (e) {
      toast(e.message);
    }
    loadKeys();
  });
  $("key-use").addEventListener("click", () => {
    creds.set($("key-secret-value").textContent, creds.admin);
    $("key-secret").hidden = true;
    $("key-secret-value").textContent = "";
    toast("Using the new key in this tab");
  });
  $("key-copy").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("key-secret-value").textContent));
  $("ledger-check").addEventListener("click", async () => {
    const out = $("ledger-result");
    out.textContent = "checking…";
    try {
      const r = await call("/v1/admin/ledger/check", { admin: true, allowError: true });
      if (r.status === 200) {
        out.textContent = "clean";
        out.className = "ok";
      } else {
        out.textContent = r.body && r.body.drift ? `drift: ${JSON.stringify(r.body.drift)}` : `HTTP ${r.status}`;
        out.className = "bad";
      }
    } catch (e) {
      out.textContent = e.message;
      out.className = "bad";
    }
  });
}
