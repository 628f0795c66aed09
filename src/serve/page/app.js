// tinygpt serve: the page. Plain JS and SVG, no build step, nothing loaded from elsewhere.
// Every number comes from the server's JSON API, which runs the model's own forward pass.
'use strict';

// Errors are kept where a test can read them, as well as shown.
window.__errors = [];
window.addEventListener('error', (e) => window.__errors.push(String(e.message)));
window.addEventListener('unhandledrejection', (e) => window.__errors.push(String(e.reason)));
const consoleError = console.error.bind(console);
console.error = (...args) => { window.__errors.push(args.join(' ')); consoleError(...args); };

const SVG_NS = 'http://www.w3.org/2000/svg';
const $ = (id) => document.getElementById(id);

// The page's state; the URL holds it, so a reload or a shared link restores the view.
const state = {
  view: 'head', prompt: '', layer: 0, head: '0', query: null, locked: null,
  // Sampling settings start as the server's defaults (/api/model's `sampling`).
  temperature: null, top_k: null, top_p: null, seed: null, token: 'e',
  // Circuits view: heads ablated ('1.0,1.2'), by what, the attributed token, the patch inputs.
  ablate: '', ablation: 'mean', dla_token: '', clean: '', corrupted: '', answer: '', wrong: '',
};
let model = null;          // /api/model
let promptInfo = null;     // /api/prompt for state.prompt
let attention = null;      // /api/attention for state.prompt
let lastJson = {};         // the last API answer of each view, for the JSON export
let headScores = null;     // /api/heads, computed once per page

function readUrl() {
  const q = new URLSearchParams(location.search);
  for (const key of Object.keys(state)) {
    if (q.has(key)) state[key] = q.get(key);
  }
  state.layer = parseInt(state.layer, 10) || 0;
  state.query = state.query === null || state.query === '' ? null : parseInt(state.query, 10);
  state.locked = state.locked === null || state.locked === '' ? null : parseInt(state.locked, 10);
}

function writeUrl() {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(state)) {
    if (v !== null && v !== '') q.set(k, String(v));
  }
  history.replaceState(null, '', '?' + q.toString());
}

function showError(msg) {
  const box = $('error');
  if (msg) { box.textContent = msg; box.hidden = false; } else { box.textContent = ''; box.hidden = true; }
}

// A server started with --api-key answers 401 until a request carries its key: the page asks
// for it once and keeps it for the tab (sessionStorage), never in the URL.
async function api(path, body, askedForKey = false) {
  const headers = body === undefined ? {} : { 'Content-Type': 'application/json' };
  const key = sessionStorage.getItem('tinygpt-api-key');
  if (key) headers.Authorization = 'Bearer ' + key;
  const opts = body === undefined ? { headers } : {
    method: 'POST', headers, body: JSON.stringify(body),
  };
  const res = await fetch(path, opts);
  if (res.status === 401 && !askedForKey) {
    const given = window.prompt('This server needs its API key (tinygpt serve --api-key):');
    if (given) {
      sessionStorage.setItem('tinygpt-api-key', given.trim());
      return api(path, body, true);
    }
  }
  const data = await res.json();
  if (!res.ok) throw new ApiError(data.error || ('HTTP ' + res.status));
  return data;
}

class ApiError extends Error {}

// Shows an API's refusal on the page; anything else is a bug and is rethrown.
async function guarded(f) {
  try {
    showError(null);
    await f();
  } catch (e) {
    if (e instanceof ApiError) showError(e.message); else throw e;
  }
}

