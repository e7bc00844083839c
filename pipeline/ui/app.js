// The dashboard page: polls the server's /api/* routes (pipeline/dashboard.py) and talks
// to the model through POST /think (NDJSON stream of {"type": "delta"|"done"|"error"}).
// No console output: the browser test fails on any console error, and errors here are
// shown on the page instead.
"use strict";

const POLL_METRICS_MS = 1000;
const POLL_STATE_MS = 4000;
const POLL_REPORTS_MS = 8000;
const POLL_AUDIT_MS = 3000;

const PHASES = {
  chaos: { ja: "混沌", fill: "rgba(255, 46, 166, 0.13)", line: "#ff2ea6" },
  transition: { ja: "遷移", fill: "rgba(255, 200, 60, 0.11)", line: "#ffc83c" },
  order: { ja: "秩序", fill: "rgba(0, 240, 255, 0.12)", line: "#00f0ff" },
};
const STAGES = {
  data: "データ", train: "学習", fuse: "融合", convert: "変換", imatrix: "重要度行列",
  quantize: "量子化", modelfile: "モデルファイル", ollama: "登録", plots: "図", eval: "評価",
};
const STATES = {
  current: { ja: "最新", en: "current" },
  stale: { ja: "要再構築", en: "stale" },
  missing: { ja: "未生成", en: "missing" },
};

const MONO = '"DejaVu Sans Mono", "Noto Sans Mono CJK JP", monospace';
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function bilingual(ja, en) {
  return [ja + " ", el("span", { class: "en" }, en)];
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  if (typeof x !== "number") return String(x);
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
  return x.toFixed(digits);
}

