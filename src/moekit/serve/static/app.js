// The moekit playground: streams a completion and shows, token by token, which experts
// each MoE layer chose. No build step, no external scripts: it must work offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, counts: {}, controller: null, tokens: [] };

// Hierarchical routing: the experts form `router_groups` equal contiguous groups.
function groupOf(expert) {
  const { info } = state;
  return info && info.router_groups ? Math.floor(expert / (info.num_experts / info.router_groups)) : null;
}

function expertName(expert) {
  const g = groupOf(expert);
  return g === null ? `expert ${expert}` : `expert ${expert} (group ${g})`;
}

function color(expert, n) {
  const hue = Math.round((expert * 360) / Math.max(n, 1));
  return `hsl(${hue} 70% 78%)`;
}

// The API key: a server with one serves this page at /?key=KEY. The page keeps the key for
// this tab, takes it out of the address bar, and sends it as a Bearer token on its API calls.
const KEY_ITEM = "moekit-api-key";

function initKey() {
  const params = new URLSearchParams(location.search);
  const fromAddress = params.get("key");
  if (fromAddress) {
    sessionStorage.setItem(KEY_ITEM, fromAddress);
    params.delete("key");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
  }
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) $("api-key").value = key;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadInfo() {
  const res = await fetch("/v1/moekit/info", { headers: headers() });
  if (!res.ok) {
    $("model-info").textContent = `could not read the model information (${res.status}); enter the API key`;
    $("model-info").classList.add("error");
    return;
  }
  const info = await res.json();
  state.info = info;
  const fmt = (n) =>
    n >= 1e9 ? `${(n / 1e9).toFixed(2)}B` : n >= 1e6 ? `${(n / 1e6).toFixed(2)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}K` : `${n}`;
  $("model-info").textContent =
    `${info.model}: ${fmt(info.total_params)} parameters, ${fmt(info.active_params)} active per token; ` +
    `${info.num_layers} layers (${info.moe_layers.length} MoE), ${info.num_experts} experts, ` +
    (info.router_groups
      ? `in ${info.router_groups} groups: top-${info.group_top_k} groups, top-${info.top_k} experts`
      : `top-${info.top_k}`);
  const topk = $("top-k");
  for (let k = 1; k <= Math.max(info.max_top_k, 1); k++) {
    const opt = new Option(k === info.top_k ? `${k} (model default)` : `${k}`, k);
    if (k === info.top_k) opt.selected = true;
    topk.append(opt);
  }
  for (const layer of info.moe_layers) $("color-layer").append(new Option(`layer ${layer}`, layer));
  resetCharts();
  drawLegend();
}

function resetCharts() {
  const { info } = state;
  const charts = $("charts");
  charts.textContent = "";
  state.counts = {};
  if (!info) return;
  for (const layer of info.moe_layers) {
    state.counts[layer] = new Array(info.num_experts).fill(0);
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.layer = layer;
    box.innerHTML = `<h3>layer ${layer}</h3><div class="bars"></div><div class="axis"><span>expert 0</span><span>${info.num_experts - 1}</span></div>`;
    const bars = box.querySelector(".bars");
    for (let e = 0; e < info.num_experts; e++) {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.background = color(e, info.num_experts);
      bar.style.height = "0%";
      bar.title = `${expertName(e)}: 0 tokens`;
      const g = groupOf(e);
      if (g !== null && g > 0 && groupOf(e - 1) !== g) bar.classList.add("group-start");
      bars.append(bar);
    }
    charts.append(box);
  }
}

function updateCharts() {
  for (const box of $("charts").children) {
    const counts = state.counts[box.dataset.layer];
    const max = Math.max(1, ...counts);
    box.querySelectorAll(".bar").forEach((bar, e) => {
      bar.style.height = `${(100 * counts[e]) / max}%`;
      bar.title = `${expertName(e)}: ${counts[e]} tokens`;
    });
  }
}

function drawLegend() {
  const legend = $("legend");
  legend.textContent = "";
  const n = state.info ? state.info.num_experts : 0;
  for (let e = 0; e < n; e++) {
    const s = document.createElement("span");
    s.className = "swatch";
    s.style.background = color(e, n);
    s.textContent = expertName(e);
    legend.append(s);
  }
}

function colorTokens() {
  const layer = $("color-layer").value;
  const n = state.info ? state.info.num_experts : 1;
  for (const { span, routing } of state.tokens) {
    const pairs = routing.layers[layer];
    span.style.background = pairs && pairs.length ? color(pairs[0][0], n) : "transparent";
  }
}

function addToken(routing, text) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  span.dataset.token = routing.token_id;
  $("output").append(span);
  state.tokens.push({ span, routing });
  for (const [layer, pairs] of Object.entries(routing.layers)) {
    for (const [expert] of pairs) if (state.counts[layer]) state.counts[layer][expert] += 1;
  }
  span.addEventListener("mousemove", (ev) => showTooltip(ev, routing));
  span.addEventListener("mouseleave", () => ($("tooltip").hidden = true));
}

function showTooltip(ev, routing) {
  const lines = [`token ${routing.token_id} ${JSON.stringify(routing.text)}`];
  for (const [layer, pairs] of Object.entries(routing.layers)) {
    const name = (e) => (groupOf(e) === null ? `e${e}` : `e${e}/g${groupOf(e)}`);
    lines.push(`layer ${layer}: ` + pairs.map(([e, w]) => `${name(e)} ${(w * 100).toFixed(0)}%`).join("  "));
  }
  const tip = $("tooltip");
  tip.textContent = lines.join("\n");
  tip.hidden = false;
  tip.style.left = `${ev.clientX + 14}px`;
  tip.style.top = `${ev.clientY + 14}px`;
}

async function generate(ev) {
  ev.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt) return;
  const out = $("output");
  out.textContent = "";
  const p = document.createElement("span");
  p.className = "prompt-text";
  p.textContent = prompt;
  out.append(p);
  state.tokens = [];
  resetCharts();
  $("generate").disabled = true;
  $("stop").disabled = false;
  const status = $("status");
  status.classList.remove("error");
  status.textContent = "generating…";
  state.controller = new AbortController();
  const started = performance.now();
  let count = 0;
  let finish = null;
  try {
    const body = {
      model: state.info ? state.info.model : "",
      prompt,
      max_tokens: Number($("max-tokens").value),
      temperature: Number($("temperature").value),
      stream: true,
      moekit: { routing: true, top_k: Number($("top-k").value) || null },
    };
    const res = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${res.status}`);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          const routes = choice.moekit ? choice.moekit.routing : [];
          if (routes.length) {
            for (const r of routes) { addToken(r, choice.text); count += 1; }
          } else if (choice.text) {
            out.append(document.createTextNode(choice.text));
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        colorTokens();
        updateCharts();
        const secs = (performance.now() - started) / 1000;
        status.textContent = `${count} tokens, ${(count / Math.max(secs, 1e-3)).toFixed(1)} tokens/s`;
      }
    }
    status.textContent += finish ? ` — finished (${finish})` : "";
  } catch (e) {
    if (e.name === "AbortError") {
      status.textContent += " — stopped";
    } else {
      status.textContent = `error: ${e.message}`;
      status.classList.add("error");
    }
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    document.body.dataset.done = "true";
  }
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("color-layer").addEventListener("change", colorTokens);
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem(KEY_ITEM, $("api-key").value.trim());
  $("charts").textContent = ""; $("top-k").textContent = ""; $("color-layer").textContent = "";
  loadInfo();
});
initKey();
loadInfo();