// Runs `f` with the page marked busy (`body[data-ready=false]`) until it is done.
async function busy(f) {
  document.body.setAttribute('data-ready', 'false');
  try {
    await guarded(f);
  } finally {
    document.body.setAttribute('data-ready', 'true');
  }
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

function svgEl(tag, attrs, ...children) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

// A token as it reads in a label: spaces and newlines made visible.
function visible(t) {
  return t.replace(/ /g, '␣').replace(/\n/g, '⏎').replace(/\t/g, '⇥');
}

function round(x, d = 3) {
  if (x === null) return '−∞';
  return Number(x).toFixed(d);
}

// White → deep blue for a weight in [0, 1].
function shade(w) {
  const t = Math.max(0, Math.min(1, w));
  const r = Math.round(255 - t * (255 - 20));
  const g = Math.round(255 - t * (255 - 70));
  const b = Math.round(255 - t * (255 - 140));
  return `rgb(${r},${g},${b})`;
}

const tooltip = () => $('tooltip');
function hover(node, text) {
  node.addEventListener('mousemove', (e) => {
    const t = tooltip();
    t.textContent = text;
    t.hidden = false;
    t.style.left = (e.clientX + 12) + 'px';
    t.style.top = (e.clientY + 12) + 'px';
  });
  node.addEventListener('mouseleave', () => { tooltip().hidden = true; });
  node.append(svgEl('title', {}, text));
}

// The matrix of the chosen layer and head (or the mean of the heads).
function currentMatrix() {
  const layer = attention.layers[state.layer];
  if (state.head === 'mean') {
    const n = layer.heads.length;
    return layer.heads[0].map((row, i) => row.map((_, j) =>
      layer.heads.reduce((s, h) => s + h[i][j], 0) / n));
  }
  return layer.heads[parseInt(state.head, 10)];
}

function heatmapSvg(m, tokens, size, opts = {}) {
  const t = tokens.length;
  const longest = Math.max(...tokens.map((t) => visible(t).length));
  const label = opts.labels ? Math.min(120, 12 + 8 * longest) : 0;
  const cell = Math.max(4, Math.floor(size / t));
  const svg = svgEl('svg', {
    xmlns: SVG_NS, width: label + cell * t + 4, height: label + cell * t + 4, class: 'heatmap',
  });
  if (opts.labels) {
    tokens.forEach((tok, i) => {
      const rowLabel = svgEl('text', {
        x: label - 4, y: label + cell * i + cell * 0.7, 'text-anchor': 'end', 'font-size': 11,
        class: 'token' + (state.locked === i ? ' locked' : ''), 'data-pos': i,
      }, visible(tok));
      rowLabel.addEventListener('click', () => lockRow(i));
      svg.append(rowLabel);
      svg.append(svgEl('text', {
        x: 0, y: 0, 'font-size': 11,
        transform: `translate(${label + cell * i + cell * 0.7},${label - 4}) rotate(-90)`,
      }, visible(tok)));
    });
  }
  for (let i = 0; i < t; i++) {
    for (let j = 0; j < t; j++) {
      const w = m[i][j];
      const dim = opts.labels && state.locked !== null && state.locked !== i;
      const rect = svgEl('rect', {
        x: label + cell * j, y: label + cell * i, width: cell, height: cell,
        fill: shade(w), 'fill-opacity': dim ? 0.25 : 1,
        class: 'cell',
      });
      if (opts.cells) {
        rect.setAttribute('data-testid', 'attention-cell');
        rect.setAttribute('data-row', i);
        rect.setAttribute('data-col', j);
        rect.setAttribute('data-value', w);
        hover(rect, `${visible(tokens[i])} → ${visible(tokens[j])}: ${w.toFixed(4)} (${w})`);
      }
      svg.append(rect);
    }
  }
  return svg;
}

function lockRow(i) {
  state.locked = state.locked === i ? null : i;
  writeUrl();
  renderHead();
}

// The arc diagram: tokens on a line, an arc from each query down to each key it attends to,
// as thick as the weight.
function graphSvg(m, tokens) {
  const t = tokens.length;
  const step = Math.max(22, Math.min(44, Math.floor(640 / t)));
  const width = step * t + 40;
  const base = 40 + step * t / 2.2;
  const svg = svgEl('svg', { xmlns: SVG_NS, width, height: base + 40, class: 'graph' });
  const x = (i) => 20 + step * i + step / 2;
  for (let i = 0; i < t; i++) {
    if (state.locked !== null && state.locked !== i) continue;
    for (let j = 0; j <= i; j++) {
      const w = m[i][j];
      if (w < 0.02 && state.locked === null) continue;
      const h = (i - j) * step / 2.2;
      const d = i === j
        ? `M ${x(i) - 4} ${base - 14} a 6 6 0 1 1 8 0`
        : `M ${x(i)} ${base - 14} C ${x(i)} ${base - 14 - h}, ${x(j)} ${base - 14 - h}, ${x(j)} ${base - 14}`;
      const arc = svgEl('path', {
        d, fill: 'none', stroke: '#24556b', 'stroke-opacity': 0.25 + 0.75 * w,
        'stroke-width': 0.5 + 7 * w, class: 'arc', 'data-testid': 'attention-arc',
        'data-from': i, 'data-to': j, 'data-value': w,
      });
      hover(arc, `${visible(tokens[i])} → ${visible(tokens[j])}: ${w.toFixed(4)}`);
      svg.append(arc);
    }
  }
  tokens.forEach((tok, i) => {
    const label = svgEl('text', {
      x: x(i), y: base + 4, 'text-anchor': 'middle', 'font-size': 13,
      class: 'token' + (state.locked === i ? ' locked' : ''), 'data-testid': 'graph-token',
      'data-pos': i,
    }, visible(tok));
    label.addEventListener('click', () => lockRow(i));
    svg.append(label);
  });
  return svg;
}

function renderHead() {
  const m = currentMatrix();
  const tokens = attention.tokens;
  $('heatmap').replaceChildren(heatmapSvg(m, tokens, Math.min(560, 28 * tokens.length), { labels: true, cells: true }));
  $('graph').replaceChildren(graphSvg(m, tokens));
  lastJson.head = { tokens, layer: state.layer, head: state.head, weights: m };
}

function renderHeads() {
  const grid = $('grid');
  grid.style.gridTemplateColumns = `repeat(${model.n_head}, max-content)`;
  grid.replaceChildren();
  attention.layers.forEach((layer) => {
    layer.heads.forEach((m, h) => {
      const box = el('div', {
        class: 'thumb', 'data-testid': 'head-thumb', 'data-layer': layer.layer, 'data-head': h,
      });
      box.append(heatmapSvg(m, attention.tokens, 120), el('div', {}, `layer ${layer.layer} · head ${h}`));
      box.addEventListener('click', () => {
        state.layer = layer.layer;
        state.head = String(h);
        $('layer').value = String(state.layer);
        $('head').value = state.head;
        setView('head');
      });
      grid.append(box);
    });
  });
  lastJson.heads = attention;
}

function vecRow(values, opts = {}) {
  const row = el('div', { class: 'vec' });
  values.forEach((v) => {
    const s = el('span', { title: v === null ? '−∞ (masked)' : String(v) }, round(v, opts.digits || 3));
    if (v === null) s.className = 'masked';
    row.append(s);
  });
  return row;
}

function step(name, title, formula, values, body) {
  const box = el('div', {
    class: 'step', 'data-testid': 'trace-step', 'data-step': name,
    'data-values': JSON.stringify(values),
  });
  box.append(el('h4', {}, title), el('div', { class: 'formula' }, formula));
  for (const b of body) box.append(b);
  return box;
}

function labelled(rows, labels) {
  const table = el('table');
  rows.forEach((r, i) => {
    const tr = el('tr');
    tr.append(el('td', { class: 'mono' }, labels[i]), el('td', {}, vecRow(r)));
    table.append(tr);
  });
  return table;
}

async function renderTrace() {
  const t = promptInfo.tokens.length;
  const sel = $('query');
  if (sel.options.length !== t) {
    sel.replaceChildren(...promptInfo.tokens.map((tok, i) => el('option', { value: i }, `${i}: ${visible(tok)}`)));
  }
  if (state.query === null || state.query >= t) state.query = t - 1;
  sel.value = String(state.query);
  if (state.head === 'mean') {
    $('trace').replaceChildren(el('p', { class: 'help' }, 'Pick one head (not the mean) to trace.'));
    return;
  }
  const tr = await api('/api/trace', {
    prompt: state.prompt, layer: state.layer, head: parseInt(state.head, 10), query: state.query,
  });
  lastJson.trace = tr;
  const n = tr.query + 1;
  const keys = tr.tokens.map((tok, j) => `k${j} ${visible(tok)}${j > tr.query ? ' (future)' : ''}`);
  const vals = tr.tokens.map((tok, j) => `v${j} ${visible(tok)}`);
  const rot = tr.rotary ? ', then turned by its position (rotary)' : '';
  $('trace').replaceChildren(
    el('p', {}, `Layer ${tr.layer}, head ${tr.head}, query token ${tr.query} ${visible(tr.tokens[tr.query])}; d_k = ${tr.head_size}.`),
    step('x', '1. x: the query token after the block\'s LayerNorm', 'x = LN₁(residual stream)', tr.x, [vecRow(tr.x)]),
    step('w_q', '2. W_Q: this head\'s query weights (rows: d_k outputs)', 'q = W_Q·x' + (tr.b_q ? ' + b_Q' : '') + rot,
      { w_q: tr.w_q, b_q: tr.b_q }, [el('details', {}, el('summary', {}, `${tr.w_q.length} × ${tr.x.length} matrix`), labelled(tr.w_q, tr.w_q.map((_, i) => `row ${i}`)))]),
    step('q', '3. q: the query', 'q = W_Q·x' + (tr.b_q ? ' + b_Q' : '') + rot, tr.q, [vecRow(tr.q)]),
    step('k', '4. k: a key for every token (same head, W_K)', 'kⱼ = W_K·xⱼ', tr.k, [labelled(tr.k, keys)]),
    step('v', '5. v: a value for every token (W_V)', 'vⱼ = W_V·xⱼ', tr.v, [labelled(tr.v, vals)]),
    step('scores', '6. q·kⱼ', 'scoreⱼ = Σᵢ qᵢ·kⱼᵢ', tr.scores, [vecRow(tr.scores)]),
    step('scaled', '7. ÷ √d_k', `scoreⱼ / √${tr.head_size} = scoreⱼ / ${Math.sqrt(tr.head_size).toFixed(3)}`, tr.scaled, [vecRow(tr.scaled)]),
    step('masked', '8. + M (the causal mask)', 'M = 0 for j ≤ query, −∞ after: a token never sees the future', tr.masked, [vecRow(tr.masked)]),
    step('weights', '9. softmax', 'aⱼ = exp(sⱼ) / Σ exp(s): the row of the heatmap', tr.weights, [vecRow(tr.weights, { digits: 4 })]),
    step('output', '10. Σ aⱼvⱼ', `the head's output for token ${tr.query}: the values mixed by the weights (${n} of them)`, tr.output, [vecRow(tr.output)]),
  );
}

function parseVectors(text) {
  return text.split('\n').map((l) => l.trim()).filter((l) => l.length > 0)
    .map((l) => l.split(/[\s,]+/).map(Number));
}

async function renderTextbook() {
  const vectors = parseVectors($('textbook-input').value);
  if (vectors.some((v) => v.some((x) => !Number.isFinite(x)))) {
    showError('textbook: every entry must be a number');
    return;
  }
  const r = await api('/api/textbook', { vectors });
  lastJson.textbook = r;
  const names = r.inputs.map((_, i) => `x${i}`);
  const tb = (name, title, formula, values, rows) => {
    const box = step(name, title, formula, values, [labelled(rows, names)]);
    box.setAttribute('data-testid', 'textbook-step');
    return box;
  };
  $('textbook').replaceChildren(
    tb('inputs', 'Inputs X', 'one vector per token', r.inputs, r.inputs),
    tb('scores', 'Scores X·Xᵀ', 'ω_ij = xᵢ·xⱼ (no scaling, no mask)', r.scores, r.scores),
    tb('weights', 'Weights softmax(ω)', 'each row sums to 1', r.weights, r.weights),
    tb('context', 'Context weights·X', 'zᵢ = Σⱼ αᵢⱼ xⱼ', r.context, r.context),
  );
}

function sampling() {
  const num = (v) => (v === '' || v === null ? null : Number(v));
  return {
    temperature: Number(state.temperature),
    top_k: num(state.top_k),
    top_p: num(state.top_p),
    seed: Number(state.seed),
  };
}

async function renderNext() {
  const r = await api('/api/next', { prompt: state.prompt, ...sampling() });
  lastJson.next = r;
  const total = r.rows.reduce((s, x) => s + x.prob, 0);
  $('next-summary').textContent = `${r.candidates} candidate token(s); the ${r.rows.length} shown hold ${(100 * total).toFixed(2)}% of the probability.`;
  const body = $('next-table').querySelector('tbody');
  body.replaceChildren(...r.rows.map((x) => {
    const tr = el('tr', { 'data-testid': 'next-token-row', 'data-token': x.id, 'data-text': x.token, 'data-prob': x.prob });
    const bar = el('span', { class: 'bar' });
    bar.style.width = (x.prob * 12) + 'rem';
    tr.append(
      el('td', { class: 'mono' }, visible(x.token)), el('td', { class: 'num' }, String(x.id)),
      el('td', { class: 'num', title: String(x.logit) }, x.logit.toFixed(3)),
      el('td', { title: String(x.prob) }, bar, (100 * x.prob).toFixed(2) + '%'));
    return tr;
  }));
}

async function sampleOne() {
  const r = await api('/api/sample', { prompt: state.prompt, ...sampling() });
  lastJson.sample = r;
  document.body.setAttribute('data-last-sample', r.token);
  document.body.setAttribute('data-last-sample-id', r.id);
  state.prompt = r.text;
  $('prompt').value = state.prompt;
  await refresh();
}

async function renderLens() {
  const r = await api('/api/lens', { prompt: state.prompt });
  lastJson.lens = r;
  const table = el('table');
  const head = el('tr', {}, el('th', {}, 'after'));
  r.tokens.forEach((t, i) => head.append(el('th', { title: `position ${i}` }, visible(t))));
  table.append(head);
  r.layers.forEach((layer) => {
    const tr = el('tr', {}, el('th', {}, `layer ${layer.layer}`));
    layer.cells.forEach((c, pos) => {
      const td = el('td', {
        'data-testid': 'lens-cell', 'data-layer': layer.layer, 'data-pos': pos,
        'data-token': c.id, 'data-prob': c.prob, title: `${visible(c.token)}: ${c.prob}`,
      }, visible(c.token), el('br'), el('small', {}, (100 * c.prob).toFixed(0) + '%'));
      td.style.background = shade(c.prob);
      td.style.color = c.prob > 0.6 ? 'white' : 'inherit';
      tr.append(td);
    });
    table.append(tr);
  });
  $('lens').replaceChildren(table);
}

async function renderEmbed() {
  const token = $('embed-token').value;
  state.token = token;
  writeUrl();
  const r = await api('/api/neighbours?' + new URLSearchParams({ token, k: 15 }));
  lastJson.embed = r;
  $('embed-table').querySelector('tbody').replaceChildren(...r.neighbours.map((n) =>
    el('tr', { 'data-testid': 'neighbour-row', 'data-token': n.id },
      el('td', { class: 'mono' }, visible(n.token)), el('td', { class: 'num' }, String(n.id)),
      el('td', { class: 'num' }, n.similarity.toFixed(4)))));
}

async function renderCurves() {
  const r = await api('/api/metrics');
  lastJson.curves = r;
  const all = r.train.concat(r.val);
  const [w, h, pad] = [720, 360, 50];
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs) || 1];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (w - 2 * pad) * (x - x0) / ((x1 - x0) || 1);
  const sy = (y) => h - pad - (h - 2 * pad) * (y - y0) / ((y1 - y0) || 1);
  const svg = svgEl('svg', { xmlns: SVG_NS, width: w, height: h, 'data-testid': 'curves' });
  svg.append(svgEl('rect', { x: 0, y: 0, width: w, height: h, fill: 'white' }));
  svg.append(svgEl('line', { x1: pad, y1: h - pad, x2: w - pad, y2: h - pad, stroke: '#888' }));
  svg.append(svgEl('line', { x1: pad, y1: pad, x2: pad, y2: h - pad, stroke: '#888' }));
  for (let k = 0; k <= 4; k++) {
    const y = y0 + (y1 - y0) * k / 4;
    svg.append(svgEl('text', { x: pad - 6, y: sy(y) + 4, 'text-anchor': 'end', 'font-size': 11 }, y.toFixed(2)));
    const x = x0 + (x1 - x0) * k / 4;
    svg.append(svgEl('text', { x: sx(x), y: h - pad + 16, 'text-anchor': 'middle', 'font-size': 11 }, String(Math.round(x))));
  }
  const line = (pts, color, name, dy) => {
    if (!pts.length) return;
    svg.append(svgEl('polyline', {
      points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(' '),
      fill: 'none', stroke: color, 'stroke-width': 1.5, 'data-series': name,
    }));
    svg.append(svgEl('text', { x: w - pad, y: pad + dy, 'text-anchor': 'end', fill: color, 'font-size': 12 }, name));
  };
  line(r.train, '#3b7ea1', 'train', 0);
  line(r.val, '#c0392b', 'val', 16);
  if (r.best_val) {
    svg.append(svgEl('circle', { cx: sx(r.best_val[0]), cy: sy(r.best_val[1]), r: 4, fill: '#c0392b' }));
    svg.append(svgEl('text', { x: sx(r.best_val[0]) + 6, y: sy(r.best_val[1]) - 6, 'font-size': 11 }, `best val ${r.best_val[1].toFixed(4)}`));
  }
  svg.append(svgEl('text', { x: w / 2, y: h - 8, 'text-anchor': 'middle', 'font-size': 12 }, 'step'));
  $('curves').replaceChildren(svg);
}


