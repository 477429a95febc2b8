(function () {
"use strict";
const D = JSON.parse(document.getElementById("ctxvec-data").textContent);
const $ = (id) => document.getElementById(id);
const C = D.config, n = D.n_real, T = D.tokens.length, H = C.n_heads;
const short = (s) => (s.length > 12 ? s.slice(0, 11) + "\u2026" : s);
const tokens = D.tokens.map(short), real = tokens.slice(0, n);
const dims = (k) => Array.from({length: k}, (_, i) => `dim ${i}`);
const fmt = (v) => (v === null ? "masked / not computed" : Math.abs(v) >= 100 ? v.toFixed(1) : String(+v.toFixed(4)));
const FONT = 11, GAP = 2, PITCH = FONT + GAP;  // label font (px); labels closer than PITCH would touch

const VIRIDIS = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],
                 [53,183,121],[109,205,89],[180,222,44],[253,231,37]];
const DIVERGING = [[33,102,172],[103,169,207],[209,229,240],[247,247,247],[253,219,199],
                   [239,138,98],[178,24,43]];
function ramp(stops, t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  return stops[i].map((a, j) => Math.round(a + f * (stops[i + 1][j] - a)));
}
const css = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;

function range(m, opt) {
  let lo = Infinity, hi = -Infinity, sum = 0, clipped = false;
  // sum: a position-weighted checksum of what is drawn (tests compare it across selections)
  m.forEach((row, r) => row.forEach((v, c) => {
    if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); sum += v * (1 + (r * 31 + c * 17) % 101); }
  }));
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  if (opt.diverging && opt.robust && opt.vmax === undefined) {
    // wide maps: a few outliers would wash out every other cell, so clip at the 99th percentile
    const abs = m.flat().filter((v) => v !== null).map(Math.abs).sort((a, b) => a - b);
    const a = abs[Math.floor(0.99 * (abs.length - 1))] || 1;
    clipped = a < abs[abs.length - 1]; lo = -a; hi = a;
  } else if (opt.diverging) { const a = opt.vmax ?? (Math.max(Math.abs(lo), Math.abs(hi)) || 1); lo = -a; hi = a; }
  else { lo = opt.vmin ?? lo; hi = opt.vmax ?? hi; if (hi <= lo) hi = lo + 1; }
  return {lo, hi, sum, clipped};
}

// The width a figure has: pictures fit it (and are redrawn on resize) instead of overflowing.
const room = (canvas, max) => Math.max(120, Math.min(canvas.parentElement.clientWidth, max || Infinity));
const probe = document.createElement("canvas").getContext("2d");
probe.font = `${FONT}px system-ui, sans-serif`;
const measure = (s) => probe.measureText(s).width;
const widest = (labels) => Math.ceil(Math.max(0, ...labels.map(measure)));

function setup(canvas, w, h) {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.ceil(w * dpr); canvas.height = Math.ceil(h * dpr);
  canvas.style.width = w + "px"; canvas.style.height = h + "px";
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.font = `${FONT}px system-ui, sans-serif`;
  canvas._labels = [];
  return ctx;
}

// Every text on a canvas is drawn here, and its box kept in canvas._labels (in the label's own
// rotated frame: anchor x, y, angle, and the extent [x0, x0 + w] x [-h/2, h/2] around it), so
// that tests can check that labels neither overlap nor leave the canvas.
function label(ctx, s, x, y, opt = {}) {
  const angle = opt.angle || 0, align = opt.align || "left", w = ctx.measureText(s).width;
  ctx.save(); ctx.translate(x, y); ctx.rotate(angle);
  ctx.textAlign = align; ctx.textBaseline = "middle"; ctx.fillText(s, 0, 0);
  ctx.restore();
  const x0 = align === "right" ? -w : align === "center" ? -w / 2 : 0;
  ctx.canvas._labels.push({s, x, y, angle, x0, w, h: FONT, role: opt.role || "note"});
}

