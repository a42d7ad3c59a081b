// epbench feature browser: plain JS, no network. Data files are scripts calling EPB.* (file:// forbids fetch);
// the index and vocabularies load with the page; a block of feature cards, of store contexts, of the text-search
// index or of the token-string table only when a card or a query needs it.
"use strict";
const EPB = (window.EPB = { data: null, byId: {}, shards: {}, vocabs: {}, ctx: {}, pending: {}, searchShards: {},
  fireShards: {}, fireStr: {}, order: {}, lists: {} });

EPB.index = (d) => { EPB.data = d; d.artefacts.forEach((a, i) => { a.pos_ = i; EPB.byId[a.id] = a; }); start(); };
EPB.shard = (aid, block, packed) => { EPB.shards[aid + "/" + block] = inflate(packed); };
EPB.vocab = (model, map) => { EPB.vocabs[model] = map; };
EPB.contexts = (store, block, map) => { Object.assign(EPB.ctx[store] ||= {}, map); };
EPB.search = (key, shard, packed) => { EPB.searchShards[shard] = inflate(packed); };
EPB.fire = (model, shard, packed) => { EPB.fireShards[model + "/" + shard] = inflate(packed); };
EPB.fireStrings = (model, block, packed) => { EPB.fireStr[model] = inflate(packed); };

// Data blocks are gzipped JSON in base64: decoded by the browser's own DecompressionStream (no fetch involved).
async function inflate(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const text = await new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"))).text();
  return JSON.parse(text);
}
function safe(name) { return name.replace(/[^A-Za-z0-9_.=-]+/g, "_"); }
function load(src) {
  if (!EPB.pending[src]) {
    EPB.pending[src] = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src; s.onload = resolve;
      s.onerror = () => reject(new Error("cannot load " + src + " (was the site copied whole?)"));
      document.head.appendChild(s);
    });
  }
  return EPB.pending[src];
}
function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function show(s) { return String(s).replace(/\n/g, "⏎").replace(/\t/g, "⇥"); }
function tok(model, id) { const v = EPB.vocabs[model]; return v && id in v ? v[id] : "#" + id; }
function fmt(v, d = 3) {  // numbers only: anything else from a data file shows as a dash, never as markup
  if (v === null || v === undefined || typeof v !== "number" || !isFinite(v)) return "—";
  if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-4)) return v.toExponential(d - 1);
  let s = v.toPrecision(d);
  if (s.includes(".")) s = s.replace(/0+$/, "").replace(/\.$/, "");
  return s;
}
function pct(n, rows) { return rows ? fmt((100 * n) / rows) + "%" : "—"; }
function label(a, k) { const t = a.labels[k]; return t >= 0 ? show(tok(a.model, t)) : ""; }
function unique(xs) { return [...new Set(xs)]; }
// words as bench/browser/text.py cuts them (Python \w+, lowercased, at most 40 characters), and its FNV-1a hash
function words(text) {
  return (String(text).match(/[\p{L}\p{N}_]+/gu) || []).filter((w) => [...w].length <= 40).map((w) => w.toLowerCase());
}
function fnv1a(s) {
  let h = 0x811c9dc5;
  for (const b of new TextEncoder().encode(s)) { h ^= b; h = Math.imul(h, 0x01000193) >>> 0; }
  return h >>> 0;
}

async function start() {
  const models = unique(EPB.data.artefacts.map((a) => a.model));
  await Promise.all(models.map((m) => load("data/vocab/" + safe(m) + ".js")));
  document.getElementById("subtitle").textContent = EPB.data.title || "";
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "1";
  EPB.loadMs = performance.now();  // since navigation start: what a reader waits for the index
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const main = document.getElementById("main");
  main.dataset.view = parts[0] || "index";
  if (parts[0] === "a") return listView(main, parts[1]);
  if (parts[0] === "f") return cardsView(main, [[parts[1], +parts[2]]]);
  if (parts[0] === "cmp") return cardsView(main, [[parts[1], +parts[2]], [parts[3], +parts[4]]]);
  return indexView(main);
}

// ----- index: dictionaries, filters, search --------------------------------------------------------------
const state = { model: "", layer: "", method: "", q: "", fires: "" };

