// Likeness front-end extension: a live loss chart on the training nodes.
// ComfyUI serves this folder (WEB_DIRECTORY = "./web") at /extensions/<folder>/ and loads every .js in it.
// The training node sends a "likeness.progress" websocket event each step:
//   {node: "<unique id>", step, total, loss (null for a skipped step)}.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAINERS = new Set(["LikenessTrainTextualInversion"]);
const CHART_HEIGHT = 90;

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

function drawChart(ctx, state, x, y, w, h) {
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.strokeStyle = "#444";
  ctx.beginPath();
  ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.stroke();
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#999";
  const pts = state ? state.loss.map((l, i) => [state.step[i], l]).filter((p) => Number.isFinite(p[1])) : [];
  if (pts.length < 2) {
    ctx.fillText(pts.length ? "loss: " + pts[0][1].toFixed(4) : "loss chart: appears while training", x + 6, y + 14);
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
  ctx.fillText(`step ${last[0]}/${state.total}  loss ${last[1].toFixed(4)}  (avg ${ema.toFixed(4)})`, x + 6, y + h - 3);
  ctx.fillStyle = "#888";
  ctx.fillText(hi.toPrecision(3), x + w - 40, y + 11);
  ctx.fillText(lo.toPrecision(3), x + w - 40, y + h - 16);
  ctx.restore();
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
      return [width ?? node.size[0], CHART_HEIGHT];
    },
    draw(ctx, n, width, y) {
      drawChart(ctx, n.likenessLoss, 10, y + 4, width - 20, CHART_HEIGHT - 8);
    },
  });
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
}

function onProgress(event) {
  const d = event.detail;
  if (!d || d.node == null) return;
  const node = findNode(d.node);
  if (!node) return;
  let st = node.likenessLoss;
  if (!st || d.step <= st.step[st.step.length - 1]) {
    st = node.likenessLoss = { step: [], loss: [], total: d.total };
  }
  st.step.push(d.step);
  st.loss.push(d.loss == null ? NaN : Number(d.loss));
  st.total = d.total;
  node.setDirtyCanvas?.(true, false);
}

// The folder may be registered twice (folder name and pyproject name); register once.
if (!window.__likenessLossChart) {
  window.__likenessLossChart = true;
  app.registerExtension({
    name: "likeness.lossChart",
    setup() {
      api.addEventListener("likeness.progress", onProgress);
    },
    nodeCreated(node) {
      if (TRAINERS.has(node.comfyClass)) addChart(node);
    },
  });
}