// Draw one label in `every` (1: all) when they are too close for all; 0: none.
const thinning = (pitch, need, thin) => (pitch >= need ? 1 : thin ? Math.ceil(need / pitch) : 0);

// A matrix (rows of numbers, null = masked or not computed) as coloured cells with labels.
// Token axes (opt.thinRows, opt.thinCols) keep every k-th name when the cells are too small for
// all of them; other axes (dimensions, units) show names only when every one fits.
function heatmap(canvas, m, opt) {
  const rows = m.length, cols = m[0].length, maxW = room(canvas, opt.maxWidth);
  const {lo, hi, sum, clipped} = range(m, opt);
  const colour = (v) => (v === null ? [215, 218, 224]
    : ramp(opt.diverging ? DIVERGING : VIRIDIS, (v - lo) / (hi - lo)));
  const left = opt.rowLabels ? widest(opt.rowLabels) + 8 : 0;
  const colW = opt.colLabels ? widest(opt.colLabels) : 0;
  const fit = (right) => opt.cw || Math.max(0.2, Math.min(opt.maxCell || 44, (maxW - left - right) / cols));
  // column names slant at 45 degrees when the cells are wide enough, else stand upright; the
  // last one needs room on the right
  const slant = Boolean(opt.colLabels) && fit(colW * Math.SQRT1_2) * Math.SQRT1_2 >= PITCH;
  const right = !opt.colLabels ? 0 : slant ? Math.ceil(colW * Math.SQRT1_2) : FONT;
  const cw = fit(right);
  let ch = opt.ch || Math.max(opt.square ? cw : 4, Math.min(opt.square ? cw : 18, 420 / rows));
  if (opt.square) ch = cw;
  const rowEvery = opt.rowLabels ? thinning(ch, PITCH, opt.thinRows) : 0;
  const colPitch = slant ? cw * Math.SQRT1_2 : cw;
  const colEvery = opt.colLabels ? thinning(colPitch, PITCH, opt.thinCols) : 0;
  // a row name taller than its row needs room above the first row and below the last
  const edge = rowEvery && ch < FONT ? Math.ceil((FONT - ch) / 2) : 0;
  const top = colEvery ? Math.ceil(slant ? (colW + FONT) * Math.SQRT1_2 : colW) + 6 : edge;
  const w = Math.ceil(left + cols * cw + right), h = Math.ceil(top + rows * ch + edge);
  const ctx = setup(canvas, w, h);
  const off = document.createElement("canvas"); off.width = cols; off.height = rows;
  const octx = off.getContext("2d"), img = octx.createImageData(cols, rows);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    const k = 4 * (r * cols + c), col = colour(m[r][c]);
    img.data[k] = col[0]; img.data[k + 1] = col[1]; img.data[k + 2] = col[2]; img.data[k + 3] = 255;
  }
  octx.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, left, top, cols * cw, rows * ch);
  ctx.fillStyle = "#1d2330";
  if (rowEvery) opt.rowLabels.forEach((s, r) => {
    if (r % rowEvery === 0) label(ctx, s, left - 4, top + (r + 0.5) * ch, {align: "right", role: "row"});
  });
  if (colEvery) opt.colLabels.forEach((s, c) => {
    if (c % colEvery === 0) label(ctx, s, left + (c + 0.5) * cw, top - 4,
                                  {angle: slant ? -Math.PI / 4 : -Math.PI / 2, role: "col"});
  });
  if (opt.numbers && cw >= 30 && ch >= 15) {
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
      const v = m[r][c]; if (v === null) continue;
      const s = v.toFixed(opt.decimals ?? (Math.abs(v) >= 10 ? 1 : 2));
      if (ctx.measureText(s).width > cw - 4) continue;  // a number wider than its cell is left to the tooltip
      const col = colour(v); ctx.fillStyle = col[0] * 0.3 + col[1] * 0.59 + col[2] * 0.11 > 140 ? "#111" : "#fff";
      label(ctx, s, left + (c + 0.5) * cw, top + (r + 0.5) * ch, {align: "center", role: "value"});
    }
  }
  canvas._map = {m, left, top, cw, ch, rowLabels: opt.rowLabels, colLabels: opt.colLabels};
  canvas.dataset.checksum = `${rows}x${cols}:${sum.toFixed(5)}`;
  canvas.dataset.drawn = "1";
  legend(canvas, lo, hi, opt.diverging ? DIVERGING : VIRIDIS, clipped ? "(the largest 1% of |values| clipped)" : "");
}

