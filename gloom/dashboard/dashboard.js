// Gloom's dashboard: polls the daemon's JSON API once a second and draws
// what it says.  Everything is written with textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
const SLOW_POLL_EVERY = 5;  // connections and dead letters: every 5th poll
const TYPES_SHOWN = 100;    // the busiest types; the rest are counted
let tick = 0;
let actions = false;
let token = sessionStorage.getItem("gloom-token") || "";

function $(id) { return document.getElementById(id); }

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function button(label, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onclick);
  return b;
}

function showError(text) {
  const box = $("error");
  box.hidden = !text;
  box.textContent = text || "";
}

async function getJSON(path) {
  const response = await fetch(path, {headers: {"Accept": "application/json"}, cache: "no-store"});
  const body = await response.json();
  if (!response.ok) throw new Error(body.reason || body.error || response.statusText);
  return body;
}

async function post(path) {
  const headers = {"Accept": "application/json"};
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, {method: "POST", headers: headers});
  let body = {};
  try { body = await response.json(); } catch (e) { body = {}; }
  if (!response.ok) {
    if (response.status === 401) $("login").hidden = false;
    showError((body.error ? body.error + ": " : "") + (body.reason || response.statusText));
    return null;
  }
  showError("");
  poll();
  return body;
}

function seg(text) { return encodeURIComponent(text); }

