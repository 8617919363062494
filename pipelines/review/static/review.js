// The review page: a keyboard-first grid over /api/items; decisions go to /api/decide (POST, CSRF header).
// Data is put into the page with textContent only: prompts and kept columns are anyone's text.
"use strict";
const CSRF = document.querySelector('meta[name=csrf]').content;
const PAGE = 48;
const state = {meta: null, rows: [], total: 0, offset: 0, sel: 0, undo: [], busy: false};
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.classList.add("on");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.remove("on"), 2500);
}

async function api(path, body) {
  const opts = body === undefined ? {credentials: "same-origin"} : {
    method: "POST", credentials: "same-origin", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-CSRF-Token": CSRF}};
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || r.status + " " + r.statusText);
  return data;
}

// ---------------------------------------------------------------- filters

function buildFilters() {
  const m = state.meta, f = $("filters");
  const field = (label, input) => f.append(el("label", {}, label, input));
  for (const c of ["model", ...m.kept]) {
    const values = m.facets[c];
    if (values) {
      const s = el("select", {name: c}, el("option", {value: ""}, "any"));
      for (const v of values) s.append(el("option", {value: v}, v));
      field(c, s);
    } else field(c, el("input", {name: c, placeholder: "exact value"}));
  }
  field("prompt contains", el("input", {name: "prompt", class: "wide"}));
  for (const flag of ["near_duplicate", "nsfw", "prompt_match"]) {
    field(flag, el("select", {name: flag}, el("option", {value: ""}, "any"), el("option", {value: "true"}, "yes"),
                   el("option", {value: "false"}, "no")));
  }
  field("decision", el("select", {name: "decision"}, el("option", {value: ""}, "any"),
                       el("option", {value: "none"}, "undecided"), el("option", {value: "approve"}, "approved"),
                       el("option", {value: "reject"}, "rejected")));
  const scores = m.scores.length ? m.scores : ["clip_score"];
  const score = el("select", {name: "score"});
  for (const s of scores) score.append(el("option", {value: s}, s));
  field("score", score);
  field("min", el("input", {name: "min_score", type: "number", step: "any"}));
  field("max", el("input", {name: "max_score", type: "number", step: "any"}));
  field("sort", el("select", {name: "sort"}, el("option", {value: "score_desc"}, "score, best first"),
                   el("option", {value: "score_asc"}, "score, worst first"), el("option", {value: "key"}, "model, id")));
  f.addEventListener("change", () => { state.offset = 0; state.sel = 0; load(); });
  f.addEventListener("submit", (e) => { e.preventDefault(); state.offset = 0; load(); });
  for (const s of scores) $("bulkscore").append(el("option", {value: s}, s));
  $("bulkper").textContent = m.product || "model";
}

function params() {
  const p = new URLSearchParams();
  for (const [k, v] of new FormData($("filters"))) if (v !== "") p.set(k, v);
  p.set("offset", state.offset);
  p.set("limit", PAGE);
  return p;
}

// ---------------------------------------------------------------- grid

function fmt(v) { return typeof v === "number" ? (Math.round(v * 10) / 10).toString() : String(v); }

function verdict(d) {
  if (!d) return el("div", {class: "verdict dim"}, "undecided");
  const when = new Date(d.time).toLocaleString();
  const what = d.decision === "approve" ? "\u2713 approved" : "\u2717 rejected" + (d.reason ? " (" + d.reason + ")" : "");
  return el("div", {class: "verdict", title: when}, what + " by " + d.reviewer);
}

function card(r, i) {
  const c = el("div", {class: "card", "data-index": i, "data-decision": r.decision ? r.decision.decision : "none",
                       "data-key": r.model + "/" + r.id + "/" + r.sample});
  const src = "/img/" + [r.model, r.id, r.sample].map(encodeURIComponent).join("/");
  c.append(el("img", {src, alt: r.prompt || "", loading: "lazy"}));
  c.append(el("div", {class: "prompt"}, r.prompt || ""));
  c.append(el("div", {class: "meta"}, r.model + " \u00b7 " + r.id + " #" + r.sample));
  const scores = state.meta.scores.filter((s) => r[s] !== null && r[s] !== undefined)
    .map((s) => s.replace("_score", "") + " " + fmt(r[s])).join(" \u00b7 ");
  if (scores) c.append(el("div", {class: "meta"}, scores));
  const badges = el("div");
  if (r.near_duplicate) badges.append(el("span", {class: "badge warn"}, "near-duplicate"));
  if (r.nsfw) badges.append(el("span", {class: "badge bad"}, "nsfw"));
  if (r.prompt_match === true) badges.append(el("span", {class: "badge ok"}, "match"));
  if (r.prompt_match === false) badges.append(el("span", {class: "badge"}, "no match"));
  for (const [k, v] of Object.entries(r.kept)) badges.append(el("span", {class: "badge"}, k + ": " + v));
  c.append(badges, verdict(r.decision));
  c.addEventListener("click", () => select(i));
  return c;
}

function render() {
  const g = $("grid");
  g.replaceChildren(...state.rows.map(card));
  const end = Math.min(state.offset + state.rows.length, state.total);
  $("range").textContent = state.total ? (state.offset + 1) + "\u2013" + end + " of " + state.total : "no images match";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = end >= state.total;
  select(Math.min(state.sel, Math.max(0, state.rows.length - 1)));
  document.body.dataset.loaded = String(Date.now());
}