function legend(canvas, lo, hi, stops, unit) {
  const el = canvas.closest("figure") && canvas.closest("figure").querySelector(".legend");
  if (!el) return;
  const grad = stops.map((s, i) => `${css(s)} ${(100 * i / (stops.length - 1)).toFixed(0)}%`).join(",");
  el.textContent = "";
  const a = document.createElement("span"); a.textContent = lo.toPrecision(3);
  const bar = document.createElement("i"); bar.style.background = `linear-gradient(90deg,${grad})`;
  const b = document.createElement("span"); b.textContent = hi.toPrecision(3) + (unit ? " " + unit : "");
  el.append(a, bar, b);
}

// Hover: the value under the pointer.
const tip = $("tip");
document.addEventListener("mousemove", (e) => {
  const c = e.target, info = c && c._map;
  if (!info) { tip.hidden = true; return; }
  const rect = c.getBoundingClientRect();
  const col = Math.floor((e.clientX - rect.left - info.left) / info.cw);
  const row = Math.floor((e.clientY - rect.top - info.top) / info.ch);
  if (row < 0 || col < 0 || row >= info.m.length || col >= info.m[0].length) { tip.hidden = true; return; }
  const rl = info.rowLabels ? info.rowLabels[row] : `row ${row}`;
  const cl = info.colLabels ? info.colLabels[col] : `column ${col}`;
  tip.textContent = `${rl} \u00b7 ${cl}: ${fmt(info.m[row][col])}`;
  tip.style.left = e.clientX + 12 + "px"; tip.style.top = e.clientY + 12 + "px"; tip.hidden = false;
});

// About `count` round steps from lo to hi (0 among them when the range crosses it).
function ticks(lo, hi, count, integer) {
  const raw = (hi - lo) / count, mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw);
  if (integer) step = Math.max(1, Math.round(step));
  const decimals = Math.max(0, Math.ceil(-Math.log10(step) + 1e-9) + (String(step).includes("25") ? 1 : 0));
  const from = Math.floor(lo / step + 1e-9), to = Math.ceil(hi / step - 1e-9);
  return Array.from({length: to - from + 1}, (_, i) => {
    const v = (from + i) * step;
    return {v, s: v.toFixed(decimals)};
  });
}

