// Likeness front-end extension: a live loss chart on every long-running Likeness node.
// ComfyUI serves this folder (WEB_DIRECTORY = "./web") at /extensions/<folder>/ and loads every .js in it.
// A long-running node sends a "likeness.progress" websocket event each step:
//   {node: "<unique id>", type (the node's class), step, total, loss (null for a skipped step),
//    elapsed (seconds since the run started), prompt_id, and - when evaluations (best step) finished
//    since the last event - metrics: [{step, "CLIP-I", DINO, "CLIP-T", "CLIP-T margin", diversity, combined, seconds}]}.
// The metrics are drawn as a second panel under the loss, one curve per metric (each on its own
// range, the colours of trainers/best_step.py's CURVES), the best combined score marked; SeedSelect
// sends {step, "CLIP distance"} every iteration, its distance to the references in CLIP space.
// GET /likeness/progress (nodes/progress.py) says which node types chart ("chart_nodes", from the
// server's LIVE_CHART flag) and returns the latest prompt's points so far, so a reloaded page
// redraws a run in progress.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CHART_HEIGHT = 90;
const METRICS_HEIGHT = 80;
const METRIC_COLOURS = { "CLIP-I": "#3478dc", DINO: "#963cc8", "CLIP-T": "#dc781e", diversity: "#28a05a",
                         combined: "#eeeeee", "CLIP distance": "#e0c040" };
const PROGRESS_ROUTE = "/likeness/progress";
const charted = new Set();
let serverInfo = null;

// The route's answer ({chart_nodes, prompt_id, nodes}); an empty one when it cannot be read.
async function fetchProgress() {
  try {
    const res = await api.fetchApi(PROGRESS_ROUTE);
    if (res.ok) return await res.json();
  } catch (e) {
    console.warn("likeness: cannot read " + PROGRESS_ROUTE, e);
  }
  return { chart_nodes: [], prompt_id: null, nodes: {} };
}

function formatSeconds(s) {
  if (!Number.isFinite(s) || s < 0) return "?";
  const m = Math.floor(s / 60), sec = Math.round(s % 60);
  return m ? `${m}m ${String(sec).padStart(2, "0")}s` : `${sec}s`;
}

// Seconds left, from the seconds the run has taken so far (null before the first timed step).
function eta(state) {
  const i = state.step.length - 1;
  const step = state.step[i], spent = state.elapsed?.[i];
  if (!(step > 0) || !Number.isFinite(spent) || !state.total) return null;
  return (spent / step) * Math.max(0, state.total - step);
}