async function load() {
  try {
    const d = await api("/api/items?" + params());
    state.rows = d.rows;
    state.total = d.total;
    render();
  } catch (e) { toast("could not load: " + e.message); }
}

function select(i) {
  state.sel = i;
  for (const c of document.querySelectorAll(".card.sel")) c.classList.remove("sel");
  const c = $("grid").children[i];
  if (c) { c.classList.add("sel"); c.scrollIntoView({block: "nearest"}); }
}

function columns() {
  const cards = $("grid").children;
  if (!cards.length) return 1;
  const top = cards[0].offsetTop;
  let n = 0;
  while (n < cards.length && cards[n].offsetTop === top) n++;
  return Math.max(1, n);
}

async function move(delta) {
  const i = state.sel + delta;
  if (i >= 0 && i < state.rows.length) return select(i);
  if (i >= state.rows.length && state.offset + state.rows.length < state.total) {
    state.offset += PAGE; state.sel = 0; await load();
  } else if (i < 0 && state.offset > 0) {
    state.offset = Math.max(0, state.offset - PAGE); state.sel = PAGE - 1; await load();
  }
}

async function page(delta) {
  const o = state.offset + delta * PAGE;
  if (o < 0 || o >= state.total) return;
  state.offset = o; state.sel = 0; await load();
}

// ---------------------------------------------------------------- decisions

async function decide(row, decision, reason, remember = true) {
  const prev = row.decision;
  await api("/api/decide", {items: [{model: row.model, id: row.id, sample: row.sample}], decision, reason});
  if (remember) state.undo.push({row, prev});
  row.decision = decision === "clear" ? null : {decision, reason: reason || null, reviewer: state.meta.reviewer,
                                               time: new Date().toISOString()};
  const i = state.rows.indexOf(row);
  if (i >= 0) $("grid").children[i].replaceWith(card(row, i));
  select(state.sel);
}

async function act(decision, reason) {
  const row = state.rows[state.sel];
  if (!row || state.busy) return;
  state.busy = true;
  try {
    await decide(row, decision, reason);
    toast(decision + "d " + row.id + " #" + row.sample);
    await move(1);
  } catch (e) { toast("not saved: " + e.message); } finally { state.busy = false; }
}

async function undo() {
  const last = state.undo.pop();
  if (!last) return toast("nothing to undo");
  try {
    await decide(last.row, last.prev ? last.prev.decision : "clear", last.prev ? last.prev.reason : null, false);
    const i = state.rows.indexOf(last.row);
    if (i >= 0) select(i);
    toast("undone: " + last.row.id + " #" + last.row.sample);
  } catch (e) { state.undo.push(last); toast("not undone: " + e.message); }
}

function openReason() {
  if (!state.rows[state.sel]) return;
  $("reason").hidden = false;
  $("reasontext").value = "";
  $("reasontext").focus();
}

function closeModals() { $("reason").hidden = true; $("help").hidden = true; }

async function bulk() {
  const n = parseInt($("bulkn").value, 10);
  try {
    const d = await api("/api/bulk", {n, score: $("bulkscore").value});
    toast("approved " + d.written + " images");
    await load();
  } catch (e) { toast("bulk approve failed: " + e.message); }
}

// ---------------------------------------------------------------- keys

document.addEventListener("keydown", async (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (!$("reason").hidden) {
    if (e.key === "Escape") { closeModals(); return; }
    const typed = $("reasontext").value.trim();
    if (e.key === "Enter" && typed) { e.preventDefault(); closeModals(); return act("reject", typed); }
    if (/^[1-9]$/.test(e.key) && !typed) {
      const r = state.meta.reasons[parseInt(e.key, 10) - 1];
      if (r) { e.preventDefault(); closeModals(); return act("reject", r); }
    }
    return;
  }
  if (e.key === "Escape") return closeModals();
  const t = e.target.tagName;
  if (t === "INPUT" || t === "SELECT" || t === "TEXTAREA") return;
  const keys = {
    a: () => act("approve", null), r: openReason, u: undo, "?": () => { $("help").hidden = !$("help").hidden; },
    j: () => move(1), k: () => move(-1), ArrowRight: () => move(1), ArrowLeft: () => move(-1),
    ArrowDown: () => move(columns()), ArrowUp: () => move(-columns()), n: () => page(1), p: () => page(-1),
  };
  if (keys[e.key]) { e.preventDefault(); await keys[e.key](); }
});

async function start() {
  state.meta = await api("/api/meta");
  $("run").textContent = state.meta.run + " \u00b7 " + state.meta.rows + " images";
  $("who").textContent = "reviewing as " + state.meta.reviewer;
  const ol = $("reasons");
  for (const r of state.meta.reasons) ol.append(el("li", {}, r));
  buildFilters();
  $("prev").addEventListener("click", () => page(-1));
  $("next").addEventListener("click", () => page(1));
  $("helpbtn").addEventListener("click", () => { $("help").hidden = false; });
  $("bulkgo").addEventListener("click", bulk);
  await load();
}
start();