// Bars: one group per label, one bar per series (values may be negative). The axis ends on
// round ticks; category names stand upright under their group, one in k when too close for all.
function bars(canvas, labels, series, opt = {}) {
  const width = room(canvas, opt.maxWidth), plotH = 150;
  const all = series.flatMap((s) => s.values);
  const axis = ticks(Math.min(0, ...all), Math.max(0, ...all) || 1, 4, opt.integer);
  const lo = axis[0].v, hi = axis[axis.length - 1].v;
  const left = widest(axis.map((t) => t.s)) + 10, plotW = width - left - 8;
  // the key: series names in rows that wrap at the canvas's width
  let kx = left, ky = 0; const keys = series.map((s) => {
    const w = measure(s.name) + 14;
    if (kx > left && kx + w > width) { kx = left; ky += 16; }
    const at = {x: kx, y: ky}; kx += w + 16; return at;
  });
  const top = ky + 16 + 10, group = plotW / labels.length;
  const named = labels.map((s, i) => [s, i]).filter(([s]) => s !== "");
  // sparse names (a histogram's every 5th bin) lie flat when they fit side by side
  const flat = named.every(([s, i], j) => j === 0
    || (i - named[j - 1][1]) * group >= (measure(s) + measure(named[j - 1][0])) / 2 + 6);
  const every = flat ? 1 : thinning(group, PITCH, true);
  const bottom = flat ? FONT + 12 : widest(labels) + 12;
  const ctx = setup(canvas, width, top + plotH + bottom);
  const y = (v) => top + plotH * (hi - v) / (hi - lo);
  ctx.strokeStyle = "#e3e6ec"; ctx.fillStyle = "#5b6475";
  axis.forEach((t) => {
    ctx.beginPath(); ctx.moveTo(left, y(t.v)); ctx.lineTo(left + plotW, y(t.v)); ctx.stroke();
    label(ctx, t.s, left - 4, y(t.v), {align: "right", role: "tick"});
  });
  ctx.strokeStyle = "#8a93a5"; ctx.beginPath(); ctx.moveTo(left, y(0)); ctx.lineTo(left + plotW, y(0)); ctx.stroke();
  const bw = Math.max(0.5, (group * 0.85) / series.length);
  series.forEach((s, k) => {
    ctx.fillStyle = s.colour;
    s.values.forEach((v, i) => {
      ctx.fillRect(left + i * group + group * 0.075 + k * bw, Math.min(y(v), y(0)),
                   Math.max(0.5, bw - 0.5), Math.abs(y(v) - y(0)));
    });
  });
  ctx.fillStyle = "#1d2330";
  named.forEach(([s, i]) => {
    if (i % every !== 0) return;
    const x = left + (i + 0.5) * group;
    // below the bottom tick's name, which reaches FONT / 2 under the axis
    if (flat) label(ctx, s, x, top + plotH + 7 + FONT / 2, {align: "center", role: "col"});
    else label(ctx, s, x, top + plotH + 7, {angle: -Math.PI / 2, align: "right", role: "col"});
  });
  series.forEach((s, k) => {
    ctx.fillStyle = s.colour; ctx.fillRect(keys[k].x, keys[k].y + 3, 10, 10);
    ctx.fillStyle = "#1d2330"; label(ctx, s.name, keys[k].x + 14, keys[k].y + 8, {role: "key"});
  });
  canvas.dataset.checksum = `${labels.length}:${all.reduce((a, v) => a + Math.abs(v), 0).toFixed(5)}`;
  canvas.dataset.drawn = "1";
}

function table(el, head, rows) {
  el.textContent = "";
  const tr = el.insertRow();
  head.forEach((h) => { const th = document.createElement("th"); th.textContent = h; tr.append(th); });
  rows.forEach((r) => { const row = el.insertRow(); r.forEach((v) => { row.insertCell().textContent = v; }); });
}

// Every row of the one-hot tensor, named, up to 128 tokens; past that the picture stays
// 1,664 px tall and one row in k is named.
function onehot(canvas) {
  const V = C.vocab_size, names = D.ids.map((id, r) => `${tokens[r]} ${id}`);
  const rowH = Math.max(Math.min(18, 400 / T), Math.min(PITCH, 128 * PITCH / T));
  const every = thinning(rowH, PITCH, true), left = widest(names) + 10;
  const width = room(canvas), plot = width - left - 4;
  const ctx = setup(canvas, width, T * rowH + 24);
  D.ids.forEach((id, r) => {
    ctx.fillStyle = r % 2 ? "#f1f3f7" : "#e8ebf1"; ctx.fillRect(left, r * rowH, plot, rowH - (rowH > 4 ? 1 : 0));
    ctx.fillStyle = D.kinds[r] === "pad" ? "#868e96" : "#c2255c";
    ctx.fillRect(left + Math.floor(id / V * plot) - 1, r * rowH, 3, Math.max(1, rowH - 1));
    ctx.fillStyle = "#1d2330";
    if (r % every === 0) label(ctx, names[r], left - 4, (r + 0.5) * rowH, {align: "right", role: "row"});
  });
  ctx.fillStyle = "#5b6475";
  label(ctx, "column 0", left, T * rowH + 12, {role: "tick"});
  label(ctx, `column ${V - 1}`, left + plot, T * rowH + 12, {align: "right", role: "tick"});
  canvas.dataset.checksum = `${T}:${D.ids.reduce((a, b) => a + b, 0)}`; canvas.dataset.drawn = "1";
}

