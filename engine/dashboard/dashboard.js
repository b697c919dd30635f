/* dashboard.js — the tidemark dashboard.
 *
 * One multiplexed EventSource (/live?sub=all&sub=projection:NAME...) feeds
 * everything: the live tail, the per-category / per-type rate charts, the
 * streams table and projection status.  The tail starts from a backward
 * read of /all and the live connection resumes after its last position, so
 * nothing is missed or shown twice.  Rendering is batched (4 per second)
 * so a busy store does not freeze the page.
 */
(function () {
  "use strict";
  const TAIL_MAX = 200, WINDOW_S = 60;
  const $ = (id) => document.getElementById(id);
  const state = {
    lastPos: 0, received: 0, paused: false,
    pending: [],                  // events waiting to be rendered in the tail
    streams: new Map(),           // name -> {version, type}
    projections: new Map(),       // name -> {status, position, updated}
    secCat: new Map(),            // second -> Map(category -> n)
    secType: new Map(),           // second -> Map(type -> n)
    es: null,
  };

  const category = (s) => { const i = s.indexOf("-"); return i < 0 ? s : s.slice(0, i); };
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));

  function count(map, sec, key) {
    let m = map.get(sec);
    if (!m) { m = new Map(); map.set(sec, m); }
    m.set(key, (m.get(key) || 0) + 1);
  }

  function onEvent(e, live) {
    if (e.position <= state.lastPos && live) return;
    state.lastPos = Math.max(state.lastPos, e.position);
    state.streams.set(e.stream, {version: e.version, type: e.type});
    if (live) {
      state.received++;
      const sec = Math.floor(Date.now() / 1000);
      count(state.secCat, sec, category(e.stream));
      count(state.secType, sec, e.type);
    }
    e._live = live;
    state.pending.push(e);
    if (state.pending.length > TAIL_MAX * 4) state.pending.splice(0, state.pending.length - TAIL_MAX);
  }

  function matches(e) {
    const c = $("fcat").value.trim(), t = $("ftype").value.trim(), x = $("ftext").value.trim();
    if (c && category(e.stream) !== c) return false;
    if (t && e.type !== t) return false;
    if (x && JSON.stringify(e.data).indexOf(x) < 0) return false;
    return true;
  }

  function renderTail() {
    if (state.paused || !state.pending.length) return;
    const body = $("tail").tBodies[0];
    const rows = state.pending.filter(matches).slice(-TAIL_MAX).reverse().map((e) =>
      `<tr class="${e._live ? "live" : "history"}" data-position="${e.position}"><td>${e.position}</td>` +
      `<td>${new Date(e.time).toLocaleTimeString()}</td><td>${esc(e.stream)}</td><td>${esc(e.type)}</td>` +
      `<td class="data">${esc(JSON.stringify(e.data))}</td></tr>`).join("");
    state.pending = [];
    body.insertAdjacentHTML("afterbegin", rows);
    while (body.rows.length > TAIL_MAX) body.deleteRow(body.rows.length - 1);
  }

  function renderStreams() {
    const names = [...state.streams.keys()].sort().slice(0, 500);
    $("nstreams").textContent = `(${state.streams.size})`;
    $("streams").tBodies[0].innerHTML = names.map((n) => {
      const s = state.streams.get(n);
      return `<tr><td>${esc(n)}</td><td>${s.version}</td><td>${esc(s.type || "")}</td></tr>`;
    }).join("");
  }

  function renderProjections() {
    $("projections").tBodies[0].innerHTML = [...state.projections.entries()].map(([n, p]) =>
      `<tr><td>${esc(n)}</td><td class="status-${esc(p.status || "")}">${esc(p.status || "?")}</td>` +
      `<td>${p.position ?? ""}</td><td>${p.updated ? new Date(p.updated).toLocaleTimeString() : ""}</td></tr>`).join("");
  }

  /* ---- charts ---- */
  const palette = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00", "#b82e2e", "#316395"];
  let catChart = null, typeChart = null;
  function makeCharts() {
    if (typeof Chart === "undefined") return;
    catChart = new Chart($("catChart"), {type: "line", data: {labels: [], datasets: []},
      options: {animation: false, responsive: true, elements: {point: {radius: 0}},
        scales: {y: {beginAtZero: true, stacked: true}}, plugins: {legend: {position: "bottom"}}}});
    typeChart = new Chart($("typeChart"), {type: "bar", data: {labels: [], datasets: [{label: "events", data: [], backgroundColor: "#3366cc"}]},
      options: {animation: false, responsive: true, indexAxis: "y", plugins: {legend: {display: false}}}});
  }

  function renderCharts() {
    const now = Math.floor(Date.now() / 1000);
    for (const m of [state.secCat, state.secType])
      for (const k of m.keys()) if (k < now - WINDOW_S) m.delete(k);
    const secs = []; for (let s = now - WINDOW_S + 1; s <= now; s++) secs.push(s);
    const cats = new Set(); state.secCat.forEach((m) => m.forEach((_, k) => cats.add(k)));
    let rate = 0; const last = state.secCat.get(now - 1); if (last) last.forEach((v) => rate += v);
    $("rate").textContent = rate;
    if (!catChart) return;
    catChart.data.labels = secs.map((s) => `${s - now}s`);
    catChart.data.datasets = [...cats].sort().slice(0, 10).map((c, i) => ({
      label: c, fill: true, borderColor: palette[i % 10], backgroundColor: palette[i % 10] + "55",
      data: secs.map((s) => (state.secCat.get(s) || new Map()).get(c) || 0)}));
    catChart.update();
    const types = new Map(); state.secType.forEach((m) => m.forEach((v, k) => types.set(k, (types.get(k) || 0) + v)));
    const top = [...types.entries()].sort((a, b) => b[1] - a[1]).slice(0, 12);
    typeChart.data.labels = top.map((t) => t[0]);
    typeChart.data.datasets[0].data = top.map((t) => t[1]);
    typeChart.update();
  }

  /* ---- data ---- */
  async function getJSON(path) {
    const r = await fetch(path);
    return {status: r.status, body: await r.json().catch(() => null)};
  }

  async function loadProjections() {
    const r = await getJSON("/projections").catch(() => ({status: 0}));
    if (r.status !== 200 || !r.body) {
      $("projnote").textContent = r.status === 501 ? "Projections are not available in this server yet." : "No projections.";
      return [];
    }
    const list = Array.isArray(r.body) ? r.body : (r.body.projections || []);
    for (const p of list) state.projections.set(p.name, {status: p.status, position: p.position});
    $("projnote").textContent = list.length ? "" : "No projections loaded.";
    return list.map((p) => p.name);
  }

  function connect(projNames) {
    const subs = ["all", ...projNames.map((n) => "projection:" + n)];
    const url = "/live?" + subs.map((s) => "sub=" + encodeURIComponent(s)).join("&") +
      "&last_event_id=" + state.lastPos;
    const es = new EventSource(url);
    state.es = es;
    es.onopen = () => { $("conn").textContent = "live"; $("conn").className = "badge on"; };
    es.onerror = () => { $("conn").textContent = "reconnecting"; $("conn").className = "badge off"; };
    es.addEventListener("all", (m) => onEvent(JSON.parse(m.data), true));
    es.addEventListener("close", (m) => {
      $("conn").textContent = "closed: " + JSON.parse(m.data).reason; $("conn").className = "badge off";
    });
    for (const n of projNames) {
      es.addEventListener("projection:" + n, (m) => {
        const d = JSON.parse(m.data);
        const p = state.projections.get(n) || {};
        p.status = d.status || p.status || "running";
        p.position = d.position ?? p.position;
        p.updated = Date.now();
        state.projections.set(n, p);
      });
    }
  }

  async function start() {
    makeCharts();
    const [hist, streams] = await Promise.all([
      getJSON("/all?direction=backward&limit=50"), getJSON("/streams?limit=1000")]);
    if (streams.body && streams.body.streams)
      for (const s of streams.body.streams) state.streams.set(s.stream, {version: s.version, type: ""});
    if (hist.body && hist.body.events) {
      for (const e of hist.body.events.slice().reverse()) onEvent(e, false);
      state.lastPos = Math.max(state.lastPos, hist.body.last_position || 0);
    }
    renderTail(); renderStreams();
    connect(await loadProjections());
    setInterval(() => {
      renderTail();
      $("lastpos").textContent = state.lastPos;
      $("received").textContent = state.received;
    }, 250);
    setInterval(() => { renderCharts(); renderStreams(); renderProjections(); }, 1000);
  }

  $("pause").onclick = () => { state.paused = !state.paused; $("pause").textContent = state.paused ? "resume" : "pause"; };
  for (const id of ["fcat", "ftype", "ftext"]) $(id).oninput = () => { $("tail").tBodies[0].innerHTML = ""; };
  start();
})();
