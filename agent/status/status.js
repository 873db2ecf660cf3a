// Lantern status page: polls the gateway's own API, draws everything itself (no libraries,
// no CDN: the cabinet may have no internet). Readings are fetched incrementally per node
// (?since= the last sample time seen), so a refresh costs only what is new.
"use strict";

const REFRESH_MS = 2000;
const DIAGNOSTIC = ["uptime", "heap_free", "heap_peak", "cycle_ms", "outbox"];
const state = {
  window: 900,
  nodes: new Map(),  // id → {series: Map(name → [{t, v}]), unit: Map, text: Map, since, gaps, open, interval}
  refreshes: 0,
};

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) sessionStorage.setItem("lantern-token", decodeURIComponent(m[1]));
  return sessionStorage.getItem("lantern-token");
}

async function get(path, optional) {
  const headers = {};
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const r = await fetch(path, {headers, cache: "no-store"});
  if (r.status === 401) throw new Error("this gateway wants a token: open this page as …/#token=YOUR_TOKEN");
  if (optional && (r.status === 404 || r.status === 503)) return null;  // a gateway without it
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function ago(s) {
  if (s == null) return "never";
  if (s < 1) return "just now";
  if (s < 90) return s.toFixed(0) + " s ago";
  if (s < 5400) return (s / 60).toFixed(0) + " min ago";
  if (s < 172800) return (s / 3600).toFixed(1) + " h ago";
  return (s / 86400).toFixed(0) + " d ago";
}

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}

// A value read at its scale: enough significant digits for a small one (an interval's
// energy is a few mJ: "0.00 J" said nothing), and SI prefixes for the units that take them.
const PREFIXED = new Set(["J", "W", "Wh", "A", "V", "g"]);

function fmt(v) {
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  if (Number.isInteger(v)) return String(v);
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  if (a >= 1e-4) return String(Number(v.toPrecision(2)));  // 0.0012, 0.05: never "0.00"
  return v.toExponential(1);
}

function quantity(v, unit) {
  if (!unit) return fmt(v);
  if (typeof v !== "number" || v === 0 || !PREFIXED.has(unit)) return fmt(v) + " " + unit;
  const a = Math.abs(v);
  // kilo and mega from 10,000 on (four digits read well as they are); milli and micro below 1
  const [scale, prefix] = a >= 1e7 ? [1e6, "M"] : a >= 1e4 ? [1e3, "k"] : a >= 1 ? [1, ""]
    : a >= 1e-3 ? [1e-3, "m"] : [1e-6, "µ"];
  return fmt(v / scale) + " " + prefix + unit;
}

function dl(target, rows) {
  const d = document.getElementById(target);
  d.replaceChildren();
  for (const [label, value, cls, field] of rows) {
    d.append(el("dt", {text: label}), el("dd", {text: value, class: cls || "", "data-field": field || ""}));
  }
}