// ---- Circuits: head scores, ablation, patching, direct logit attribution ----

const SCORES = [
  ['ablation', 'ablation: loss increase'],
  ['prev_token', 'previous-token'],
  ['current_token', 'current-token'],
  ['induction', 'induction'],
  ['second_copy_ablated', '2nd-copy loss, ablated'],
  ['sink', 'attention to first token'],
  ['entropy', 'entropy (nats)'],
];
const FRACTIONS = ['prev_token', 'current_token', 'induction', 'sink'];

function ablatedHeads() {
  return state.ablate ? state.ablate.split(',').filter((h) => h) : [];
}

function toggleHead(layer, head) {
  const set = new Set(ablatedHeads());
  const key = `${layer}.${head}`;
  if (set.has(key)) set.delete(key); else set.add(key);
  state.ablate = [...set].sort().join(',');
  writeUrl();
  return renderView();
}

// A layers × heads grid of `cells` ({layer, head, value, ...}), each cell shaded by value / top;
// with `onClick`, a clickable grid whose ablated heads are outlined.
function headGridSvg(title, cells, top, attrs, onClick) {
  const cell = 44;
  const [left, topPad] = [30, 22];
  const w = left + model.n_head * cell + 6;
  const h = topPad + model.n_layer * cell + 18;
  const svg = svgEl('svg', { xmlns: SVG_NS, width: w, height: h });
  svg.append(svgEl('text', { x: left, y: 14, 'font-size': 12 }, title));
  const ablated = ablatedHeads();
  for (const c of cells) {
    const x = left + c.head * cell;
    const y = topPad + c.layer * cell;
    const t = top > 0 ? Math.max(0, Math.min(1, c.value / top)) : 0;
    const rect = svgEl('rect', {
      x, y, width: cell - 2, height: cell - 2, fill: c.fill || shade(t),
      class: 'cell' + (onClick && ablated.includes(`${c.layer}.${c.head}`) ? ' ablated' : ''),
      'data-layer': c.layer, 'data-head': c.head, 'data-value': c.value, ...attrs(c),
    });
    if (onClick) {
      rect.style.cursor = 'pointer';
      rect.addEventListener('click', () => onClick(c));
    }
    hover(rect, `head ${c.layer}.${c.head}: ${Number(c.value).toFixed(4)}`);
    svg.append(rect);
    svg.append(svgEl('text', {
      x: x + cell / 2 - 1, y: y + cell / 2 + 4, 'text-anchor': 'middle', 'font-size': 10,
      fill: t > 0.6 && !c.fill ? 'white' : '#1d232a', 'pointer-events': 'none',
    }, Number(c.value).toFixed(2)));
  }
  for (let l = 0; l < model.n_layer; l++) {
    svg.append(svgEl('text', { x: left - 4, y: topPad + l * cell + cell / 2 + 4, 'text-anchor': 'end', 'font-size': 10 }, `L${l}`));
  }
  for (let k = 0; k < model.n_head; k++) {
    svg.append(svgEl('text', { x: left + k * cell + cell / 2, y: h - 4, 'text-anchor': 'middle', 'font-size': 10 }, `H${k}`));
  }
  return svg;
}

