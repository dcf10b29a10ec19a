// The fleet: every backend's health, readiness, circuit and admission gauges from /v1/gateway/status and /health,
// the hosts with their working sets (activate one with the admin token) and the latest failed requests with their
// full messages; refreshed every two seconds while shown.

import { call, json, creds } from "./api.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
let timer = null;
let active = false;

const el = (tag, props = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k in e) e[k] = v;
    else e.setAttribute(k, v);
  }
  e.append(...kids.filter((k) => k !== null && k !== undefined));
  return e;
};

const badge = (text, cls) => el("span", { class: `badge ${cls}` }, text);

function gauges(admission) {
  const box = el("div", { class: "stack" });
  for (const [cap, g] of Object.entries(admission || {})) {
    const grid = el("div", { class: "gauge", role: "group", "aria-label": `${cap} admission` });
    const id = `g-${Math.random().toString(36).slice(2)}`;
    grid.append(
      el("label", { htmlFor: id }, cap),
      el("meter", { id, min: 0, max: g.limit || 1, value: g.inflight, title: `${g.inflight} of ${g.limit} in flight` }),
      el("span", { class: "muted" }, "in flight"), el("span", {}, `${g.inflight} / ${g.limit}${g.draining ? " (draining)" : ""}`),
      el("span", { class: "muted" }, "queued"), el("span", {}, `${g.queued} / ${g.queue_depth}`),
      el("span", { class: "muted" }, "p50"), el("span", {}, g.p50_ms === null || g.p50_ms === undefined ? "—" : `${g.p50_ms} ms`),
    );
    box.append(grid);
  }
  return box;
}

function backendCard(name, b, running) {
  const health = b.healthy ? badge("healthy", "ok") : badge("down", "bad");
  const ready = b.ready ? badge("ready", "ok") : badge("not ready", "warn");
  const circuit = badge(`circuit ${b.circuit}`, b.circuit === "closed" ? "ok" : "bad");
  const info = el("dl", { class: "info" });
  const row = (k, v) => v !== null && v !== undefined && v !== "" && info.append(el("dt", {}, k), el("dd", {}, String(v)));
  row("kind", b.kind);
  row("url", b.url);
  row("last check", b.last_check);
  row("probe", b.latency_ms !== null && b.latency_ms !== undefined ? `${b.latency_ms} ms` : null);
  row("jobs running", running);
  row("detail", b.detail);
  row("cooldown until", b.cooldown_until);
  const card = el("article", { class: "card stack backend", "data-backend": name, "aria-label": `Backend ${name}` },
    el("h3", {}, name, " ", health, " ", ready, " ", circuit), info);
  if (b.error) card.append(el("p", { class: "error" }, b.error));
  if (b.admission) card.append(gauges(b.admission));
  return card;
}

function hostCards(hosts, models) {
  const box = $("fleet-hosts");
  if (!hosts || !hosts.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No hosts configured."));
    return;
  }
  box.replaceChildren();
  for (const h of hosts) {
    const sets = [...new Set(models.filter((m) => m.meta.host === h.host && m.meta.working_set).map((m) => m.meta.working_set))];
    const card = el("article", { class: "card stack", "aria-label": `Host ${h.host}` },
      el("h3", {}, h.host, " ", badge(h.state || "—", h.state === "active" ? "ok" : h.state === "failed" ? "bad" : "warn")),
      el("p", { class: "muted" }, `mode ${h.mode} · active ${h.active_set || "none"}${h.target_set ? ` → ${h.target_set}` : ""} · ${Math.round(h.elapsed_s)} s in phase · swap queue ${h.swap_queue_depth}`));
    if (h.failed) card.append(el("p", { class: "error", role: "status" }, `${h.failed.set} failed (retry in ${Math.ceil(h.failed.retry_after_s)} s): ${h.failed.error}`));
    const members = el("ul", {});
    for (const m of h.members || []) {
      const restarts = m.restarts ? `, ${m.restarts} restart${m.restarts === 1 ? "" : "s"}${m.last_exit ? ` (last: ${m.last_exit})` : ""}` : "";
      members.append(el("li", {}, `${m.backend}: ${m.process}${m.pid ? ` (pid ${m.pid})` : ""}, ${m.in_flight} in flight${restarts}`));
    }
    card.append(members);
    for (const s of sets) {
      const btn = el("button", { type: "button", class: "secondary", disabled: !creds.admin || s === h.active_set }, `Activate ${s}`);
      btn.addEventListener("click", async () => {
        btn.disabled = true;
        try {
          await call(`/v1/admin/working-sets/${encodeURIComponent(s)}/activate`, { method: "POST", admin: true, allowError: false });
        } catch (e) {
          $("fleet-error").textContent = `Activating ${s}: ${e.message}`;
          $("fleet-error").hidden = false;
        }
        refresh();
      });
      card.append(btn);
    }
    box.append(card);
  }
}

function errorRows(errors) {
  const body = $("fleet-errors").tBodies[0];
  if (!errors || !errors.length) {
    body.replaceChildren(el("tr", {}, el("td", { colSpan: 5, class: "muted" }, "None since the gateway started.")));
    return;
  }
  body.replaceChildren(...errors.map((e) => el("tr", { "data-request": e.request_id },
    el("td", {}, new Date(e.at_ms).toLocaleTimeString()),
    el("td", {}, `${e.method} ${e.route}`, el("br"), el("code", { class: "muted" }, e.request_id)),
    el("td", {}, String(e.status)),
    el("td", {}, [e.model, e.backend].filter(Boolean).join(" / ") || "—"),
    el("td", { class: "message" }, e.message),
  )));
}

export async function refresh() {
  clearTimeout(timer);
  const err = $("fleet-error");
  const problems = [];
  const [status, health, models] = await Promise.all([
    call("/v1/gateway/status", { admin: true, allowError: true }).catch((e) => ({ status: 0, body: { error: { message: e.message } } })),
    call("/health", { allowError: true }).catch(() => ({ status: 0, body: null })),
    json("/v1/models").then((m) => m.data).catch(() => []),
  ]);
  let backends = {};
  let running = {};
  if (status.status === 200) {
    backends = status.body.backends;
    running = status.body.jobs_running || {};
    $("fleet-meta").textContent = `easel ${status.body.version} · up ${status.body.uptime_s} s · config ${status.body.config ?? "built-in"}`;
    hostCards(status.body.hosts, models);
    errorRows(status.body.recent_errors);
  } else {
    problems.push(`Admission gauges need the admin token: ${(status.body && status.body.error && status.body.error.message) || `HTTP ${status.status}`}`);
  }
  if (health.body && health.body.backends) {
    for (const [name, h] of Object.entries(health.body.backends)) backends[name] = { ...(backends[name] || {}), ...h };
    const overall = $("fleet-overall");
    overall.textContent = health.body.status;
    overall.className = `badge ${health.body.status === "healthy" ? "ok" : health.body.status === "degraded" ? "warn" : "bad"}`;
  }
  $("fleet-backends").replaceChildren(...Object.entries(backends).map(([n, b]) => backendCard(n, b, running[n])));
  err.textContent = problems.join("\n");
  err.hidden = !problems.length;
  if (active) timer = setTimeout(refresh, POLL_MS);
}

export function showFleet(on) {
  active = on;
  clearTimeout(timer);
  if (on) refresh();
}