// ---- the fixed pictures (steps 1-4, 8 and 9) ----
const layerNames = ["emb"].concat(D.layers.map((_, i) => String(i + 1)));
const transpose = (m) => m[0].map((_, j) => m.map((row) => row[j]));  // (layer, token) -> (token, layer)
const shownDims = D.dims.map((i) => `dim ${i}`), P = D.pooling;
const textNames = P.texts.map((_, i) => `text ${i + 1}`);

function drawFixed() {
  heatmap($("c-mask"), [D.mask], {colLabels: tokens, vmin: 0, vmax: 1, numbers: true, decimals: 0, thinCols: true,
                                   cw: Math.max(1, Math.min(44, (room($("c-mask")) - FONT) / T)), ch: 24});
  onehot($("c-onehot"));
  const wide = {rowLabels: tokens, colLabels: shownDims, diverging: true, robust: true, thinRows: true};
  heatmap($("c-embedding"), D.token_embedding, wide);
  heatmap($("c-positions"), D.positions, {...wide, rowLabels: tokens.map((_, i) => `pos ${i}`)});
  heatmap($("c-sum"), D.embedding_sum, wide);
  if ($("c-embeddings")) heatmap($("c-embeddings"), D.embeddings, wide);

  const perLayer = {rowLabels: real, numbers: true, maxWidth: 480, ch: Math.max(PITCH, Math.min(22, 1400 / n)),
                    thinRows: true};
  heatmap($("c-norms"), transpose(D.norms), {...perLayer, colLabels: layerNames});
  heatmap($("c-cosines"), transpose(D.cosines), {...perLayer, colLabels: layerNames.slice(1)});
  heatmap($("c-final"), D.final, {...wide, rowLabels: real});
  const simLabels = D.similarity_labels.map(short);
  heatmap($("c-similarity"), D.similarity, {rowLabels: simLabels, colLabels: simLabels, diverging: true, vmax: 1,
                                           numbers: true, square: true, maxWidth: 560, thinRows: true, thinCols: true});

  const weight = P.mode === "max" ? "share of the dimensions where this token holds the maximum"
                                  : "weight of this token in the pooled vector";
  bars($("c-pool-weights"), real, [{name: weight, values: P.weights, colour: "#3b5bdb"}]);
  const vector = {colLabels: dims(C.d_model), diverging: true, ch: 24};
  if ($("c-pooled")) heatmap($("c-pooled"), [P.pooled], {...vector, rowLabels: ["pooled"]});
  heatmap($("c-sentence"), [P.vector], {...vector, rowLabels: ["sentence vector"]});
  if ($("c-sentences")) {
    heatmap($("c-sentences"), P.vectors, {...vector, rowLabels: textNames, ch: undefined, thinRows: true});
    heatmap($("c-text-similarity"), P.similarity, {rowLabels: textNames, colLabels: textNames, diverging: true,
                                                   vmax: 1, numbers: true, square: true, maxWidth: 560,
                                                   thinRows: true, thinCols: true});
  }
}

// ---- steps 5-7 follow the layer and head selects ----
const layerSel = $("layer-select"), headSel = $("head-select");
// attention maps: one row and column per token, or per run of tokens on a thinned page
const runs = D.attention_labels.map(short), G = runs.length;
const padRows = (rows) => rows.concat(Array.from({length: G - D.attention_real}, () => Array(G).fill(null)));
function headMatrix(layer, head, key) {
  const hs = layer[key];
  if (head !== "avg") return hs[Number(head)];
  return hs[0].map((row, q) => row.map((v, k) => (v === null ? null : hs.reduce((a, h) => a + h[q][k], 0) / hs.length)));
}

