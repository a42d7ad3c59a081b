// epbench feature browser: plain JS, no network. Data files are scripts calling EPB.* (file:// forbids fetch);
// the index and vocabularies load with the page, a block of feature cards only when one of its cards opens.
"use strict";
const EPB = (window.EPB = { data: null, byId: {}, shards: {}, vocabs: {}, ctx: {}, pending: {} });

EPB.index = (d) => { EPB.data = d; d.artefacts.forEach((a) => { EPB.byId[a.id] = a; }); start(); };
EPB.shard = (aid, block, packed) => { EPB.shards[aid + "/" + block] = inflate(packed); };
EPB.vocab = (model, map) => { EPB.vocabs[model] = map; };
EPB.contexts = (store, block, map) => { Object.assign(EPB.ctx[store] ||= {}, map); };

// Card blocks are gzipped JSON in base64: decoded by the browser's own DecompressionStream (no fetch involved).
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
function show(s) { return s.replace(/\n/g, "⏎").replace(/\t/g, "⇥"); }
function tok(model, id) { const v = EPB.vocabs[model]; return v && id in v ? v[id] : "#" + id; }
function fmt(v, d = 3) {  // numbers only: anything else from a data file shows as a dash, never as markup
  if (v === null || v === undefined || typeof v !== "number" || !isFinite(v)) return "—";
  if (Math.abs(v) >= 1e5) return v.toExponential(2);
  return v.toPrecision(d).replace(/\.?0+$/, "");
}
function label(a, k) { const t = a.labels[k]; return t >= 0 ? show(tok(a.model, t)) : ""; }
function unique(xs) { return [...new Set(xs)]; }

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

// ----- index: dictionaries, filters, search -------------------------------------------------------------
const state = { model: "", layer: "", method: "", q: "" };

function indexView(main) {
  const arts = EPB.data.artefacts;
  const opts = (key) => unique(arts.map((a) => String(a[key]))).map((v) => `<option>${esc(v)}</option>`).join("");
  main.innerHTML = `<div class="filters">
    <label>model <select id="f-model"><option value="">all</option>${opts("model")}</select></label>
    <label>layer <select id="f-layer"><option value="">all</option>${opts("layer")}</select></label>
    <label>method <select id="f-method"><option value="">all</option>${opts("method")}</select></label>
    <input id="search" type="search" placeholder="search: a token, a concept (e.g. noun.animal), or #feature id">
    </div><div id="results"></div><div id="table"></div>`;
  for (const key of ["model", "layer", "method"]) {
    const el = document.getElementById("f-" + key);
    el.value = state[key];
    el.addEventListener("change", () => { state[key] = el.value; renderIndex(); });
  }
  const box = document.getElementById("search");
  box.value = state.q;
  box.addEventListener("input", () => { state.q = box.value; renderIndex(); });
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
}