function indexView(main) {
  const arts = EPB.data.artefacts;
  const opts = (key) => unique(arts.map((a) => String(a[key]))).map((v) => `<option>${esc(v)}</option>`).join("");
  main.innerHTML = `<div class="filters">
    <label>model <select id="f-model"><option value="">all</option>${opts("model")}</select></label>
    <label>layer <select id="f-layer"><option value="">all</option>${opts("layer")}</select></label>
    <label>method <select id="f-method"><option value="">all</option>${opts("method")}</select></label>
    <input id="search" type="search" placeholder="search: a word of the contexts, a token, a concept (noun.animal), #id">
    </div><div id="results"></div><div id="text-results"></div>
    <div class="filters"><input id="fires" type="search" placeholder="features that fire on this text: type a phrase">
    </div><div id="fire-results"></div><div id="table"></div>`;
  for (const key of ["model", "layer", "method"]) {
    const el = document.getElementById("f-" + key);
    el.value = state[key];
    el.addEventListener("change", () => { state[key] = el.value; renderIndex(); });
  }
  const box = document.getElementById("search");
  box.value = state.q;
  box.addEventListener("input", () => { state.q = box.value; renderResults(filtered()); });
  const fires = document.getElementById("fires");
  fires.value = state.fires;
  fires.addEventListener("input", () => { state.fires = fires.value; renderFires(filtered()); });
  renderIndex();
}

function filtered() {
  return EPB.data.artefacts.filter((a) => (!state.model || a.model === state.model) &&
    (!state.layer || String(a.layer) === state.layer) && (!state.method || a.method === state.method));
}

function renderIndex() {
  const arts = filtered();
  const mets = EPB.data.headline.filter((m) => arts.some((a) => m in a.metrics));
  const head = ["model", "layer", "dictionary", "K", "build tokens", "build s"].map((h) => `<th>${h}</th>`).join("") +
    mets.map((m) => `<th class="num">${esc(m)}</th>`).join("");
  const body = arts.map((a) => `<tr class="art" data-id="${esc(a.id)}"><td>${esc(a.model)}</td><td>${esc(a.layer)}</td>
    <td><a href="#/a/${encodeURIComponent(a.id)}">${esc(a.name)}</a>${a.supervised ? " †" : ""}${a.same_as_run === false ?
      ' <span class="error" title="rebuilt since the run: the cards describe another fit than the metrics">⚠ rebuilt</span>' : ""}</td>
    <td class="num">${esc(a.K)}</td><td class="num">${fmt(a.cost.tokens, 4)}</td><td class="num">${fmt(a.cost.seconds)}</td>
    ${mets.map((m) => `<td class="num">${fmt(a.metrics[m])}</td>`).join("")}</tr>`).join("");
  const table = document.getElementById("table");
  table.innerHTML = `<table id="artefacts"><tr>${head}</tr>${body}</table>
    <p class="muted">${arts.length} dictionaries; click one for its features. Metrics are the run's own rows${
    EPB.data.meta.concept_set ? ` (concept metrics on the ${esc(EPB.data.meta.concept_set)} concept set)` : ""}.${
    EPB.data.meta.report ? ` The verdict: <a id="report-link" href="${esc(EPB.data.meta.report)}">the run's report</a>.` : ""}</p>`;
  table.querySelectorAll("tr.art").forEach((tr) => tr.addEventListener("click", (e) => {
    if (e.target.tagName !== "A") location.hash = "#/a/" + encodeURIComponent(tr.dataset.id);
  }));
  renderResults(arts);
  renderFires(arts);
}

