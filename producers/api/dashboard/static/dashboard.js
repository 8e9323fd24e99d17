// Kontext dashboard: polls /dashboard/api/overview and redraws; no framework, no build.
// The API key comes from the page's #key=… fragment (kept in sessionStorage) or the form.
"use strict";

const REFRESH_MS = Number(document.body.dataset.refreshMs) || 1500;
const KEY_STORE = "kontext.dashboard.key";
// Operators: /dashboard?tenant=NAME shows one tenant only.
const TENANT = new URLSearchParams(location.search).get("tenant");
const SCOPED = TENANT ? `?tenant=${encodeURIComponent(TENANT)}` : "";
let apiKey = null;
let chosenConversation = null;
let chosenTurn = null;
let conversationStamp = "";

function takeKey() {
  const match = location.hash.match(/key=([^&]+)/);
  if (match) {
    sessionStorage.setItem(KEY_STORE, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  apiKey = sessionStorage.getItem(KEY_STORE);
  document.getElementById("key-form").hidden = Boolean(apiKey);
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, document.getElementById("key-input").value.trim());
  takeKey();
  refresh();
});

document.getElementById("open-conversation").addEventListener("submit", (event) => {
  event.preventDefault();
  chosenConversation = document.getElementById("conversation-id").value.trim() || null;
  chosenTurn = null;
  conversationStamp = "";
  showConversation();
});