function search(arts, q) {
  q = q.trim();
  if (!q) return [];
  const out = [];
  const idm = q.match(/^#?(\d+)$/);
  const lq = q.toLowerCase();
  for (const a of arts) {
    if (idm) { if (+idm[1] < a.K) out.push([a, +idm[1], "feature id"]); continue; }
    for (const [c, k] of Object.entries(a.concepts)) if (c.toLowerCase().includes(lq)) out.push([a, k, c]);
    const v = EPB.vocabs[a.model] || {};
    for (let k = 0; k < a.K && out.length < 2000; k++) {
      const t = a.labels[k];
      if (t >= 0 && (v[t] || "").trim().toLowerCase() === lq) out.push([a, k, "token"]);
    }
  }
  return out;
}

function renderResults(arts) {
  const el = document.getElementById("results");
  const hits = search(arts, state.q);
  if (!state.q.trim()) { el.innerHTML = ""; return; }
  el.innerHTML = `<div class="muted">${hits.length} feature(s) match “${esc(state.q)}”${hits.length > 300 ? " (first 300)" : ""}</div>` +
    hits.slice(0, 300).map(([a, k, why]) => `<a class="result" href="#/f/${encodeURIComponent(a.id)}/${k}">
      ${esc(a.name)} L${esc(a.layer)} #${esc(k)} <b>${esc(label(a, k))}</b> <span class="muted">${esc(why)}</span></a>`).join("");
}

// ----- one dictionary: its features ------------------------------------------------------------------------
function listView(main, aid) {
  const a = EPB.byId[aid];
  if (!a) { main.innerHTML = `<p class="error">No dictionary ${esc(aid)} in this site.</p>`; return; }
  const chips = a.labels.map((t, k) => `<a href="#/f/${encodeURIComponent(aid)}/${k}">#${esc(k)} ${esc(label(a, k))}</a>`);
  const extra = a.theta !== null ? ` · θ = ${fmt(a.theta)} (p = ${esc(a.p)})` : "";
  main.innerHTML = `<h2>${esc(a.name)} · ${esc(a.model)} layer ${esc(a.layer)}</h2>
    <p>K = ${esc(a.K)}${extra} · readout for contexts: ${esc(a.readout)} · built on ${fmt(a.cost.tokens, 4)} tokens in
    ${fmt(a.cost.seconds)} s</p><div class="chips">${chips.join("")}</div>`;
}

// ----- feature cards ----------------------------------------------------------------------------------------
async function getCard(aid, k) {
  const a = EPB.byId[aid];
  if (!a) throw new Error("no dictionary " + aid + " in this site");
  if (!(k >= 0 && k < a.K)) throw new Error(`${a.name} has features 0..${a.K - 1}, not ${k}`);
  const block = Math.floor(k / a.shard);
  await load(`data/f/${safe(aid)}/${block}.js`);
  const card = (await EPB.shards[aid + "/" + block])[k - block * a.shard];
  const ids = card.top.map((t) => t[0]).concat(card.ep ? card.ep.close.concat(card.ep.farth).map((m) => m[0]) : []);
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

function tokens(a, ids, shade, peakAt) {
  return ids.map((id, i) => {
    const level = shade ? +shade[i] / 9 : 0;
    const bg = level > 0 ? ` style="background: rgba(255, 112, 67, ${level.toFixed(2)})"` : "";
    const cls = "tok" + (i === peakAt ? " peak" : "") + (level > 0 ? " lit" : "");
    return `<span class="${cls}"${bg} title="${shade ? "≈ " + Math.round(level * 100) + "% of the feature's max" : ""}">${esc(show(tok(a.model, id)))}</span>`;
  }).join("");
}

function histogram(h) {
  const [lo, hi, counts, zeros, rows] = h;
  if (lo === null) return `<p class="muted">never non-zero on the ${esc(rows)} sampled tokens</p>`;
  const W = 320, H = 70, m = Math.max(...counts, 1), bw = W / counts.length;
  const bars = counts.map((c, i) => `<rect x="${i * bw + 1}" y="${H - (c / m) * H}" width="${bw - 2}" height="${(c / m) * H}"><title>${esc(c)}</title></rect>`).join("");
  const note = zeros ? `fires on ${fmt((100 * (rows - zeros)) / rows)}% of ${esc(rows)} sampled tokens (zeros not drawn)` :
    `all ${esc(rows)} sampled tokens`;
  return `<svg class="hist" width="${W}" height="${H + 14}">${bars}<text x="0" y="${H + 12}">${fmt(lo)}</text>
    <text x="${W}" y="${H + 12}" text-anchor="end">${fmt(hi)}</text></svg><div class="muted">${note}</div>`;
}

function renderCard(a, c) {
  const ctxs = EPB.ctx[a.store] || {};
  const top = c.top.map(([cid, start, peak, val, digits]) => {
    const ids = (ctxs[cid] || []).slice(start, start + digits.length);
    return `<div class="ctx"><span class="val">${fmt(val)}</span>${tokens(a, ids, digits, peak - start)}</div>`;
  }).join("") || `<p class="muted">no sampled context activates it</p>`;
  let ep = "";
  if (c.ep) {
    const { before, after } = EPB.data.config;
    const mem = (xs) => xs.map(([cid, pos, d]) => {
      const from = Math.max(1, pos - before), ids = (ctxs[cid] || []).slice(from, pos + after + 1);
      return `<div class="member"><span class="dist">d = ${fmt(d)}</span>${tokens(a, ids, null, pos - from)}</div>`;
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
  const concepts = c.concepts.map(([set, name, auc]) => `<tr><td>${esc(set)}</td><td>${esc(name)}</td><td class="num">${fmt(auc)}</td></tr>`).join("");
  return `<div class="card" data-aid="${esc(a.id)}" data-k="${esc(c.k)}">
    <h2>${esc(a.name)} · ${esc(a.model)} L${esc(a.layer)} · #${esc(c.k)} <span class="muted">${esc(label(a, c.k))}</span></h2>
    ${ep}<h3>Top-activating contexts (${esc(a.readout)})</h3>${top}
    <h3>Activation histogram</h3>${histogram(c.hist)}
    <h3>Best match in other methods (top-set F1)</h3>${matches ? `<table class="matches"><tr><th>dictionary</th><th>feature</th><th class="num">F1</th></tr>${matches}</table>` : `<p class="muted">no overlapping feature</p>`}
    <h3>Concepts that select it</h3>${concepts ? `<table class="concepts"><tr><th>set</th><th>concept</th><th class="num">test AUROC</th></tr>${concepts}</table>` : `<p class="muted">none</p>`}
    </div>`;
}