function search(arts, q) {
  q = q.trim();
  if (!q) return [];
  const out = [];
  const idm = q.match(/^#?(\d+)$/);
  const lq = q.toLowerCase();
  for (const a of arts) {
    if (idm) { if (+idm[1] < a.K) out.push([a, +idm[1], "feature id", false]); continue; }
    for (const [c, [k, auc]] of Object.entries(a.concepts)) {
      if (c.toLowerCase().includes(lq)) {
        const chance = !(auc >= EPB.data.chance_auroc);
        out.push([a, k, `${c} (test AUROC ${fmt(auc)}${chance ? ", at chance" : ""})`, chance]);
      }
    }
    const v = EPB.vocabs[a.model] || {};
    for (let k = 0; k < a.K && out.length < 2000; k++) {
      const t = a.labels[k];
      if (t >= 0 && (v[t] || "").trim().toLowerCase() === lq) out.push([a, k, "token", false]);
    }
  }
  return out;
}

function hitLink(a, k, why, cls) {
  return `<a class="result ${cls}" href="#/f/${encodeURIComponent(a.id)}/${k}">
      ${esc(a.name)} L${esc(a.layer)} #${esc(k)} <b>${esc(label(a, k))}</b> <span class="muted">${esc(why)}</span></a>`;
}

function renderResults(arts) {
  const el = document.getElementById("results");
  const hits = search(arts, state.q);
  document.getElementById("text-results").innerHTML = "";
  if (!state.q.trim()) { el.innerHTML = ""; return; }
  el.innerHTML = `<div class="muted">${hits.length} feature(s) by label, concept or id match “${esc(state.q)}”${hits.length > 300 ? " (first 300)" : ""}</div>` +
    hits.slice(0, 300).map(([a, k, why, chance]) => hitLink(a, k, why, chance ? "at-chance" : "")).join("");
  textSearch(arts, state.q);
}

// Context-text search: features whose top-activating contexts contain every word of the query (data/search/).
async function textSearch(arts, q) {
  const el = document.getElementById("text-results");
  const ws = unique(words(q));
  if (!ws.length || !EPB.data.search) return;
  try {
    const n = EPB.data.search.shards;
    const lists = await Promise.all(ws.map(async (w) => {
      const s = fnv1a(w) % n;
      await load(`data/search/${s}.js`);
      return (await EPB.searchShards[s])[w] || [];
    }));
    if (q !== state.q) return;  // a newer query is being answered
    const allowed = new Set(arts.map((a) => a.pos_));
    const score = new Map();
    lists.forEach((post, wi) => {
      for (let i = 0; i < post.length; i += 3) {
        const key = post[i] + "/" + post[i + 1];
        const prev = score.get(key) || [0, 0];
        if (prev[1] === wi && allowed.has(post[i])) score.set(key, [prev[0] + post[i + 2], wi + 1]);
      }
    });
    const hits = [...score.entries()].filter(([, [, m]]) => m === ws.length).sort((x, y) => y[1][0] - x[1][0]);
    el.innerHTML = `<div class="muted">${hits.length} feature(s) whose top-activating contexts contain ${
      ws.map((w) => "“" + esc(w) + "”").join(" and ")}${hits.length > 300 ? " (first 300)" : ""}; ranked by the
      activation on those words relative to the feature's maximum (0–9 per word)</div>` +
      hits.slice(0, 300).map(([key, [s]]) => {
        const [ai, k] = key.split("/").map(Number), a = EPB.data.artefacts[ai];
        return hitLink(a, k, `text ${s}`, "text-hit");
      }).join("");
  } catch (e) {
    el.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

// "Features that fire on this text": the typed text cut into the store's token strings (longest match first),
// each string's top features per dictionary by mean activation over the store (data/fire/), summed.
async function fireStrings(model) {
  const src = `data/fire/${safe(model)}/strings.js`;
  await load(src);
  const d = await EPB.fireStr[model];
  if (!d.set) { d.set = new Set(d.strings); d.maxLen = Math.min(64, Math.max(1, ...d.strings.map((s) => s.length))); }
  return d;
}
function segment(text, d) {
  const out = [];
  for (let i = 0; i < text.length;) {
    let L = Math.min(d.maxLen, text.length - i);
    while (L > 0 && !d.set.has(text.substr(i, L))) L--;
    if (L === 0) { out.push([text[i], false]); i += 1; } else { out.push([text.substr(i, L), true]); i += L; }
  }
  return out;
}

let fireTimer = null;
function renderFires(arts) {
  clearTimeout(fireTimer);
  fireTimer = setTimeout(() => fireLookup(arts, state.fires), 150);
}
async function fireLookup(arts, text) {
  const el = document.getElementById("fire-results");
  if (!el) return;
  const fire = EPB.data.fire || {};
  const models = unique(arts.map((a) => a.model)).filter((m) => m in fire);
  if (!text) { el.innerHTML = ""; return; }
  if (!models.length) { el.innerHTML = `<p class="muted">no token-string table in this site</p>`; return; }
  try {
    let html = "";
    for (const m of models) {
      const d = await fireStrings(m);
      const pieces = segment(text, d), known = unique(pieces.filter((p) => p[1]).map((p) => p[0]));
      const n = fire[m].shards;
      const lists = await Promise.all(known.map(async (s) => {
        const sh = fnv1a(s) % n;
        await load(`data/fire/${safe(m)}/${sh}.js`);
        return (await EPB.fireShards[m + "/" + sh])[s] || [];
      }));
      if (text !== state.fires) return;
      const per = new Map();  // dictionary position -> Map(feature -> summed mean)
      const allowed = new Set(arts.filter((a) => a.model === m).map((a) => a.pos_));
      for (const post of lists) {
        for (let i = 0; i < post.length; i += 3) {
          if (!allowed.has(post[i])) continue;
          const f = per.get(post[i]) || new Map();
          f.set(post[i + 1], (f.get(post[i + 1]) || 0) + post[i + 2]);
          per.set(post[i], f);
        }
      }
      html += `<div class="segments">${esc(m)}: ${pieces.map(([s, ok]) =>
        `<span class="${ok ? "seg" : "seg unknown"}" title="${ok ? "a token string of the store" : "not a token string of the store: skipped"}">${esc(show(s))}</span>`).join("")}</div>`;
      for (const [ai, f] of [...per.entries()].sort((x, y) => x[0] - y[0])) {
        const a = EPB.data.artefacts[ai];
        const best = [...f.entries()].sort((x, y) => y[1] - x[1]).slice(0, 5);
        html += `<div class="fire-row"><span class="muted">${esc(a.name)} L${esc(a.layer)}</span> ${best.map(([k, s]) =>
          hitLink(a, k, "Σ mean " + fmt(s), "fire-hit")).join("")}</div>`;
      }
    }
    const N = EPB.data.config.fire_features;
    el.innerHTML = html + `<p class="muted" id="fire-note">Approximation, context-free: no model runs here. The text is
      split into the store's token strings greedily (longest match first); each token string lists, per dictionary,
      the ${esc(N)} features with the largest mean activation on it over the scanned store, and a feature scores the
      sum of those means over the pieces (0 where it is not among a piece's ${esc(N)}). In a real forward pass a
      token's activations depend on its context.</p>`;
  } catch (e) {
    el.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

// ----- one dictionary: its features, sortable and filterable ------------------------------------------------
const PAGE = 100;
function listView(main, aid) {
  const a = EPB.byId[aid];
  if (!a) { main.innerHTML = `<p class="error">No dictionary ${esc(aid)} in this site.</p>`; return; }
  const st = (EPB.lists[aid] ||= { sort: "k", desc: false, q: "", minRate: "", page: 0 });
  const extra = a.theta !== null ? ` · θ = ${fmt(a.theta)} (p = ${esc(a.p)})` : "";
  main.innerHTML = `<h2>${esc(a.name)} · ${esc(a.model)} layer ${esc(a.layer)}</h2>
    <p>K = ${esc(a.K)}${extra} · readout for contexts: ${esc(a.readout)} · built on ${fmt(a.cost.tokens, 4)} tokens in
    ${fmt(a.cost.seconds)} s · cards read ${esc(a.rows)} token rows of ${esc(a.contexts)} of the store's
    ${esc(a.store_contexts)} contexts</p>
    <div class="filters"><input id="list-filter" type="search" placeholder="filter: label text or #id">
    <label>firing rate ≥ <input id="list-min-rate" type="number" min="0" max="100" step="any" style="width:6em"> %</label>
    <button id="list-prev-page">‹ page</button><span id="list-page"></span><button id="list-next-page">page ›</button></div>
    <div id="list-table"></div>`;
  const f = document.getElementById("list-filter"), r = document.getElementById("list-min-rate");
  f.value = st.q; r.value = st.minRate;
  f.addEventListener("input", () => { st.q = f.value; st.page = 0; renderList(a, st); });
  r.addEventListener("input", () => { st.minRate = r.value; st.page = 0; renderList(a, st); });
  document.getElementById("list-prev-page").addEventListener("click", () => { st.page = Math.max(0, st.page - 1); renderList(a, st); });
  document.getElementById("list-next-page").addEventListener("click", () => { st.page += 1; renderList(a, st); });
  renderList(a, st);
}

function listOrder(a, st) {
  const q = st.q.trim().toLowerCase(), idm = q.match(/^#(\d+)$/), min = parseFloat(st.minRate);
  const keys = { k: (k) => k, rate: (k) => a.pos[k] / a.rows, max: (k) => a.max[k] ?? -Infinity,
    members: (k) => (a.members ? a.members[k] : 0) };
  let ks = [...Array(a.K).keys()];
  if (idm) ks = ks.filter((k) => k === +idm[1]);
  else if (q) ks = ks.filter((k) => label(a, k).toLowerCase().includes(q));
  if (isFinite(min)) ks = ks.filter((k) => (100 * a.pos[k]) / a.rows >= min);
  const key = keys[st.sort] || keys.k, sign = st.desc ? -1 : 1;
  return ks.sort((x, y) => sign * (key(x) - key(y)) || x - y);
}

function renderList(a, st) {
  const ks = listOrder(a, st);
  EPB.order[a.id] = ks;  // the cards' previous / next follow this order
  const pages = Math.max(1, Math.ceil(ks.length / PAGE));
  st.page = Math.min(st.page, pages - 1);
  const rows = ks.slice(st.page * PAGE, (st.page + 1) * PAGE).map((k) => `<tr class="feat" data-k="${k}">
    <td class="num"><a href="#/f/${encodeURIComponent(a.id)}/${k}">#${k}</a></td><td class="label">${esc(label(a, k))}</td>
    <td class="num">${pct(a.pos[k], a.rows)}</td><td class="num">${fmt(a.max[k])}</td>
    ${a.members ? `<td class="num">${esc(a.members[k])}</td>` : ""}</tr>`).join("");
  const cols = [["k", "feature"], ["", "label"], ["rate", "firing rate"], ["max", "max activation"]]
    .concat(a.members ? [["members", "EP members"]] : []);
  const head = cols.map(([key, name]) => key ? `<th class="num sort${st.sort === key ? " on" : ""}" data-sort="${key}">${name}${
    st.sort === key ? (st.desc ? " ▼" : " ▲") : ""}</th>` : `<th>${name}</th>`).join("");
  document.getElementById("list-page").textContent = ` ${st.page + 1} / ${pages} (${ks.length} features) `;
  const el = document.getElementById("list-table");
  el.innerHTML = `<table id="features"><tr>${head}</tr>${rows}</table>
    <p class="muted">Firing rate: share of the ${esc(a.rows)} scanned token rows where the feature is &gt; 0 (readout
    ${esc(a.readout)}). Click a column to sort; the cards' previous / next buttons follow this order.</p>`;
  el.querySelectorAll("th.sort").forEach((th) => th.addEventListener("click", () => {
    const key = th.dataset.sort;
    st.desc = st.sort === key ? !st.desc : key !== "k";
    st.sort = key; st.page = 0;
    renderList(a, st);
  }));
  el.querySelectorAll("tr.feat").forEach((tr) => tr.addEventListener("click", (e) => {
    if (e.target.tagName !== "A") location.hash = `#/f/${encodeURIComponent(a.id)}/${tr.dataset.k}`;
  }));
}

// ----- feature cards ----------------------------------------------------------------------------------------
async function getCard(aid, k) {
  const a = EPB.byId[aid];
  if (!a) throw new Error("no dictionary " + aid + " in this site");
  if (!(k >= 0 && k < a.K)) throw new Error(`${a.name} has features 0..${a.K - 1}, not ${k}`);
  const block = Math.floor(k / a.shard);
  await load(`data/f/${safe(aid)}/${block}.js`);
  const card = (await EPB.shards[aid + "/" + block])[k - block * a.shard];
  const examples = card.top.concat(card.neg, ...card.bands.map((b) => b[3]));
  const ids = examples.map((t) => t[0]).concat(card.ep ? card.ep.close.concat(card.ep.farth).map((m) => m[0]) : []);
  const blocks = unique(ids.map((c) => Math.floor(c / EPB.data.context_block)));
  await Promise.all(blocks.map((b) => load(`data/contexts/${safe(a.store)}/${b}.js`)));
  return [a, card];
}

async function cardsView(main, which) {
  main.innerHTML = `<p class="muted">Loading…</p>`;
  try {
    const cards = await Promise.all(which.map(([aid, k]) => getCard(aid, k)));
    main.innerHTML = (which.length > 1 ? `<p>Side by side: does the EP region read like its best SAE match?</p>` : "") +
      `<div class="cards">${cards.map(([a, c]) => renderCard(a, c)).join("")}</div>`;
  } catch (e) {
    main.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

// A window of tokens; with values (in units of 10**e) each token is shaded by value / the feature's maximum
// (orange) or value / its minimum (blue, negative) and its title is the value itself.
function tokens(a, ids, vals, e, peakAt, c) {
  const unit = Math.pow(10, e || 0);
  return ids.map((id, i) => {
    let style = "", title = "", lit = false;
    if (vals) {
      const v = vals[i] * unit;
      title = fmt(v);
      if (v > 0 && c.max > 0) { style = `background: rgba(255, 112, 67, ${Math.min(1, v / c.max).toFixed(2)})`; lit = true; }
      if (v < 0 && c.min < 0) { style = `background: rgba(66, 133, 244, ${Math.min(1, v / c.min).toFixed(2)})`; lit = true; }
    }
    const cls = "tok" + (i === peakAt ? " peak" : "") + (lit ? " lit" : "");
    return `<span class="${cls}"${style ? ` style="${style}"` : ""}${title ? ` title="${esc(title)}"` : ""}>${esc(show(tok(a.model, id)))}</span>`;
  }).join("");
}

function example(a, c, [cid, start, pos, val, vals], kind) {
  const ids = ((EPB.ctx[a.store] || {})[cid] || []).slice(start, start + vals.length);
  return `<div class="ctx ${kind}" data-cid="${esc(cid)}" data-pos="${esc(pos)}"><span class="val">${fmt(val)}</span>${
    tokens(a, ids, vals, c.e, pos - start, c)}</div>`;
}

function histogram(h) {
  const [lo, hi, counts, zeros, rows] = h;
  if (lo === null) return `<p class="muted">never non-zero on the ${esc(rows)} scanned tokens</p>`;
  const W = 320, H = 70, m = Math.max(...counts, 1), bw = W / counts.length;
  const bars = counts.map((c, i) => `<rect x="${i * bw + 1}" y="${H - (c / m) * H}" width="${bw - 2}" height="${(c / m) * H}"><title>${esc(c)}</title></rect>`).join("");
  const note = zeros ? `non-zero on ${pct(rows - zeros, rows)} of ${esc(rows)} scanned tokens (zeros not drawn)` :
    `all ${esc(rows)} scanned tokens`;
  return `<svg class="hist" width="${W}" height="${H + 14}">${bars}<text x="0" y="${H + 12}">${fmt(lo)}</text>
    <text x="${W}" y="${H + 12}" text-anchor="end">${fmt(hi)}</text></svg><div class="muted">${note}</div>`;
}

function logitTable(a, c) {
  if (!c.logit) return `<p class="muted logits-none">${esc(a.logits.note)}</p>`;
  const [up, down] = c.logit;
  const rows = [];
  for (let i = 0; i < Math.max(up.length, down.length); i++) {
    const cell = (x, cls) => x ? `<td class="tokcell ${cls}">${esc(show(x[1]))}</td><td class="num">${fmt(x[2])}</td>` : "<td></td><td></td>";
    rows.push(`<tr>${cell(up[i], "up")}${cell(down[i], "down")}</tr>`);
  }
  return `<table class="logits"><tr><th>promoted</th><th class="num">logit</th><th>suppressed</th><th class="num">logit</th></tr>
    ${rows.join("")}</table><div class="muted">${esc(a.logits.note)}</div>`;
}

function neighbours(a, k) {
  const ord = EPB.order[a.id], i = ord ? ord.indexOf(k) : -1;
  if (i >= 0) return [i > 0 ? ord[i - 1] : null, i < ord.length - 1 ? ord[i + 1] : null, true];
  return [k > 0 ? k - 1 : null, k < a.K - 1 ? k + 1 : null, false];
}

function renderCard(a, c) {
  const [prev, next, listed] = neighbours(a, c.k);
  const nav = (k, cls, text) => k === null ? `<span class="muted">${text}</span>` :
    `<a class="${cls}" href="#/f/${encodeURIComponent(a.id)}/${k}">${text}</a>`;
  const whence = a.contexts === a.store_contexts ? `all ${esc(a.contexts)} contexts of the store` :
    `the first ${esc(a.contexts)} of the store's ${esc(a.store_contexts)} contexts`;
  const top = c.top.map((x) => example(a, c, x, "top")).join("") || `<p class="muted">no scanned context activates it</p>`;
  const neg = c.neg.length ? `<h3>Most negative contexts</h3>${c.neg.map((x) => example(a, c, x, "neg")).join("")}` : "";
  const positive = c.bands.reduce((s, b) => s + b[2], 0);
  const bands = c.bands.map(([lo, hi, n, xs], b) => n ? `<div class="band"><div class="muted">band ${b + 1} of ${c.bands.length}: ${
    fmt(lo)} – ${fmt(hi)}, ${esc(n)} tokens (${pct(n, positive)} of its positive activations)</div>${
    xs.map((x) => example(a, c, x, "sample")).join("")}</div>` : "").join("");
  let ep = "";
  if (c.ep) {
    const { before, after } = EPB.data.config;
    const ctxs = EPB.ctx[a.store] || {};
    const mem = (xs) => xs.map(([cid, pos, d]) => {
      const from = Math.max(1, pos - before), ids = (ctxs[cid] || []).slice(from, pos + after + 1);
      return `<div class="member"><span class="dist">d = ${fmt(d)}</span>${tokens(a, ids, null, 0, pos - from, c)}</div>`;
    }).join("");
    ep = `<div class="stats"><span>members ${esc(c.ep.n)}</span><span>coherence ${fmt(c.ep.coh)}</span>
      <span>θ ${fmt(a.theta)}</span><span>distance ${fmt(c.ep.dmean)} ± ${fmt(c.ep.dstd)}</span></div>
      <h3>Closest members</h3>${mem(c.ep.close)}<h3>Farthest members</h3>${mem(c.ep.farth)}`;
  }
  const matches = c.match.map(([oi, k, f1]) => {
    const o = EPB.data.artefacts[oi], oid = o.id;
    const cmp = a.method === "ep" && o.method === "sae" ?
      ` <a class="cmp" href="#/cmp/${encodeURIComponent(a.id)}/${c.k}/${encodeURIComponent(oid)}/${k}">side by side</a>` : "";
    return `<tr><td>${esc(o.name)}</td><td><a class="match" href="#/f/${encodeURIComponent(oid)}/${encodeURIComponent(k)}">#${esc(k)} ${esc(label(o, k))}</a>${cmp}</td>
      <td class="num">${fmt(f1)}</td></tr>`;
  }).join("");
  const chance = EPB.data.chance_auroc;
  const picks = c.concepts.slice().sort((x, y) => (y[3] === true) - (x[3] === true));
  const concepts = picks.map(([set, name, auc, finding]) => finding === true ?
    `<tr class="finding"><td>${esc(set)}</td><td>${esc(name)}</td><td class="num">${fmt(auc)}</td></tr>` :
    `<tr class="at-chance" title="test AUROC below ${esc(chance)}: not a finding"><td>${esc(set)}</td><td>${esc(name)}</td>
     <td class="num">${fmt(auc)} · at chance</td></tr>`).join("");
  return `<div class="card" data-aid="${esc(a.id)}" data-k="${esc(c.k)}">
    <div class="nav">${nav(prev, "prev", "‹ previous")} · ${nav(next, "next", "next ›")}${listed ? ' <span class="muted">(list order)</span>' : ""}</div>
    <h2>${esc(a.name)} · ${esc(a.model)} L${esc(a.layer)} · #${esc(c.k)} <span class="muted">${esc(label(a, c.k))}</span></h2>
    <div class="stats"><span>fires on ${pct(a.pos[c.k], a.rows)} of tokens</span><span>max ${fmt(c.max)}</span><span>min ${fmt(c.min)}</span></div>
    ${ep}<h3>Top-activating contexts (${esc(a.readout)}; of ${whence})</h3>${top}${neg}
    <h3>Activation quantile bands (tokens drawn at random from each)</h3>${bands || `<p class="muted">never positive</p>`}
    <h3>Activation histogram</h3>${histogram(c.hist)}
    <h3>Logit effects (direct path through the unembedding)</h3>${logitTable(a, c)}
    <h3>Best match in other methods (top-set F1)</h3>${matches ? `<table class="matches"><tr><th>dictionary</th><th>feature</th><th class="num">F1</th></tr>${matches}</table>` : `<p class="muted">no overlapping feature</p>`}
    <h3>Concepts that select it (a finding needs test AUROC ≥ ${esc(chance)})</h3>${concepts ? `<table class="concepts"><tr><th>set</th><th>concept</th><th class="num">test AUROC</th></tr>${concepts}</table>` : `<p class="muted">none</p>`}
    </div>`;
}