async function getJSON(path) {
  const resp = await fetch(path, { cache: "no-store" });
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

// Run `fn` now and every `ms` after it settles; its failures are shown in `onError`.
function poll(fn, ms, onError) {
  const tick = async () => {
    try { await fn(); } catch (e) { onError(e); }
    setTimeout(tick, ms);
  };
  tick();
}

// ---- training charts -------------------------------------------------------

const metrics = { steps: [], loss: [], val: [], alpha: [], gate: [], last: 0, total: 0, phases: [] };
let charts = null;

function phaseShading(getPhases) {
  return {
    hooks: {
      drawClear: [(u) => {
        const { ctx } = u;
        const { top, height } = u.bbox;
        for (const p of getPhases()) {
          const x0 = u.valToPos(p.start, "x", true);
          const x1 = u.valToPos(p.end, "x", true);
          ctx.fillStyle = (PHASES[p.phase] || PHASES.order).fill;
          ctx.fillRect(x0, top, x1 - x0, height);
          ctx.fillStyle = (PHASES[p.phase] || PHASES.order).line;
          ctx.fillRect(x0, top, Math.max(1, devicePixelRatio), height);
        }
      }],
    },
  };
}

function axis(label, extra = {}) {
  return {
    label, stroke: "#8fa7d8", labelFont: `12px ${MONO}`, font: `11px ${MONO}`,
    grid: { stroke: "rgba(120, 140, 255, 0.10)", width: 1 },
    ticks: { stroke: "rgba(120, 140, 255, 0.25)", width: 1 },
    ...extra,
  };
}

function chartSize(node) {
  return { width: Math.max(280, node.clientWidth), height: 250 };
}

function makeCharts() {
  const xScale = { time: false, range: () => [0, Math.max(1, metrics.total)] };
  const shading = phaseShading(() => metrics.phases);
  const lossNode = $("chart-loss");
  const soulNode = $("chart-soul");
  const loss = new uPlot({
    ...chartSize(lossNode),
    title: "損失 · loss",
    scales: { x: xScale, y: { auto: true } },
    legend: { live: true },
    cursor: { points: { size: 6 } },
    plugins: [shading],
    axes: [axis("ステップ step"), axis("損失 loss", { size: 56 })],
    series: [
      { label: "step" },
      { label: "損失 loss", stroke: "#ff2ea6", width: 2, fill: "rgba(255, 46, 166, 0.08)" },
      { label: "検証 val", stroke: "#00f0ff", width: 2, spanGaps: true, dash: [6, 4],
        points: { show: true, size: 7, stroke: "#00f0ff", fill: "#05060f" } },
    ],
  }, [[], [], []], lossNode);
  const soul = new uPlot({
    ...chartSize(soulNode),
    title: "魂 · alpha / gate",
    scales: { x: xScale, a: { auto: true }, g: { range: [0, 1] } },
    legend: { live: true },
    plugins: [shading],
    axes: [axis("ステップ step"), axis("α", { scale: "a", size: 56 }),
      axis("gate", { scale: "g", side: 1, grid: { show: false }, size: 48 })],
    series: [
      { label: "step" },
      { label: "α alpha", scale: "a", stroke: "#b967ff", width: 2 },
      { label: "ゲート gate", scale: "g", stroke: "#39ff14", width: 2 },
    ],
  }, [[], [], []], soulNode);
  const resize = () => {
    loss.setSize(chartSize(lossNode));
    soul.setSize(chartSize(soulNode));
  };
  new ResizeObserver(resize).observe($("training"));
  return { loss, soul };
}

function resetMetrics() {
  for (const k of ["steps", "loss", "val", "alpha", "gate"]) metrics[k] = [];
  metrics.last = 0;
}

async function refreshMetrics() {
  const data = await getJSON(`/api/metrics?after=${metrics.last}`);
  $("run-name").textContent = data.run;
  $("model-line").textContent = data.family ? `${data.base} (${data.family})` : data.base;
  $("live").classList.add("on");
  if (data.last_step < metrics.last) {  // a resumed run rewrote metrics.jsonl: start over
    resetMetrics();
    return refreshMetrics();
  }
  metrics.total = data.total_steps;
  metrics.phases = data.phases;
  if (!charts) charts = makeCharts();
  for (const r of data.rows) {
    metrics.steps.push(r.step);
    metrics.loss.push(r.loss);
    metrics.val.push(r.val_loss ?? null);
    metrics.alpha.push(r.alpha);
    metrics.gate.push(r.gate);
    metrics.last = r.step;
  }
  if (data.rows.length || !metrics.steps.length) {
    charts.loss.setData([metrics.steps, metrics.loss, metrics.val]);
    charts.soul.setData([metrics.steps, metrics.alpha, metrics.gate]);
    $("chart-loss").dataset.rows = metrics.steps.length;
    $("chart-soul").dataset.rows = metrics.steps.length;
  }
  showLatest(data.rows.length ? data.rows[data.rows.length - 1] : null);
}

function showLatest(row) {
  if (!row) return;
  const phase = PHASES[row.phase];
  $("t-step").textContent = `${row.step} / ${metrics.total}`;
  $("t-phase").textContent = phase ? phase.ja : row.phase;
  $("t-phase").title = row.phase;
  $("t-phase").style.color = phase ? phase.line : "";
  $("t-alpha").textContent = fmt(row.alpha, 3);
  $("t-gate").textContent = fmt(row.gate, 4);
  $("t-loss").textContent = fmt(row.loss, 3);
  const lastVal = [...metrics.val].reverse().find((v) => v !== null);
  $("t-val").textContent = fmt(lastVal, 3);
  $("progress-bar").style.width = `${Math.min(100, (100 * row.step) / Math.max(1, metrics.total))}%`;
}

// ---- build state -------------------------------------------------------------

// What the row adds to its badge: the inputs that changed, or why it cannot be built.
function reasonText(a) {
  if (a.state === "current") return "";
  if (a.state === "stale") return a.changed.length ? `変更 changed: ${a.changed.join(", ")}` : a.reason;
  return a.reason.endsWith(" does not exist") && a.paths.some((p) => a.reason.startsWith(p)) ? "" : a.reason;
}

async function refreshState() {
  const data = await getJSON("/api/state");
  const list = $("artifacts");
  if (data.error) {
    list.replaceChildren(el("li", { class: "artifact error" }, data.error));
    return;
  }
  list.replaceChildren(...data.artifacts.map((a) => {
    const s = STATES[a.state] || { ja: a.state, en: a.state };
    return el("li", { class: `artifact ${a.state}`, "data-state": a.state, "data-stage": a.stage },
      el("span", { class: "stage" }, ...bilingual(STAGES[a.stage] || a.stage, a.stage)),
      el("span", { class: "badge" }, ...bilingual(s.ja, s.en)),
      el("span", { class: "path" }, a.artifact),
      el("span", { class: "reason" }, reasonText(a)));
  }));
}

// ---- reports -------------------------------------------------------------------

function table(headers, rows) {
  const head = el("tr", {}, ...headers.map(([ja, en]) => el("th", {}, ...bilingual(ja, en))));
  const body = rows.map((cells) => el("tr", {}, ...cells.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", {}, c)))));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

function verdict(passed, enforced = true) {
  const ok = passed ? ["合格", "pass"] : enforced === false ? ["報告のみ", "reported"] : ["不合格", "FAIL"];
  return el("span", { class: `verdict ${passed ? "pass" : "fail"}` }, ...bilingual(...ok));
}

function renderReport(node, report, render) {
  if (report.error) node.replaceChildren(el("p", { class: "error" }, report.error));
  else if (!report.data) node.replaceChildren(el("p", { class: "empty" }, ...bilingual("未計測", "no report yet")));
  else node.replaceChildren(...render(report.data));
}

async function refreshReports() {
  const data = await getJSON("/api/reports");
  renderReport($("fidelity"), data.fidelity, (f) => [table(
    [["段階", "step"], ["基準", "reference"], ["候補", "candidate"], ["KL", "KL"], ["一致率", "top-1"],
      ["最大差", "max |Δ|"], ["上限", "bound"], ["判定", "result"]],
    Object.entries(f).map(([step, e]) => [step, e.reference, e.candidate, fmt(e.kl, 4), fmt(e.top1, 3),
      fmt(e.max_abs, 4), fmt(e.bound, 4), verdict(e.passed, e.enforced)]),
  )]);
  renderReport($("eval"), data.eval, (r) => [
    table([["モデル", "model"], ["実行系", "runtime"], ["トークン", "tokens"], ["困惑度", "perplexity"],
      ["基準比", "vs base"], ["KL", "fidelity KL"]],
    r.rows.map((row) => [row.model, row.runtime, row.tokens, fmt(row.perplexity, 3), fmt(row.ratio_to_base, 3),
      row.fidelity ? fmt(row.fidelity.kl, 4) : "—"])),
    el("p", { class: "bound" }, `${r.bound.figure} = ${fmt(r.bound.value, 4)} ≤ ${fmt(r.bound.max, 4)} `,
      verdict(r.passed)),
  ]);
}

// ---- audit log -------------------------------------------------------------------

// Every "...sha256" field of an entry, with the length beside it when there is one.
function hashes(entry, prefix = "") {
  const out = [];
  for (const [k, v] of Object.entries(entry)) {
    if (v && typeof v === "object" && !Array.isArray(v)) {
      out.push(...hashes(v, prefix ? `${prefix}.${k}` : k));
    } else if (Array.isArray(v)) {
      v.forEach((item, i) => { if (item && typeof item === "object") out.push(...hashes(item, `${prefix || k}[${item.name ?? i}]`)); });
    } else if (/sha256$/.test(k) && typeof v === "string") {
      const name = (prefix ? `${prefix}.${k}` : k).replace(/[._]?sha256$/, "").replace(/^thinking\./, "思考 ") || "sha256";
      const base = k.replace(/sha256$/, "");
      const len = entry[`${base}length`] ?? entry[`${base}len`] ?? entry[`${base}chars`] ?? entry.length;
      out.push(el("span", { class: "hash", title: v }, `${name} `, el("code", {}, v.slice(0, 8)),
        len !== undefined ? el("span", { class: "len" }, ` ${len}`) : ""));
    }
  }
  return out;
}

// The guard's verdicts on an audit line: " prompt:unsafe S9 final:safe" (verdicts and codes only).
function guardVerdicts(guard) {
  if (!guard) return "";
  return ["prompt", "final"].filter((k) => guard[k])
    .map((k) => ` ${k}:${guard[k].verdict}${guard[k].categories.length ? " " + guard[k].categories.join(",") : ""}`)
    .join("");
}

async function refreshAudit() {
  const data = await getJSON("/api/audit?tail=12");
  const node = $("audit-log");
  if (!data.entries.length) {
    node.replaceChildren(el("p", { class: "empty" }, ...bilingual("記録なし", "no requests yet")),
      ...data.errors.map((e) => el("p", { class: "error" }, e)));
    return;
  }
  const rows = [...data.entries].reverse().map((e) => [
    String(e.time ?? e.ts ?? "").slice(11, 19),
    el("span", {}, el("code", {}, String(e.request_id ?? "").slice(0, 8)), ` ${e.api ?? "think"}`),
    el("span", { class: `outcome ${e.outcome === "ok" ? "pass" : e.outcome === "refused" ? "held" : "fail"}` },
      String(e.outcome ?? ""), guardVerdicts(e.guard)),
    el("span", { class: "hashes" }, ...hashes(e)),
  ]);
  node.replaceChildren(table([["時刻", "time"], ["要求", "request"], ["結果", "outcome"], ["ハッシュ", "sha256 · length"]], rows),
    ...data.errors.map((e) => el("p", { class: "error" }, e)));
}

// ---- chat ----------------------------------------------------------------------

function bubble(role, text = "") {
  const body = el("div", { class: "text" }, text);
  const node = el("div", { class: `msg ${role}` }, el("span", { class: "who" }, role === "user" ? "あなた" : "魂"), body);
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return { node, body };
}

// Each complete line of an NDJSON stream, as parsed objects.
async function* ndjson(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).trim();
      buffer = buffer.slice(nl + 1);
      if (line) yield JSON.parse(line);
    }
    if (done) break;
  }
  if (buffer.trim()) yield JSON.parse(buffer);
}

async function send(prompt, system) {
  bubble("user", prompt);
  const reply = bubble("assistant");
  reply.node.classList.add("streaming");
  const fail = (msg, id) => {
    reply.node.classList.add("error");
    reply.body.textContent = msg + (id ? `  (${id})` : "");
  };
  try {
    const resp = await fetch("/think", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(system ? { prompt, system, stream: true } : { prompt, stream: true }),
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      fail(`応答なし · ${err.error || `HTTP ${resp.status}`}`, err.request_id);
      return;
    }
    for await (const event of ndjson(resp)) {
      if (event.type === "delta") reply.body.textContent += event.text;
      else if (event.type === "done") reply.node.dataset.requestId = event.request_id;
      else if (event.type === "error") fail(`エラー · ${event.error}`, event.request_id);
    }
    reply.node.classList.add("done");
  } catch (e) {
    fail(`接続エラー · ${e.message}`);
  } finally {
    reply.node.classList.remove("streaming");
    refreshAudit().catch(() => {});
  }
}

function setupChat() {
  const form = $("chat-form");
  const prompt = $("prompt");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    prompt.value = "";
    $("send").disabled = true;
    await send(text, $("system").value.trim());
    $("send").disabled = false;
    prompt.focus();
  });
  prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
}

// ---- start ---------------------------------------------------------------------

function showError(node) {
  return (e) => node.replaceChildren(el("p", { class: "error" }, e.message));
}

setupChat();
poll(refreshMetrics, POLL_METRICS_MS, () => $("live").classList.remove("on"));
poll(refreshState, POLL_STATE_MS, (e) => $("artifacts").replaceChildren(el("li", { class: "artifact error" }, e.message)));
poll(refreshReports, POLL_REPORTS_MS, showError($("fidelity")));
poll(refreshAudit, POLL_AUDIT_MS, showError($("audit-log")));