function renderScores() {
  const r = headScores;
  const i = r.induction;
  $('scores-summary').textContent = `loss ${r.loss.toFixed(4)} on ${r.tokens} ${r.split} tokens; `
    + `${i.sequences} random sequences of ${i.length} tokens written twice: loss ${i.first_copy_loss.toFixed(3)} `
    + `on the first copy, ${i.second_copy_loss.toFixed(3)} on the second. A randomly initialised model's best head: `
    + `previous-token ${r.random_init.prev_token.toFixed(3)}, induction ${r.random_init.induction.toFixed(3)}.`;
  const grids = SCORES.map(([key, title]) => {
    const cells = r.heads.map((h) => ({ layer: h.layer, head: h.head, value: h[key] }));
    const top = FRACTIONS.includes(key) ? 1 : Math.max(1e-9, ...cells.map((c) => c.value));
    return headGridSvg(title, cells, top, () => ({ 'data-testid': 'head-score-cell', 'data-score': key }),
      (c) => toggleHead(c.layer, c.head));
  });
  $('score-grids').replaceChildren(...grids);
}

function renderToggles() {
  const on = ablatedHeads();
  const buttons = [];
  for (let l = 0; l < model.n_layer; l++) {
    for (let h = 0; h < model.n_head; h++) {
      const b = el('button', {
        'data-testid': 'ablate-toggle', 'data-layer': l, 'data-head': h,
        'aria-pressed': String(on.includes(`${l}.${h}`)),
      }, `${l}.${h}`);
      b.addEventListener('click', () => toggleHead(l, h));
      buttons.push(b);
    }
  }
  $('ablate-toggles').replaceChildren(...buttons);
  $('ablation-kind').value = state.ablation;
}