async function call(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers.authorization = "Bearer " + apiKey;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    const error = new Error(`${response.status}: ${message}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// el("td", {class: "x", "data-k": "y"}, "text", childNode, ...): text is never parsed as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value, digits = 1) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

function setK(name, value, digits) {
  for (const node of document.querySelectorAll(`[data-k="${name}"]`)) {
    node.textContent = fmt(value, digits);
  }
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// A line chart of several series over [t0, t1] on an SVG of viewBox 600x140.
function lineChart(svg, t0, t1, lines) {
  const W = 600, H = 140, pad = 14;
  const ns = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const parts = [];
  for (const frac of [0.25, 0.5, 0.75]) {
    parts.push(node("line", { class: "grid", x1: 0, x2: W, y1: pad + (H - 2 * pad) * frac, y2: pad + (H - 2 * pad) * frac }));
  }
  for (const line of lines) {
    const peak = Math.max(0, ...line.points.map((p) => p[1]));
    const max = Math.max(1, peak);
    const x = (t) => ((t - t0) / Math.max(1, t1 - t0)) * W;
    const y = (v) => H - pad - (v / max) * (H - 2 * pad);
    const d = line.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
    if (d) parts.push(node("path", { class: line.cls, d }));
    if (line.label) setK(line.label, peak, 1);
  }
  svg.replaceChildren(...parts);
}

function renderThroughput(data) {
  const tp = data.throughput;
  setK("jobs-per-s", tp.jobs_per_s, 2);
  setK("tokens-per-s", tp.tokens_per_s, 1);
  setK("verified-per-s", tp.verified_per_s, 2);
  setK("e2e-p50", tp.e2e_ms.p50, 0);
  setK("e2e-p95", tp.e2e_ms.p95, 0);
  const t1 = Math.floor(tp.now), t0 = t1 - tp.window_s;
  const bySecond = new Map(tp.series.map((s) => [s.t, s]));
  const points = (field) => {
    const out = [];
    for (let t = t0; t <= t1; t++) out.push([t, bySecond.has(t) ? bySecond.get(t)[field] : 0]);
    return out;
  };
  lineChart(document.getElementById("chart-throughput"), t0, t1, [
    { cls: "s1", points: points("jobs"), label: "chart-max-jobs" },
    { cls: "s2", points: points("verified"), label: "chart-max-verified" },
    { cls: "s3", points: points("tokens"), label: "chart-max-tokens" },
  ]);
  for (const status of ["queued", "running", "succeeded", "failed", "tokens"]) {
    setK(`jobs-${status}`, data.jobs[status]);
  }
}

function renderLatency(rows) {
  fill(document.querySelector("#latency tbody"), rows.map((r) =>
    el("tr", { "data-stage": r.stage }, el("td", {}, r.stage), el("td", {}, r.count),
      el("td", {}, fmt(r.p50)), el("td", {}, fmt(r.p95)), el("td", {}, fmt(r.p99)))));
}

function renderBatchSizes(models) {
  const body = document.querySelector("#batch-sizes .body");
  if (!models.length) { body.replaceChildren(el("p", { class: "muted" }, "no engine calls yet")); return; }
  body.replaceChildren(...models.map((m) => {
    const max = Math.max(1, ...m.buckets.map((b) => b.calls));
    return el("div", { "data-model": m.model },
      el("div", {}, el("b", {}, m.model), " · ", el("span", { "data-k-calls": "" }, m.calls), " calls, mean ",
        el("span", {}, fmt(m.mean, 2)), " requests/call · since start ",
        el("span", { "data-total-calls": "" }, m.total_calls), " calls, ",
        el("span", { "data-total-requests": "" }, m.total_requests), " requests"),
      el("div", { class: "hist" }, m.buckets.map((b) =>
        el("div", { title: `≤${b.le}: ${b.calls} calls`, style: `height:${(100 * b.calls) / max}%` }))),
      el("div", { class: "hist-labels" }, m.buckets.map((b) => el("span", {}, "≤" + b.le))));
  }));
}

function progress(counts) {
  const total = Math.max(1, counts.total);
  return el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": counts.total,
    "aria-valuenow": counts.completed + counts.failed },
  el("span", { class: "done", style: `width:${(100 * counts.completed) / total}%` }),
  el("span", { class: "failed", style: `width:${(100 * counts.failed) / total}%` }));
}

function renderBatches(batches) {
  const body = document.querySelector("#batches .body");
  if (!batches.length) { body.replaceChildren(el("p", { class: "muted" }, "no batches yet")); return; }
  body.replaceChildren(...batches.map((b) => {
    const c = b.request_counts;
    return el("div", { class: "batch", "data-batch": b.id, "data-status": b.status },
      el("div", { class: "head" }, el("code", {}, b.id.slice(0, 8)),
        el("span", { class: `status-${b.status}`, "data-field": "status" }, b.status)),
      progress(c),
      el("div", { class: "muted" },
        el("span", { "data-field": "completed" }, c.completed), " completed · ",
        el("span", { "data-field": "failed" }, c.failed), " failed · ",
        el("span", { "data-field": "total" }, c.total), " total"));
  }));
}

function renderWorkers(workers, groups) {
  fill(document.querySelector("#worker-list tbody"), workers.length ? workers.map((w) =>
    el("tr", { "data-worker": w.worker_id, "data-model": w.model },
      el("td", {}, el("code", {}, w.worker_id)), el("td", {}, w.model),
      el("td", { class: w.alive ? "status-Stable" : "status-dead" }, `${fmt(w.seen_s_ago)} s ago`),
      el("td", {}, fmt(w.lag)))) : [el("tr", {}, el("td", { colspan: 4, class: "muted" }, "no heartbeats yet"))]);
  fill(document.querySelector("#groups tbody"), groups.map((g) =>
    el("tr", { "data-group": g.group, title: `consumer group ${g.group}` }, el("td", {}, g.service), el("td", {}, g.model || "–"),
      el("td", {}, fmt(g.members)),
      el("td", { class: `status-${g.state}` }, g.state), el("td", { "data-field": "lag" }, g.lag))));
  fill(document.querySelector("#lag tbody"), groups.flatMap((g) => g.partitions.map((p) =>
    el("tr", { "data-lag": `${g.group}/${p.topic}/${p.partition}` }, el("td", {}, g.service),
      el("td", {}, p.topic), el("td", {}, p.partition), el("td", {}, fmt(p.committed)),
      el("td", {}, p.highwater), el("td", {}, p.lag)))));
}

function renderWebhooks(w) {
  const d = w.deliveries;
  const rows = [
    el("table", { class: "counts" }, el("tr", {},
      el("th", {}, "pending"), el("td", { "data-k": "hooks-pending" }, d.pending || 0),
      el("th", {}, "delivered"), el("td", { "data-k": "hooks-delivered" }, d.delivered || 0),
      el("th", {}, "dead"), el("td", { "data-k": "hooks-dead" }, d.dead || 0))),
    el("p", {}, `attempts in the last ${w.window_s / 60} min: ${w.attempts} (${w.ok} ok, ${w.failed} failed)`,
      w.p95_latency_ms === null ? "" : ` · p95 ${fmt(w.p95_latency_ms, 0)} ms`),
  ];
  if (w.problems.length) {
    rows.push(el("table", {}, el("tr", {}, el("th", {}, "url"), el("th", {}, "status"), el("th", {}, "tries"), el("th", {}, "last")),
      w.problems.map((p) => el("tr", {}, el("td", {}, p.url), el("td", { class: `status-${p.status}` }, p.status),
        el("td", {}, p.attempts), el("td", {}, p.last_status_code || p.last_error || "–")))));
  }
  document.querySelector("#webhooks .body").replaceChildren(...rows);
}

async function redeliver(letter, button) {
  button.disabled = true;
  button.textContent = "…";
  try {
    await call(`/dashboard/api/dead-letters/${letter.partition}/${letter.offset}/redeliver`, { method: "POST" });
    button.textContent = "redelivered";
  } catch (error) {
    button.textContent = "failed";
    button.title = error.message;
    button.disabled = false;
  }
}

function renderDeadLetters(letters) {
  const body = document.querySelector("#dead-letters .body");
  if (!letters.length) { body.replaceChildren(el("p", { class: "muted" }, "none")); return; }
  body.replaceChildren(el("table", {},
    el("tr", {}, ["when", "source", "consumer", "reason", "bytes", ""].map((h) => el("th", {}, h))),
    letters.map((l) => {
      const button = el("button", { disabled: !l.redeliverable || l.redelivered },
        l.redelivered ? "redelivered" : "redeliver");
      button.addEventListener("click", () => redeliver(l, button));
      return el("tr", { "data-letter": `${l.partition}/${l.offset}` },
        el("td", {}, l.failed_at ? new Date(l.failed_at).toLocaleTimeString() : "–"),
        el("td", {}, `${l.source_topic}[${l.source_partition}]@${l.source_offset}`),
        el("td", {}, l.consumer), el("td", {}, l.reason), el("td", {}, l.size), el("td", {}, button));
    })));
}

function renderConversationList(items) {
  const list = document.getElementById("conversation-list");
  list.replaceChildren(...items.map((c) => el("li", {
    "data-conversation": c.id, class: c.id === chosenConversation ? "selected" : null,
    onclick: () => { chosenConversation = c.id; chosenTurn = null; conversationStamp = ""; showConversation(); },
  }, el("div", {}, c.id), el("div", { class: "muted" }, `${c.turns} turns · ${c.summaries} summaries`))));
}

// The conversation as GET /v1/conversations/{id} shows it, and a chosen turn's prompt
// context: its job's result.context (recent turns, summaries, recalled memories).
async function showConversation() {
  if (!chosenConversation) return;
  const box = document.getElementById("conversation");
  let found;
  try {
    found = await call(`/dashboard/api/conversations/${encodeURIComponent(chosenConversation)}${SCOPED}`);
  } catch (error) {
    box.replaceChildren(el("p", { class: "error" }, error.message));
    return;
  }
  const conv = found.conversation;
  const job = chosenTurn ? found.jobs[chosenTurn.job_id] : null;
  const stamp = JSON.stringify([conv.turns.length, conv.summaries.length, chosenTurn && chosenTurn.seq, job && job.status]);
  if (stamp === conversationStamp) return;
  conversationStamp = stamp;
  const ctx = job ? job.context : null;
  const inPrompt = new Set(ctx ? ctx.turns : []);
  const recalled = new Set(ctx ? ctx.memories.filter((m) => m.conversation_id === conv.id).map((m) => m.seq) : []);
  const parts = [el("p", { class: "muted" }, `${conv.turns.length} turns, ${conv.summaries.length} summaries`,
    conv.user_id ? ` · user ${conv.user_id}` : "")];
  for (const s of conv.summaries) {
    parts.push(el("div", { class: "summary", "data-summary": `${s.level}/${s.first_seq}` },
      el("div", { class: "meta" }, `summary level ${s.level}, turns ${s.first_seq}–${s.last_seq}${s.rolled_up ? " (rolled up)" : ""}`), s.content));
  }
  if (ctx) {
    parts.push(el("div", { class: "context", "data-context-for": chosenTurn.seq },
      el("b", {}, `Prompt of turn ${chosenTurn.seq}: `),
      `${ctx.prompt_tokens} tokens of ${fmt(ctx.budget_tokens)} · recent turns `,
      el("span", { "data-field": "context-turns" }, ctx.turns.join(", ") || "none"),
      " · summaries ", ctx.summaries.map((s) => `L${s.level} ${s.first_seq}–${s.last_seq}`).join(", ") || "none",
      " · recalled ", el("span", { "data-field": "context-memories" },
        ctx.memories.map((m) => `${m.conversation_id}#${m.seq} (${m.similarity.toFixed(2)})`).join(", ") || "none"),
      ctx.truncated ? " · new message truncated" : ""));
  } else if (chosenTurn) {
    parts.push(el("div", { class: "context" }, `turn ${chosenTurn.seq}: its job is ${job ? job.status : "gone"}`));
  }
  for (const t of conv.turns) {
    const classes = ["turn", t.role];
    if (chosenTurn && t.job_id === chosenTurn.job_id) classes.push("chosen");
    else if (inPrompt.has(t.seq)) classes.push("in-prompt");
    else if (recalled.has(t.seq)) classes.push("recalled");
    parts.push(el("div", {
      class: classes.join(" "), "data-seq": t.seq, title: "show what went into this turn's prompt",
      onclick: () => { if (t.job_id) { chosenTurn = t; showConversation(); } },
    }, el("div", { class: "meta" }, `#${t.seq} ${t.role} · ${t.tokens} tokens`,
      inPrompt.has(t.seq) && !classes.includes("chosen") ? " · in the prompt" : "",
      recalled.has(t.seq) ? " · recalled" : ""), t.content));
  }
  box.replaceChildren(...parts);
}