// A node by its execution id ("12", or "5:12" for a node inside subgraph node 5).
function findNode(id) {
  let graph = app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    if (!graph?.getNodeById) return null;
    node = graph.getNodeById(Number.isNaN(Number(part)) ? part : Number(part));
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

// A chart's dark panel; the caller restores the context.
function panel(ctx, x, y, w, h) {
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.strokeStyle = "#444";
  ctx.beginPath();
  ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.stroke();
  ctx.font = "10px sans-serif";
}

function drawChart(ctx, state, x, y, w, h) {
  panel(ctx, x, y, w, h);
  ctx.fillStyle = "#999";
  const pts = state ? state.loss.map((l, i) => [state.step[i], l]).filter((p) => Number.isFinite(p[1])) : [];
  if (pts.length < 2) {
    ctx.fillText(pts.length ? "loss: " + pts[0][1].toFixed(4) : "loss chart: appears during a run", x + 6, y + 14);
    ctx.restore();
    return;
  }
  let lo = Infinity, hi = -Infinity;
  for (const [, l] of pts) { lo = Math.min(lo, l); hi = Math.max(hi, l); }
  const span = hi - lo || 1;
  const total = Math.max(state.total || 0, pts[pts.length - 1][0]);
  const first = pts[0][0];
  const px = (s) => x + 4 + ((s - first) / Math.max(1, total - first)) * (w - 8);
  const py = (l) => y + h - 14 - ((l - lo) / span) * (h - 28);
  // raw loss (thin; at most ~one point per pixel), then its moving average (bold)
  const stride = Math.max(1, Math.floor(pts.length / w));
  ctx.strokeStyle = "rgba(110,160,255,0.45)";
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (let i = 0; i < pts.length; i += stride) {
    const [s, l] = pts[i];
    i === 0 ? ctx.moveTo(px(s), py(l)) : ctx.lineTo(px(s), py(l));
  }
  ctx.stroke();
  ctx.strokeStyle = "#7fd17f";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  let ema = pts[0][1];
  for (let i = 0; i < pts.length; i++) {
    ema = 0.9 * ema + 0.1 * pts[i][1];
    if (i % stride) continue;
    i === 0 ? ctx.moveTo(px(pts[i][0]), py(ema)) : ctx.lineTo(px(pts[i][0]), py(ema));
  }
  ctx.stroke();
  const last = pts[pts.length - 1];
  ctx.fillStyle = "#bbb";
  const left = eta(state);
  const etaText = left == null ? "" : last[0] >= state.total ? "  done" : `  ETA ${formatSeconds(left)}`;
  ctx.fillText(`step ${last[0]}/${state.total}  loss ${last[1].toFixed(4)}  (avg ${ema.toFixed(4)})${etaText}`,
               x + 6, y + h - 3);
  ctx.fillStyle = "#888";
  ctx.fillText(hi.toPrecision(3), x + w - 40, y + 11);
  ctx.fillText(lo.toPrecision(3), x + w - 40, y + h - 16);
  ctx.restore();
}

// The second panel: the evaluation metrics over the steps (best step, trainers/best_step.py).
function drawMetrics(ctx, state, x, y, w, h) {
  const points = state?.metrics ?? [];
  panel(ctx, x, y, w, h);
  const total = Math.max(state?.total || 1, ...points.map((p) => p.step));
  const px = (s) => x + 4 + (s / total) * (w - 8);
  let best = null;
  for (const p of points) if (Number.isFinite(p.combined) && (!best || p.combined > best.combined)) best = p;
  if (best) {
    ctx.strokeStyle = "#e64040";
    ctx.beginPath();
    ctx.moveTo(px(best.step), y + 2);
    ctx.lineTo(px(best.step), y + h - 14);
    ctx.stroke();
  }
  for (const [name, colour] of Object.entries(METRIC_COLOURS)) {
    const pts = points.filter((p) => Number.isFinite(p[name]));
    if (!pts.length) continue;
    const vals = pts.map((p) => p[name]);
    const lo = Math.min(...vals), span = Math.max(...vals) - lo || 1;
    const py = (v) => y + h - 16 - ((v - lo) / span) * (h - 22);
    ctx.strokeStyle = colour;
    ctx.fillStyle = colour;
    ctx.lineWidth = name === "combined" ? 2 : 1.2;
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(px(p.step), py(p[name])) : ctx.moveTo(px(p.step), py(p[name]))));
    ctx.stroke();
    for (const p of pts) ctx.fillRect(px(p.step) - 1.5, py(p[name]) - 1.5, 3, 3);
  }
  ctx.fillStyle = "#bbb";
  const spent = points.reduce((a, p) => a + (p.seconds || 0), 0);
  const last = points[points.length - 1];
  const distance = Number.isFinite(last?.["CLIP distance"]) ? `CLIP distance ${last["CLIP distance"].toFixed(4)}` : "";
  ctx.fillText(best ? `best step ${best.step}  combined ${best.combined.toFixed(4)}  eval ${formatSeconds(spent)}`
                    : distance || "metrics: no combined score yet", x + 6, y + h - 3);
  ctx.restore();
}

function chartHeight(node) {
  return CHART_HEIGHT + (node.likenessLoss?.metrics?.length ? METRICS_HEIGHT : 0);
}

function addChart(node) {
  if (node.widgets?.some((w) => w.name === "likeness_loss_chart")) return;
  node.addCustomWidget({
    name: "likeness_loss_chart",
    type: "likeness_loss_chart",
    value: null,
    serialize: false, // not part of widgets_values: the saved workflow stays what the server expects
    options: { serialize: false },
    computeSize(width) {
      return [width ?? node.size[0], chartHeight(node)];
    },
    draw(ctx, n, width, y) {
      drawChart(ctx, n.likenessLoss, 10, y + 4, width - 20, CHART_HEIGHT - 8);
      if (n.likenessLoss?.metrics?.length) drawMetrics(ctx, n.likenessLoss, 10, y + CHART_HEIGHT, width - 20,
                                                       METRICS_HEIGHT - 4);
    },
  });
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
}