function nextRows(id, rows, which) {
  $(id).querySelector('tbody').replaceChildren(...rows.map((n) =>
    el('tr', { 'data-testid': 'ablate-next-row', 'data-which': which, 'data-token': n.id, 'data-prob': n.prob },
      el('td', { class: 'mono' }, visible(n.token)),
      el('td', { class: 'num' }, (100 * n.prob).toFixed(1) + '%'))));
}

function renderAblation(r) {
  const [base, abl] = [r.base, r.ablated];
  const heads = r.heads.length ? r.heads.join(', ') : 'none';
  $('ablate-summary').textContent = base.loss === null
    ? `heads ablated: ${heads} (a one-token prompt has no loss to show)`
    : `heads ablated: ${heads}; the prompt's mean loss ${base.loss.toFixed(4)} → ${abl.loss.toFixed(4)}`;
  const table = el('table');
  const head = el('tr', {}, el('th', {}, 'predicting'));
  r.tokens.slice(1).forEach((t) => head.append(el('th', { class: 'mono' }, visible(t))));
  table.append(head);
  const row = (name, values, attrs) => {
    const tr = el('tr', {}, el('th', {}, name));
    values.forEach((v, i) => tr.append(el('td', { class: 'num', ...attrs(i) }, v.toFixed(2))));
    table.append(tr);
  };
  row('loss', base.losses, () => ({}));
  row('ablated', abl.losses, () => ({}));
  row('change', abl.losses.map((v, i) => v - base.losses[i]), (i) => ({
    'data-testid': 'loss-cell', 'data-pos': i + 1, 'data-base': base.losses[i], 'data-ablated': abl.losses[i],
  }));
  $('ablate-losses').replaceChildren(table);
  nextRows('ablate-next-base', base.next, 'base');
  nextRows('ablate-next-ablated', abl.next, 'ablated');
}