function renderHealth(st) {
  document.getElementById("summary").textContent = st.summary;
  document.getElementById("version").textContent = `version ${st.version}`;
  const q = st.queue;
  const age = q.oldest_age_s;
  dl("queue", [
    ["waiting", String(q.readings), q.readings > 0 && age > 60 ? "warn" : "", "readings"],
    ["bytes", bytes(q.bytes), "", "bytes"],
    ["oldest", age == null ? "—" : ago(age).replace(" ago", ""), age > 300 ? "bad" : age > 60 ? "warn" : "ok", "oldest"],
    ["on disk", bytes(q.store_file_bytes) + (q.cap_bytes ? " of " + bytes(q.cap_bytes) : ""), "", "disk"],
    ["evicted", String(q.evictions), q.evictions ? "bad" : "", "evictions"],
    ["intake", q.paused ? "PAUSED (queue at its cap)" : "open", q.paused ? "bad" : "ok", "intake"],
    ["dead letters", String(q.dead_letters), q.dead_letters ? "warn" : "", "dead-letters"],
  ]);
  const up = [];
  for (const [sink, s] of Object.entries(st.upstream)) {
    up.push([sink, s.state, s.state === "ok" ? "ok" : s.state === "failing" ? "bad" : "", "sink-" + sink]);
    for (const outcome of ["ok", "error"]) {
      const l = st.upstream_latency[sink + ":" + outcome];
      if (l && l.count) up.push([outcome === "ok" ? "mean latency" : "failed attempts",
        outcome === "ok" ? (1000 * l.sum_s / l.count).toFixed(0) + " ms" : String(l.count),
        outcome === "ok" ? "" : "warn", "latency-" + sink + "-" + outcome]);
    }
  }
  up.push(["delivered", String(st.counters.readings_delivered), "", "delivered"]);
  dl("upstream", up);
  const links = st.links.map((l) => [l.name, (l.up ? "up" : "DOWN") + " · " + bytes(l.bytes_in) + " in",
    l.up ? "ok" : "bad", "link"]);
  if (st.clock) {  // docs/time.md: an unsynchronised gateway gives nodes no time
    links.push(["gateway clock", st.clock.synchronized ? "synchronised (" + st.clock.source + ")"
      : "NOT synchronised: nodes get no time", st.clock.synchronized ? "ok" : "bad", "clock"]);
  }
  dl("links", links);
  const c = st.counters;
  const received = Object.values(c.frames_received).reduce((a, b) => a + b, 0);
  const rejected = Object.entries(c.frames_rejected);
  const rows = [["received", String(received), "", "received"]];
  rows.push(["rejected", String(rejected.reduce((a, [, n]) => a + n, 0)), rejected.length ? "warn" : "", "rejected"]);
  for (const [why, n] of rejected) rows.push(["  " + why, String(n), "warn", "rejected-" + why]);
  rows.push(["duplicates", String(Object.values(c.duplicates).reduce((a, b) => a + b, 0)), "", "duplicates"]);
  dl("frames", rows);
}

function nodeState(id) {
  if (!state.nodes.has(id)) {
    state.nodes.set(id, {series: new Map(), unit: new Map(), text: new Map(), since: null,
      gaps: new Map(), open: null, interval: null});
  }
  return state.nodes.get(id);
}

function flagsOf(n, ns) {
  const out = [...n.flags];
  if (ns.gaps.size || ns.open) out.push("gap");
  return out;
}

function flagClass(f) {
  if (f === "never seen") return "flag never";
  if (f.includes(": ")) return "flag quality";  // a sensor's quality bits or status
  return "flag " + f.split(/[ :]/)[0];
}

function configText(n) {
  const v = `v${n.config_version || 0}`;
  if (!n.group) return v;
  return `${n.group} ${v}` + (n.config_refused ? " refused" : n.config_drift ? ` → v${n.config_want}` : "");
}

function renderNodes(data) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren();
  for (const n of data.nodes) {
    const ns = nodeState(n.id);
    const flags = flagsOf(n, ns);
    const bat = n.battery ? quantity(n.battery.v, n.battery.u) : "—";
    const tr = el("tr", {"data-node": n.id, "data-flagged": flags.length ? "1" : "0"},
      el("td", {text: n.id, "data-field": "id"}),
      el("td", {text: n.pole || "—", "data-field": "pole"}),
      el("td", {"data-field": "state"}, el("span", {class: "state " + (n.state || "unknown"), text: n.state || "—"})),
      el("td", {text: n.key_id ? `v${n.key_version} ${n.key_id.slice(0, 8)}` : "—", "data-field": "key",
        title: n.key_id ? `key id ${n.key_id} (key ${n.key_version} of this node; its own key version ${n.key_rotation || 0}` +
          (n.rekey && n.rekey !== "done" ? `; rotation: ${n.rekey}` : "") + ")" : "no key in the registry"}),
      el("td", {text: configText(n), "data-field": "config", class: n.config_drift ? "drift" : "",
        title: n.config_refused ? `refused: ${n.config_refused}` :
          n.config_drift ? `group ${n.group} is on config v${n.config_want}` : "config version the node reports"}),
      el("td", {text: n.firmware || "?", "data-field": "firmware"}),
      el("td", {text: ago(n.age_s), "data-field": "last-seen", "data-age": n.age_s == null ? "" : String(n.age_s),
        title: n.last_seen ? new Date(n.last_seen * 1000).toLocaleString() : "never"}),
      el("td", {text: n.link || "—", "data-field": "link"}),
      el("td", {text: bat, class: "num", "data-field": "battery"}),
      el("td", {text: n.outbox == null ? "—" : String(n.outbox), class: "num", "data-field": "outbox"}),
      el("td", {text: String(n.frames_received), class: "num", "data-field": "frames"}),
      el("td", {"data-field": "flags"}, ...(flags.length ? flags.map((f) => el("span", {class: flagClass(f), text: f}))
        : [el("span", {class: "flag none", text: "ok"})])));
    body.append(tr);
  }
}