function drawHeadsGrid(layer) {
  const grid = $("heads-grid"); grid.textContent = "";
  const cell = Math.max(2, Math.min(10, Math.floor(96 / G)));
  ["avg"].concat(Array.from({length: H}, (_, i) => String(i))).forEach((h) => {
    const fig = document.createElement("figure"), cv = document.createElement("canvas");
    const cap = document.createElement("figcaption");
    cv.className = "map tile";
    cap.textContent = h === "avg" ? "average" : `head ${Number(h) + 1}`;
    fig.dataset.head = h; fig.append(cv, cap); grid.append(fig);
    heatmap(cv, padRows(headMatrix(layer, h, "attention")), {cw: cell, ch: cell, vmin: 0});
    fig.addEventListener("click", () => { headSel.value = h; update(); });
  });
}

function update() {
  const li = Number(layerSel.value), head = headSel.value, layer = D.layers[li];
  const what = `layer ${li + 1}, ${head === "avg" ? "average over heads" : "head " + (Number(head) + 1)}`;
  document.querySelectorAll("#step-attention .sel").forEach((el) => { el.textContent = "\u2014 " + what; });
  const sq = {rowLabels: runs, colLabels: runs, numbers: true, square: true, maxWidth: 480, maxCell: 44,
              thinRows: true, thinCols: true};
  heatmap($("c-scores"), padRows(headMatrix(layer, head, "scores")), {...sq, diverging: true});
  heatmap($("c-attention"), padRows(headMatrix(layer, head, "attention")), {...sq, vmin: 0});
  for (const id of ["c-scores", "c-attention"]) { $(id).dataset.layer = li; $(id).dataset.head = head; }
  if ($("heads-grid").dataset.layer !== String(li)) { drawHeadsGrid(layer); $("heads-grid").dataset.layer = li; }
  document.querySelectorAll("#heads-grid figure").forEach((f) => f.classList.toggle("on", f.dataset.head === head));

  const n1 = layer.norm1, n2 = layer.norm2;
  const statSeries = (s) => [
    {name: "mean before", values: s.before.mean, colour: "#a5b4fc"},
    {name: "std before", values: s.before.std, colour: "#3b5bdb"},
    {name: "mean after", values: s.after.mean, colour: "#fcc2d7"},
    {name: "std after", values: s.after.std, colour: "#c2255c"}];
  const stats = (s, i) => [s.before.mean[i], s.before.std[i], s.after.mean[i], s.after.std[i]].map((v) => v.toFixed(4));
  bars($("c-norm1"), real, statSeries(n1));
  table($("t-norm1"), [`layer ${li + 1}`, "mean before", "std before", "mean after", "std after"],
        real.map((t, i) => [t, ...stats(n1, i)]));

  heatmap($("c-ffn"), layer.ffn_hidden, {rowLabels: real, colLabels: D.ffn_units.map((u) => `unit ${u}`),
                                         diverging: true, robust: true, thinRows: true});
  const hist = layer.ffn_histogram;
  bars($("c-ffn-hist"), hist.counts.map((_, i) => (i % 5 ? "" : hist.edges[i].toFixed(1))),
       [{name: "how many (token, unit) inputs fall in each bin", values: hist.counts, colour: "#3b5bdb"}],
       {integer: true, maxWidth: 640});
  bars($("c-norm2"), real, statSeries(n2));
  const share = layer.ffn_active.reduce((a, v) => a + v, 0) / n;
  table($("t-ffn"), [`layer ${li + 1}`, "FFN units active", "mean before #2", "std before #2", "mean after #2", "std after #2"],
        real.map((t, i) => [t, (100 * layer.ffn_active[i]).toFixed(1) + " %", ...stats(n2, i)])
          .concat([["all tokens", (100 * share).toFixed(1) + " %", "", "", "", ""]]));
}
layerSel.addEventListener("change", update);
headSel.addEventListener("change", update);
drawFixed();
update();
// a new width redraws every picture to fit it
let resizing = 0;
window.addEventListener("resize", () => {
  clearTimeout(resizing);
  resizing = setTimeout(() => { drawFixed(); update(); }, 100);
});
document.body.dataset.ready = "1";
})();