function renderPatch(r) {
  $('patch-summary').textContent = `logit difference (answer − wrong) at the last position: `
    + `clean ${r.clean_logit_diff.toFixed(3)}, corrupted ${r.corrupted_logit_diff.toFixed(3)}; `
    + `each cell: the fraction of the gap a head's patch restores`;
  const cells = r.cells.map((c) => ({
    layer: c.layer, head: c.head, value: c.restored === null ? 0 : c.restored, diff: c.logit_diff,
    fill: c.restored !== null && c.restored < 0 ? '#f3c0b8' : null,
  }));
  $('patch-grid').replaceChildren(headGridSvg('restored', cells, 1,
    (c) => ({ 'data-testid': 'patch-cell', 'data-diff': c.diff })));
}

function renderDla(r) {
  $('dla-summary').textContent = `logit of ${visible(r.token_text)} (id ${r.token}) after the prompt: `
    + `${r.logit.toFixed(4)}, the sum of the rows below (final norm scale ${r.scale.toFixed(4)})`;
  $('dla-summary').setAttribute('data-logit', r.logit);
  const top = Math.max(1e-9, ...r.contributions.map((c) => Math.abs(c.value)));
  $('dla-table').querySelector('tbody').replaceChildren(...r.contributions.map((c) =>
    el('tr', { 'data-testid': 'dla-row', 'data-component': c.component, 'data-value': c.value },
      el('td', { class: 'mono' }, c.component),
      el('td', { class: 'num' },
        el('span', { class: 'bar' + (c.value < 0 ? ' neg' : ''), style: `width:${(120 * Math.abs(c.value) / top).toFixed(1)}px` }),
        c.value.toFixed(4)))));
}