const ROLLOUT_CLASS = {updated: "ok", rolled_back: "bad", refused: "bad", unreachable: "warn",
  transferring: "busy", applied: "busy", pending: ""};

function renderRollout(data) {
  const box = document.getElementById("rollout");
  const ro = data && data.rollout;
  box.hidden = !ro;
  if (!ro) return;
  const st = document.getElementById("rollout-state");
  st.textContent = ro.state + (ro.state === "running" ? " · " + (ro.phase === "canary" ? "canary"
    : `step ${ro.step_now} of ${ro.steps - 1}`) : "");
  st.dataset.state = ro.state;
  const counts = Object.entries(ro.counts).filter(([, n]) => n).map(([s, n]) => `${n} ${s.replace("_", " ")}`);
  document.getElementById("rollout-summary").textContent =
    `release ${ro.version} (bundle ${ro.id}, security floor ${ro.floor}): ${counts.join(", ")}`;
  const why = document.getElementById("rollout-reason");
  why.hidden = !ro.reason;
  why.textContent = !ro.reason ? "" : ro.reason.startsWith("halted") ? ro.reason : "halted: " + ro.reason;
  const body = document.querySelector("#rollout-nodes tbody");
  body.replaceChildren();
  for (const p of ro.nodes) {
    body.append(el("tr", {"data-node": p.node, "data-state": p.state},
      el("td", {text: p.node, "data-field": "node"}),
      el("td", {text: ro.canary.includes(p.node) ? "canary" : "", "data-field": "role"}),
      el("td", {text: p.state.replace("_", " "), class: ROLLOUT_CLASS[p.state] || "", "data-field": "state"}),
      el("td", {text: p.version || "—", "data-field": "version"}),
      el("td", {text: p.detail || p.reason || "", "data-field": "why"})));
  }
  for (const [node, why] of Object.entries(ro.skipped || {})) {
    body.append(el("tr", {"data-node": node, "data-state": "skipped"}, el("td", {text: node}),
      el("td", {}), el("td", {text: "skipped", class: "muted"}), el("td", {text: "—"}), el("td", {text: why})));
  }
}

// ---------------------------------------------------------------- the street (/api/health)

function energy(kwh) {
  return Math.abs(kwh) >= 1 ? fmt(kwh) + " kWh" : quantity(kwh * 1000, "Wh");
}

function mass(kg) {
  return Math.abs(kg) >= 1 ? fmt(kg) + " kg" : quantity(kg * 1000, "g");
}

function hours(h) {
  return h >= 1 ? fmt(h) + " h" : h * 60 >= 1 ? fmt(h * 60) + " min" : fmt(h * 3600) + " s";
}

function healthOf(n) {
  if (n.alerts.some((a) => a.severity === "critical")) return "critical";
  if (n.alerts.length) return "warning";
  return n.lamp ? "ok" : "none";
}