function drawGraph(canvas, values, colour) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width, height = canvas.clientHeight || canvas.height;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const top = Math.max(1, ...values);
  g.fillStyle = "#6b7280";
  g.font = "11px system-ui, sans-serif";
  g.fillText(String(top), 4, 12);
  if (values.length < 2) return;
  g.strokeStyle = colour;
  g.lineWidth = 1.5;
  g.beginPath();
  const span = 900 - 1;  // the window: 15 minutes, one point a second, newest on the right
  values.forEach(function (value, index) {
    const x = width - (values.length - 1 - index) * width / span;
    const y = height - 4 - (value / top) * (height - 18);
    if (index === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  canvas.dataset.points = String(values.length);
  canvas.dataset.last = String(values[values.length - 1]);
}

function drawTotals(stats) {
  $("version").textContent = "version " + stats.version + ", up " + Math.round(stats.uptime) + " s";
  const state = $("state");
  state.textContent = stats.draining ? "draining" : "running";
  state.className = "badge" + (stats.draining ? " draining" : "");
  const totals = stats.totals;
  const cards = [
    ["masters", stats.masters], ["slaves", stats.slaves],
    ["submitted", totals.submitted], ["completed", totals.completed], ["failed", totals.failed],
    ["cancelled", totals.cancelled], ["retried", totals.retried], ["delayed", stats.delayed],
    ["detached live", stats.detached ? stats.detached.live : null],
    ["dead", stats.detached ? stats.detached.dead : null],
  ];
  const box = $("totals");
  box.replaceChildren();
  cards.forEach(function (pair) {
    const card = document.createElement("div");
    card.className = "card";
    card.id = "total-" + pair[0].replace(" ", "-");
    const value = document.createElement("b");
    value.textContent = pair[1] === null || pair[1] === undefined ? "–" : String(pair[1]);
    card.appendChild(value);
    card.appendChild(document.createTextNode(pair[0]));
    box.appendChild(card);
  });
}

function drawTypes(answer) {
  const body = $("types").tBodies[0];
  body.replaceChildren();
  Object.keys(answer.types).forEach(function (name) {
    const t = answer.types[name];
    const row = document.createElement("tr");
    row.dataset.type = name;
    if (t.paused) row.className = "paused";
    cell(row, name);
    cell(row, t.queued, "queued");
    cell(row, t.delayed);
    cell(row, t.running, "running");
    cell(row, t.idle_slaves);
    cell(row, t.busy_slaves);
    cell(row, t.answered_per_s);
    cell(row, t.failed_per_s);
    cell(row, t.p50_ms);
    cell(row, t.p99_ms);
    cell(row, t.paused ? "paused" : "", "state");
    const tools = cell(row, "", "admin");
    if (t.paused) tools.appendChild(button("Resume", function () { post("/api/types/" + seg(name) + "/resume"); }));
    else tools.appendChild(button("Pause", function () { post("/api/types/" + seg(name) + "/pause"); }));
    tools.appendChild(button("Clear", function () {
      if (confirm("End every queued and delayed job of " + name + "?")) post("/api/types/" + seg(name) + "/clear");
    }));
    body.appendChild(row);
  });
  $("types-omitted").textContent = answer.types_omitted ? "and " + answer.types_omitted + " more types" : "";
}

function drawConnections(answer) {
  const slaves = $("slaves").tBodies[0];
  slaves.replaceChildren();
  answer.slaves.forEach(function (s) {
    const row = document.createElement("tr");
    cell(row, s.peer); cell(row, s.tls); cell(row, s.type); cell(row, s.state);
    cell(row, s.job); cell(row, s.held_s === null || s.held_s === undefined ? null : s.held_s.toFixed(1) + " s");
    slaves.appendChild(row);
  });
  const masters = $("masters").tBodies[0];
  masters.replaceChildren();
  answer.masters.forEach(function (m) {
    const row = document.createElement("tr");
    cell(row, m.peer); cell(row, m.tls); cell(row, m.unfinished);
    masters.appendChild(row);
  });
}

function drawDead(answer) {
  $("dead-total").textContent = "(" + answer.total + ")";
  const body = $("dead").tBodies[0];
  body.replaceChildren();
  answer.dead.forEach(function (d) {
    const row = document.createElement("tr");
    cell(row, d.id); cell(row, d.type); cell(row, d.attempts); cell(row, d.reason, "text");
    cell(row, new Date(d.ended_at * 1000).toISOString().replace("T", " ").slice(0, 19));
    const tools = cell(row, "", "admin");
    tools.appendChild(button("Retry", function () { post("/api/dead/" + seg(d.id) + "/retry"); }));
    tools.appendChild(button("Discard", function () { post("/api/dead/" + seg(d.id) + "/discard"); }));
    body.appendChild(row);
  });
}

async function lookUp(id) {
  const box = $("job");
  box.replaceChildren();
  let status;
  try {
    status = await getJSON("/api/jobs/" + seg(id));
  } catch (e) {
    const p = document.createElement("p");
    p.textContent = "No job " + id + ": " + e.message;
    p.id = "job-state";
    box.appendChild(p);
    return;
  }
  const p = document.createElement("p");
  p.id = "job-state";
  p.textContent = id + ": " + status.state;
  box.appendChild(p);
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(status, null, 2);
  box.appendChild(pre);
  if (status.detached && ["queued", "delayed", "running"].indexOf(status.state) >= 0) {
    const b = button("Cancel", function () { post("/api/jobs/" + seg(id) + "/cancel").then(function () { lookUp(id); }); });
    b.className = "admin";
    box.appendChild(b);
  }
}

async function poll() {
  tick += 1;
  try {
    const [stats, types, series] = await Promise.all([
      getJSON("/api/totals"), getJSON("/api/types?limit=" + TYPES_SHOWN), getJSON("/api/series")]);
    drawTotals(stats);
    drawTypes(types);
    drawGraph($("graph-answered"), series.answered, "#16a34a");
    drawGraph($("graph-failed"), series.failed, "#dc2626");
    drawGraph($("graph-submitted"), series.submitted, "#2563eb");
    drawGraph($("graph-depth"), series.depth, "#b45309");
    if (tick % SLOW_POLL_EVERY === 1) {
      drawConnections(await getJSON("/api/connections"));
      drawDead(await getJSON("/api/dead?limit=100"));
    }
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.polls = String(tick);
  } catch (e) {
    showError("Cannot reach the daemon: " + e.message);
  }
}

async function start() {
  try {
    const index = await getJSON("/api/");
    actions = !!index.actions;
    $("readonly").hidden = actions;
    if (actions) {
      document.body.classList.add("admin");
      $("login").hidden = !index.needs_token || !!token;
    }
  } catch (e) {
    showError("Cannot reach the daemon: " + e.message);
  }
  $("login").addEventListener("submit", function (event) {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("gloom-token", token);
    $("login-state").textContent = token ? "token set for this tab" : "";
  });
  $("lookup").addEventListener("submit", function (event) {
    event.preventDefault();
    lookUp($("job-id").value.trim());
  });
  poll();
  setInterval(poll, POLL_MS);
}

start();