async function renderCircuits() {
  if (!headScores) headScores = await api('/api/heads');
  lastJson.circuits = { scores: headScores };
  renderScores();
  renderToggles();
  const ablation = await api('/api/ablate', { prompt: state.prompt, heads: ablatedHeads(), ablation: state.ablation });
  lastJson.circuits.ablation = ablation;
  renderAblation(ablation);
  const dla = await api('/api/dla', { prompt: state.prompt, token: state.dla_token });
  lastJson.circuits.attribution = dla;
  renderDla(dla);
  for (const k of ['clean', 'corrupted', 'answer', 'wrong']) $('patch-' + k).value = state[k];
  $('dla-token').value = state.dla_token;
  if (state.clean && state.corrupted && state.answer && state.wrong) {
    const patch = await api('/api/patch', { clean: state.clean, corrupted: state.corrupted, answer: state.answer, wrong: state.wrong });
    lastJson.circuits.patching = patch;
    renderPatch(patch);
  } else {
    $('patch-grid').replaceChildren();
    $('patch-summary').textContent = '';
  }
}

const renderers = {
  head: async () => renderHead(),
  heads: async () => renderHeads(),
  trace: renderTrace,
  next: renderNext,
  lens: renderLens,
  embed: renderEmbed,
  curves: renderCurves,
  circuits: renderCircuits,
};

async function renderView() {
  document.body.setAttribute('data-ready', 'false');
  await guarded(async () => {
    if (['head', 'heads', 'trace', 'next', 'lens', 'circuits'].includes(state.view) && !attention) return;
    await renderers[state.view]();
  });
  document.body.setAttribute('data-ready', 'true');
}

function setView(view) {
  state.view = view;
  writeUrl();
  for (const b of document.querySelectorAll('nav#tabs button')) {
    b.classList.toggle('active', b.dataset.view === view);
  }
  for (const v of document.querySelectorAll('.view')) {
    v.classList.toggle('active', v.id === 'view-' + view);
  }
  return renderView();
}

// Reads the prompt, asks for its tokens and attention, and redraws the current view.
async function refresh() {
  document.body.setAttribute('data-ready', 'false');
  state.prompt = $('prompt').value;
  writeUrl();
  let ok = false;
  await guarded(async () => {
    promptInfo = await api('/api/prompt', { prompt: state.prompt });
    attention = await api('/api/attention', { prompt: state.prompt });
    ok = true;
  });
  if (!ok) {
    attention = null;
    promptInfo = null;
    document.body.setAttribute('data-ready', 'true');
    return;
  }
  const note = $('note');
  note.hidden = !promptInfo.note;
  note.textContent = promptInfo.note || '';
  if (state.locked !== null && state.locked >= promptInfo.tokens.length) state.locked = null;
  await renderView();
}