function placeOf(nodes, W, H) {
  // Each pole where it stands: an equirectangular projection, one scale for both axes (the
  // street keeps its shape); poles without coordinates in a row along the bottom.
  const P = 60;
  const located = nodes.filter((n) => n.lat != null && n.lon != null);
  const others = nodes.filter((n) => n.lat == null || n.lon == null);
  const h = others.length ? H - 60 : H;
  const pos = new Map();
  if (located.length) {
    const k = Math.cos((located.reduce((a, n) => a + n.lat, 0) / located.length) * Math.PI / 180);
    const xs = located.map((n) => n.lon * k), ys = located.map((n) => n.lat);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const scale = Math.min((W - 2 * P) / Math.max(x1 - x0, 1e-9), (h - 2 * P) / Math.max(y1 - y0, 1e-9));
    for (const n of located) {
      pos.set(n.id, [W / 2 + (n.lon * k - (x0 + x1) / 2) * scale, h / 2 - (n.lat - (y0 + y1) / 2) * scale]);
    }
  }
  const step = Math.min(90, (W - 2 * P) / Math.max(others.length - 1, 1));
  others.forEach((n, i) => pos.set(n.id, [P + i * step, H - 34]));
  return [pos, located.length, others.length];
}

function renderStreet(data) {
  const box = document.getElementById("street");
  box.hidden = !data || !data.configured;
  if (box.hidden) return;
  const W = 640, H = 320;
  const map = document.getElementById("street-map");
  map.replaceChildren();
  const [pos, located, others] = placeOf(data.nodes, W, H);
  const along = data.nodes.filter((n) => n.lat != null && n.lon != null).map((n) => pos.get(n.id));
  if (along.length > 1) map.append(svg("polyline", {class: "road", points: along.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ")}));
  if (others) {
    const note = svg("text", {class: "note", x: 8, y: H - 64});
    note.textContent = located ? "no location in [nodes]:" : "no node has a location in [nodes] (location = [lat, lon]):";
    map.append(note);
  }
  for (const n of data.nodes) {
    const [x, y] = pos.get(n.id);
    const lamp = n.lamp;
    const g = svg("g", {class: "pole", "data-node": n.id, "data-state": lamp ? lamp.state : "unknown",
      "data-health": healthOf(n), "data-alerts": n.alerts.map((a) => a.alert).join(" "),
      transform: `translate(${x.toFixed(1)},${y.toFixed(1)})`});
    const title = svg("title");
    title.textContent = `${n.id}${n.pole ? " (pole " + n.pole + ")" : ""}: lamp ${lamp ? lamp.state : "—"}`
      + (lamp && lamp.power_w != null ? `, ${quantity(lamp.power_w, "W")} of ${quantity(lamp.rating_w, "W")}` : "")
      + (n.alerts.length ? "; " + n.alerts.map((a) => a.alert).join(", ") : "");
    g.append(title, svg("circle", {class: "lamp", r: 11}));
    const label = svg("text", {y: -18});
    label.textContent = n.pole ? "pole " + n.pole : n.id;
    const today = svg("text", {class: "kwh", y: 28, "data-field": "today"});
    today.textContent = lamp ? energy(lamp.today_kwh) + " today" : "";
    g.append(label, today);
    map.append(g);
  }
  const list = document.getElementById("street-alerts");
  list.replaceChildren();
  for (const n of data.nodes) {
    for (const a of n.alerts) {
      list.append(el("li", {class: a.severity, "data-node": n.id, "data-alert": a.alert},
        el("strong", {text: `${n.id} ${a.alert}`}), a.measurement ? ` (${a.measurement})` : "",
        ` since ${new Date(a.since * 1000).toLocaleTimeString()}`, el("br"),
        el("span", {class: "muted small", text: a.summary})));
    }
  }
  if (!list.children.length) list.append(el("li", {class: "ok", text: "none"}));
  const t = data.totals;
  document.getElementById("street-totals").textContent = `today ${energy(t.today_kwh)} · measured `
    + `${energy(t.kwh)}, ${mass(t.co2e_kg)} CO2e at ${fmt(data.grid_g_per_kwh)} g/kWh · day-burn ${energy(t.dayburn_kwh)}`;
  const body = document.querySelector("#lamps tbody");
  body.replaceChildren();
  for (const n of data.nodes) {
    const l = n.lamp;
    const cell = (text, field, cls) => el("td", {text, "data-field": field, class: cls || ""});
    body.append(el("tr", {"data-node": n.id, "data-health": healthOf(n)},
      cell(n.id, "id"), cell(n.pole || "—", "pole"), cell(l ? l.state : "—", "state"),
      cell(l && l.power_w != null ? `${quantity(l.power_w, "W")} of ${quantity(l.rating_w, "W")}` : "—", "power", "num"),
      cell(l ? energy(l.today_kwh) : "—", "today", "num"),
      cell(l ? energy(l.kwh) : "—", "kwh", "num"),
      cell(l ? mass(l.co2e_kg) : "—", "co2e", "num"),
      cell(l ? hours(l.burning_h) : "—", "burning", "num"),
      cell(l ? energy(l.dayburn_kwh) : "—", "dayburn", "num"),
      el("td", {"data-field": "alerts"}, ...(n.alerts.length ? n.alerts.map((a) =>
        el("span", {class: "flag " + (a.severity === "critical" ? "stale" : "backlog"), text: a.alert}))
        : [el("span", {class: "flag none", text: "ok"})]))));
  }
}

function merge(id, r, now) {
  const ns = nodeState(id);
  for (const x of r.readings) {
    if (typeof x.v === "number") {
      if (!ns.series.has(x.n)) ns.series.set(x.n, []);
      ns.series.get(x.n).push({t: x.t, v: x.v});
      if (x.u) ns.unit.set(x.n, x.u);
    } else {
      ns.text.set(x.n, x.vs ?? x.vb ?? x.vd);
    }
  }
  ns.since = r.next_since;
  ns.interval = r.interval_s;
  ns.open = null;
  for (const [a, b] of r.gaps) {
    if (b == null) ns.open = a; else ns.gaps.set(a, b);
  }
  const horizon = now - state.window;
  for (const [name, pts] of ns.series) {
    const keep = pts.filter((p) => p.t >= horizon);
    if (keep.length) ns.series.set(name, keep); else ns.series.delete(name);
  }
  for (const [a, b] of ns.gaps) if (b < horizon) ns.gaps.delete(a);
}

function spark(id, name, pts, ns, now, t0) {
  const W = 200, H = 34, P = 3;
  const span = Math.max(now - t0, 1);
  const vs = pts.map((p) => p.v);
  let lo = Math.min(...vs), hi = Math.max(...vs);
  if (hi === lo) { hi += 0.5; lo -= 0.5; }
  const x = (t) => ((t - t0) / span) * W;
  const y = (v) => H - P - ((v - lo) / (hi - lo)) * (H - 2 * P);
  const s = svg("svg", {class: "spark", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
    "data-node": id, "data-name": name, "data-points": String(pts.length)});
  const gaps = [...ns.gaps].map(([a, b]) => [a, b, false]);
  if (ns.open != null) gaps.push([ns.open, now, true]);  // still missing: up to now
  for (const [a, b, open] of gaps) {
    const r = svg("rect", {class: "gap", x: Math.max(0, x(a)).toFixed(1), y: 0,
      width: Math.max(2, x(b) - Math.max(0, x(a))).toFixed(1), height: H,
      "data-from": String(a), "data-to": String(b), "data-open": open ? "1" : "0"});
    const title = svg("title");
    title.textContent = `no readings for ${Math.round(b - a)} s from ${new Date(a * 1000).toLocaleTimeString()}`;
    r.append(title);
    s.append(r);
  }
  // one polyline per stretch without a gap: a line across a gap would invent readings
  let seg = [];
  const flush = () => {
    if (seg.length > 1) s.append(svg("polyline", {points: seg.join(" ")}));
    else if (seg.length === 1) { const [cx, cy] = seg[0].split(","); s.append(svg("circle", {cx, cy, r: 1.5})); }
    seg = [];
  };
  let prev = null;
  for (const p of pts) {
    if (prev && gaps.some(([a, b]) => prev.t <= a && p.t >= b)) flush();
    seg.push(x(p.t).toFixed(1) + "," + y(p.v).toFixed(1));
    prev = p;
  }
  flush();
  return s;
}

function order(names) {
  // "<name>.q" records are quality bits, shown as flags, not as lines
  const main = names.filter((n) => !DIAGNOSTIC.includes(n) && !n.endsWith(".q"))
    .sort((a, b) => a.localeCompare(b, "en", {sensitivity: "base"}));
  return main.concat(DIAGNOSTIC.filter((n) => names.includes(n)));
}

function renderSparks(data, now) {
  const box = document.getElementById("sparks");
  box.replaceChildren();
  for (const n of data.nodes) {
    const ns = nodeState(n.id);
    // the x axis spans the window, or only the data there is while the window fills up
    let first = now;
    for (const pts of ns.series.values()) first = Math.min(first, pts[0].t);
    for (const a of ns.gaps.keys()) first = Math.min(first, a);
    const t0 = Math.max(now - state.window, Math.min(first, now - 10));
    const card = el("div", {class: "node-card", "data-node": n.id},
      el("h3", {}, el("span", {class: "id", text: n.id}), el("span", {class: "muted small", text: ns.interval ? `every ${fmt(ns.interval)} s` : ""}),
        ...flagsOf(n, ns).map((f) => el("span", {class: flagClass(f), text: f}))));
    for (const name of order([...ns.series.keys()])) {
      const pts = ns.series.get(name);
      const last = pts[pts.length - 1];
      const vs = pts.map((p) => p.v);
      const unit = ns.unit.get(name) || "";
      card.append(el("div", {class: "meas", "data-name": name},
        el("span", {class: "name", text: name, title: name}),
        spark(n.id, name, pts, ns, now, t0),
        el("span", {class: "value", "data-field": "value", "data-value": String(last.v)},
          quantity(last.v, unit),
          el("span", {class: "range", text: `${quantity(Math.min(...vs), unit)} – ${quantity(Math.max(...vs), unit)}`}))));
    }
    for (const [name, v] of ns.text) {
      card.append(el("div", {class: "meas", "data-name": name}, el("span", {class: "name", text: name}),
        el("span", {}), el("span", {class: "value", text: String(v)})));
    }
    if (!ns.series.size && !ns.text.size) card.append(el("p", {class: "muted small", text: "no readings in this window"}));
    box.append(card);
  }
}

async function refresh() {
  const live = document.getElementById("live");
  const problem = document.getElementById("problem");
  try {
    const [st, nodes, rollout, street] = await Promise.all([get("api/status"), get("api/nodes"),
      get("api/rollout", true), get("api/health", true)]);
    const now = nodes.now;
    await Promise.all(nodes.nodes.map(async (n) => {
      const ns = nodeState(n.id);
      const since = ns.since ?? now - state.window;
      let r;
      do {  // page on while the gateway says more remain
        r = await get(`api/nodes/${encodeURIComponent(n.id)}/readings?since=${ns.since ?? since}&limit=5000`);
        merge(n.id, r, now);
      } while (r.more);
    }));
    renderHealth(st);
    renderNodes(nodes);
    renderRollout(rollout);
    renderStreet(street);
    renderSparks(nodes, now);
    state.refreshes += 1;
    live.dataset.state = "live";
    live.dataset.refreshes = String(state.refreshes);
    live.textContent = "live";
    document.getElementById("updated").textContent = "updated " + new Date(now * 1000).toLocaleTimeString();
    problem.hidden = true;
  } catch (e) {
    live.dataset.state = "offline";
    live.textContent = "gateway not answering";
    problem.textContent = e.message;
    problem.hidden = false;
  }
  setTimeout(refresh, REFRESH_MS);
}

document.getElementById("window").addEventListener("change", (ev) => {
  state.window = Number(ev.target.value);
  state.nodes.clear();  // refetch the whole new window
});
state.window = Number(document.getElementById("window").value);
refresh();