function onProgress(event) {
  const d = event.detail;
  if (!d || d.node == null) return;
  const node = findNode(d.node);
  if (!node || !sameType(node, d.type)) return;
  addChart(node); // the event itself says this node charts, even if the type list missed it
  let st = node.likenessLoss;
  const newPrompt = d.prompt_id != null && st?.prompt != null && d.prompt_id !== st.prompt;
  if (!st || newPrompt || d.step <= st.step[st.step.length - 1]) {
    st = node.likenessLoss = { step: [], loss: [], elapsed: [], metrics: [], total: d.total,
                               prompt: d.prompt_id ?? null };
  }
  if (d.metrics?.length) {
    const grow = !st.metrics.length;
    st.metrics.push(...d.metrics);
    if (grow) node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  }
  st.step.push(d.step);
  st.loss.push(d.loss == null ? NaN : Number(d.loss));
  st.elapsed.push(d.elapsed == null ? NaN : Number(d.elapsed));
  st.total = d.total;
  st.prompt = d.prompt_id ?? st.prompt;
  node.setDirtyCanvas?.(true, false);
}

// An id names a node of the graph that ran: another workflow's node with the same id is left alone.
function sameType(node, type) {
  return type == null || (node.comfyClass ?? node.type) === type;
}

// After a page reload: the points the server kept for the latest prompt's nodes.
function restore(info) {
  for (const [id, run] of Object.entries(info?.nodes ?? {})) {
    const node = findNode(id);
    if (!node || !sameType(node, run.type)) continue;
    addChart(node);
    node.likenessLoss = {
      step: run.steps.slice(),
      loss: run.losses.map((l) => (l == null ? NaN : Number(l))),
      elapsed: run.elapsed.map(Number),
      metrics: (run.metrics ?? []).slice(),
      total: run.total,
      prompt: info.prompt_id ?? null,
    };
    if (run.metrics?.length) node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
    node.setDirtyCanvas?.(true, false);
  }
}

// Advanced inputs (the schema's advanced=True) fold away on Likeness nodes, so a first-time user sees
// only what must be set.  The front end marks them in widget.options.advanced, which its Nodes 2.0
// (Vue) nodes fold behind their own footer button.  Its classic canvas draws them regardless (and
// still lays out space for a widget it skips as advanced), so there they are hidden here, behind a
// button that shows or hides them (node.showAdvanced, which the saved workflow keeps).
const FOLD_BUTTON = "likeness_advanced";

function setting(id) {
  try {
    return !!app.extensionManager?.setting?.get(id);
  } catch {
    return false;
  }
}

// The button's words, the folded widgets and the node's height follow node.showAdvanced.
function showFoldState(node) {
  const button = node.widgets?.find((w) => w.name === FOLD_BUTTON);
  if (!button) return;
  const advanced = node.widgets.filter((w) => w.options?.advanced);
  const hide = !node.showAdvanced && !setting("Comfy.VueNodes.Enabled");
  for (const w of advanced) {
    for (const x of [w, ...(w.linkedWidgets ?? [])]) { // e.g. seed's "control after generate"
      x.advanced = true;
      x.hidden = hide;
    }
  }
  button.label = node.showAdvanced ? "hide advanced settings" : `show ${advanced.length} advanced settings`;
  node.setSize([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas?.(true, true);
}

function foldAdvanced(node) {
  const advanced = (node.widgets ?? []).filter((w) => w.options?.advanced);
  if (!advanced.length || setting("Comfy.Node.AlwaysShowAdvancedWidgets")) return;
  if (node.widgets.some((w) => w.name === FOLD_BUTTON)) return;
  const button = node.addWidget("button", FOLD_BUTTON, null, () => {
    node.showAdvanced = !node.showAdvanced;
    showFoldState(node);
  }, { serialize: false });
  button.serialize = false; // not part of widgets_values
  showFoldState(node);
}

// The folder may be registered twice (folder name and pyproject name); register once.
if (!window.__likenessLossChart) {
  window.__likenessLossChart = true;
  app.registerExtension({
    name: "likeness.lossChart",
    async beforeRegisterNodeDef(nodeType, nodeData) {
      serverInfo ??= fetchProgress();
      const info = await serverInfo;
      if (info.chart_nodes?.includes(nodeData?.name)) charted.add(nodeData.name);
    },
    async setup() {
      api.addEventListener("likeness.progress", onProgress);
      restore(await fetchProgress());
    },
    // A reloaded page restores its workflow after setup: redraw the points then too.
    async afterConfigureGraph() {
      restore(await fetchProgress());
    },
    nodeCreated(node) {
      if (charted.has(node.comfyClass)) addChart(node);
      if (String(node.comfyClass ?? "").startsWith("Likeness")) foldAdvanced(node);
    },
    // A loaded workflow sets node.showAdvanced after the node is created: fit the node to it.
    loadedGraphNode(node) {
      showFoldState(node);
    },
  });
}