function download(name, blob) {
  const a = el('a', { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
}

// The current view's drawings as one SVG document.
function viewSvg() {
  const svgs = [...document.querySelectorAll(`#view-${state.view} svg`)];
  if (!svgs.length) return null;
  let width = 0;
  let height = 0;
  const out = svgEl('svg', { xmlns: SVG_NS });
  out.append(svgEl('rect', { x: 0, y: 0, width: '100%', height: '100%', fill: 'white' }));
  for (const s of svgs.slice(0, 64)) {
    const w = Number(s.getAttribute('width'));
    const h = Number(s.getAttribute('height'));
    const g = svgEl('g', { transform: `translate(${width},0)` });
    for (const c of s.childNodes) g.append(c.cloneNode(true));
    out.append(g);
    width += w + 20;
    height = Math.max(height, h);
  }
  out.setAttribute('width', width);
  out.setAttribute('height', height);
  return new XMLSerializer().serializeToString(out);
}

function exportView(kind) {
  const base = `tinygpt-${state.view}`;
  if (kind === 'json') {
    const data = lastJson[state.view] || {};
    download(base + '.json', new Blob([JSON.stringify(data, null, 1)], { type: 'application/json' }));
    return;
  }
  const svg = viewSvg();
  if (!svg) {
    showError(`the ${state.view} view has no drawing to export; use JSON`);
    return;
  }
  if (kind === 'svg') {
    download(base + '.svg', new Blob([svg], { type: 'image/svg+xml' }));
    return;
  }
  const img = new Image();
  const url = URL.createObjectURL(new Blob([svg], { type: 'image/svg+xml' }));
  img.onload = () => {
    const canvas = document.createElement('canvas');
    canvas.width = img.width;
    canvas.height = img.height;
    canvas.getContext('2d').drawImage(img, 0, 0);
    canvas.toBlob((b) => download(base + '.png', b), 'image/png');
    URL.revokeObjectURL(url);
  };
  img.src = url;
}

async function start() {
  readUrl();
  model = await api('/api/model');
  $('model-info').textContent = `${model.checkpoint}: ${model.n_layer} layers × ${model.n_head} heads, `
    + `C = ${model.n_embd}, block ${model.block_size}, ${model.vocab_size} ${model.tokenizer} tokens, `
    + `${model.parameters.toLocaleString()} parameters` + (model.step !== null ? `, step ${model.step}` : '');
  $('layer').replaceChildren(...Array.from({ length: model.n_layer }, (_, l) => el('option', { value: l }, String(l))));
  $('head').replaceChildren(
    ...Array.from({ length: model.n_head }, (_, h) => el('option', { value: h }, String(h))),
    el('option', { value: 'mean' }, 'mean'));
  if (state.layer >= model.n_layer) state.layer = 0;
  if (state.head !== 'mean' && !(parseInt(state.head, 10) < model.n_head)) state.head = '0';
  $('layer').value = String(state.layer);
  $('head').value = state.head;
  if (!state.prompt) state.prompt = model.tokenizer === 'char' ? 'To be or not to be' : 'The meaning of';
  $('prompt').value = state.prompt;
  for (const k of ['temperature', 'top_k', 'top_p', 'seed']) {
    if (state[k] === null) state[k] = model.sampling[k] ?? '';
  }
  for (const k of ['temperature', 'seed']) $(k).value = state[k];
  $('top-k').value = state.top_k;
  $('top-p').value = state.top_p;
  $('embed-token').value = state.token;

  $('run').addEventListener('click', refresh);
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); refresh(); }
  });
  $('layer').addEventListener('change', () => { state.layer = parseInt($('layer').value, 10); writeUrl(); renderView(); });
  $('head').addEventListener('change', () => { state.head = $('head').value; writeUrl(); renderView(); });
  $('query').addEventListener('change', () => { state.query = parseInt($('query').value, 10); writeUrl(); renderView(); });
  for (const [id, key] of [['temperature', 'temperature'], ['top-k', 'top_k'], ['top-p', 'top_p'], ['seed', 'seed']]) {
    $(id).addEventListener('change', () => { state[key] = $(id).value; writeUrl(); renderView(); });
  }
  $('sample').addEventListener('click', () => busy(sampleOne));
  $('textbook-run').addEventListener('click', () => busy(renderTextbook));
  $('embed-run').addEventListener('click', () => renderView());
  $('ablation-kind').addEventListener('change', () => { state.ablation = $('ablation-kind').value; writeUrl(); renderView(); });
  $('patch-run').addEventListener('click', () => {
    for (const k of ['clean', 'corrupted', 'answer', 'wrong']) state[k] = $('patch-' + k).value;
    writeUrl();
    if (!(state.clean && state.corrupted && state.answer && state.wrong)) {
      showError('patching needs a clean and a corrupted prompt, an answer and a wrong token');
      return;
    }
    renderView();
  });
  $('dla-run').addEventListener('click', () => { state.dla_token = $('dla-token').value; writeUrl(); renderView(); });
  for (const b of document.querySelectorAll('nav#tabs button')) {
    b.addEventListener('click', () => setView(b.dataset.view));
  }
  $('export-png').addEventListener('click', () => exportView('png'));
  $('export-svg').addEventListener('click', () => exportView('svg'));
  $('export-json').addEventListener('click', () => exportView('json'));
  await guarded(renderTextbook);
  for (const b of document.querySelectorAll('nav#tabs button')) {
    b.classList.toggle('active', b.dataset.view === state.view);
  }
  for (const v of document.querySelectorAll('.view')) {
    v.classList.toggle('active', v.id === 'view-' + state.view);
  }
  await refresh();
}

start().catch((e) => { window.__errors.push(String(e)); showError(String(e)); });