// One job's timeline as a waterfall: a row per stage it reached, its bar spanning the
// wait since the stage before (webhook delivery: since it was recorded).
const STAGES = [
  ["accepted", "accepted", "recorded in the ledger"],
  ["admitted", "admitted", "queued, then claimed by the enricher"],
  ["enriched", "enriched", "prompt assembled from memory"],
  ["batched", "batched", "waited for its micro-batch"],
  ["generated", "generated", "the engine call"],
  ["recorded", "recorded", "finalised by the recorder"],
  ["replied", "replied", "reply published"],
  ["delivered", "delivered", "webhook delivered"],
];
let chosenJob = null;
let jobStamp = "";

document.getElementById("open-job").addEventListener("submit", (event) => {
  event.preventDefault();
  chosenJob = document.getElementById("job-id").value.trim() || null;
  jobStamp = "";
  showJob();
});

async function showJob() {
  if (!chosenJob) return;
  const box = document.getElementById("waterfall");
  let job;
  try {
    job = await call(`/v1/jobs/${encodeURIComponent(chosenJob)}?timeline=true`);
  } catch (error) {
    jobStamp = "";
    box.replaceChildren(el("p", { class: "error" }, error.message));
    return;
  }
  const stamp = JSON.stringify(job.timeline);
  if (stamp === jobStamp) return;
  jobStamp = stamp;
  const t = job.timeline;
  const at = (name) => (t[name] ? Date.parse(t[name]) : null);
  const t0 = at("accepted");
  const reached = STAGES.filter(([name]) => t[name]);
  const end = Math.max(...reached.map(([name]) => at(name)));
  const total = Math.max(end - t0, 1);
  const rows = [];
  let previous = t0;
  for (const [name, label, what] of STAGES) {
    if (!t[name]) {
      rows.push(el("tr", { "data-stage": name, "data-reached": "false" },
        el("th", {}, label), el("td", { class: "muted" }, "–"), el("td", { class: "muted" }, what),
        el("td", { class: "muted" }, "not reached")));
      continue;
    }
    const from = name === "delivered" && t.recorded ? at("recorded") : previous;
    const to = at(name);
    const bar = el("div", { class: "wf-bar" }, el("span", {
      style: `left:${(100 * (from - t0)) / total}%;width:${Math.max((100 * (to - from)) / total, 0.4)}%`,
    }));
    rows.push(el("tr", { "data-stage": name, "data-reached": "true", "data-at": t[name] },
      el("th", {}, label),
      el("td", { "data-field": "offset-ms" }, `+${fmt(to - t0, 0)} ms`),
      el("td", {}, what, el("span", { class: "muted" }, ` · ${fmt(to - from, 0)} ms`)),
      el("td", { class: "wf" }, bar)));
    if (name !== "delivered") previous = to;
  }
  box.replaceChildren(
    el("p", { class: "muted" }, `job ${job.id} · ${job.status} · ${job.model} · `,
      `${fmt(end - t0, 0)} ms from accepted to its last stage`),
    el("table", { class: "waterfall", "data-job": job.id }, el("tbody", {}, rows)));
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const data = await call("/dashboard/api/overview" + SCOPED);
    error.hidden = true;
    document.getElementById("scope").textContent = data.scope.operator
      ? (data.scope.tenant ? `operator · tenant ${data.scope.tenant}` : "operator · all tenants")
      : `tenant ${data.scope.tenant}`;
    for (const card of document.querySelectorAll("[data-operator]")) card.hidden = !data.scope.operator;
    renderThroughput(data);
    renderBatches(data.batches);
    renderWebhooks(data.webhooks);
    renderConversationList(data.conversations);
    if (data.scope.operator) {
      renderLatency(data.latency);
      renderBatchSizes(data.batch_sizes);
      renderWorkers(data.workers, data.groups);
      renderDeadLetters(data.dead_letters);
    }
    if (data.kafka_error) {
      error.hidden = false;
      error.textContent = data.kafka_error;
    }
    await showConversation();
    await showJob();
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  } catch (err) {
    error.hidden = false;
    error.textContent = err.message;
    if (err.status === 401) document.getElementById("key-form").hidden = false;
  }
}

async function loop() {
  await refresh();
  setTimeout(loop, REFRESH_MS);
}

takeKey();
loop();
