// HiveNet live topology page: draws GET /v1/graph with Cytoscape.js, refreshes live state
// and counters, and draws the path of a trace (POST /v1/traces) on the graph.
// The token comes from the URL fragment (#token=...) or a prompt; `#...&trace={json}` runs a
// trace once the graph is drawn (used by `make demo` links and the browser test).
"use strict";

const REFRESH_MS = 3000;
const params = new URLSearchParams(location.hash.replace(/^#/, ""));
if (params.get("token")) sessionStorage.setItem("hivenet-token", params.get("token"));
let token = sessionStorage.getItem("hivenet-token");
if (!token) {
  token = window.prompt("HiveNet API token") || "";
  sessionStorage.setItem("hivenet-token", token);
}

const statusEl = document.getElementById("status");
let cy = null;
let signature = "";
let lastTrace = null;

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (data.error && data.error.message) || response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return data;
}

function counterText(counters) {
  if (!counters) return "";
  if ("rx_packets" in counters) return `rx ${counters.rx_packets} tx ${counters.tx_packets}`;
  if ("packets" in counters) return `${counters.packets} pkts`;
  return "";
}

function elementsOf(graph) {
  const nodes = graph.nodes.map((node) => ({
    group: "nodes",
    data: { ...node, display: [node.label, counterText(node.counters)].filter(Boolean).join("\n") },
    classes: `${node.kind} ${node.state}`,
  }));
  const edges = graph.edges.map((edge) => ({ group: "edges", data: edge, classes: edge.kind }));
  return nodes.concat(edges);
}

const STYLE = [
  { selector: "node", style: { label: "data(display)", "text-wrap": "wrap", "font-size": 10,
      "text-valign": "bottom", "text-margin-y": 4, width: 28, height: 28, "background-color": "#888" } },
  { selector: "node.bridge", style: { shape: "round-rectangle", "background-color": "#2f7ed8", width: 44 } },
  { selector: "node.router", style: { shape: "diamond", "background-color": "#f28f43", width: 38, height: 38 } },
  { selector: "node.vm", style: { shape: "ellipse", "background-color": "#4caf50" } },
  { selector: "node.port", style: { shape: "triangle", "background-color": "#8d6e63" } },
  { selector: "node.gateway", style: { shape: "vee", "background-color": "#c0392b" } },
  { selector: "node.host", style: { shape: "rectangle", "background-color": "#607d8b" } },
  { selector: "node.load_balancer", style: { shape: "hexagon", "background-color": "#8e44ad" } },
  { selector: "node.down, node.admin-down, node.unbound", style: { "background-opacity": 0.35 } },
  { selector: "edge", style: { width: 2, "line-color": "#bbb", "curve-style": "bezier" } },
  { selector: "edge.host", style: { "line-style": "dashed", width: 1 } },
  { selector: ".on-path", style: { "line-color": "#e8400c", "border-color": "#e8400c",
      "border-width": 4, width: 5, "z-index": 10 } },
  { selector: "node.on-path", style: { width: 40, height: 40 } },
  { selector: "node.dropped-here", style: { "border-color": "#b00020", "border-style": "double" } },
];

function renderList(graph) {
  const list = document.getElementById("elements");
  list.replaceChildren();
  for (const node of graph.nodes) {
    const item = document.createElement("li");
    item.dataset.id = node.id;
    item.dataset.kind = node.kind;
    item.textContent = `${node.kind} ${node.label} [${node.state}] ${counterText(node.counters)}`;
    list.appendChild(item);
  }
  const select = document.getElementById("trace-port");
  const chosen = select.value;
  select.replaceChildren();
  for (const node of graph.nodes.filter((n) => ["vm", "port", "gateway"].includes(n.kind))) {
    const option = document.createElement("option");
    option.value = node.id;
    option.textContent = `${node.label} (${node.host || "no host"})`;
    select.appendChild(option);
  }
  if (chosen) select.value = chosen;
}

function showDetails(data) {
  const details = document.getElementById("details");
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(data, null, 1);
  details.replaceChildren(pre);
}

async function refresh() {
  let graph;
  try {
    graph = await api("GET", "/v1/graph");
  } catch (error) {
    statusEl.textContent = `error: ${error.message}`;
    statusEl.className = "error";
    return;
  }
  const newSignature = graph.nodes.map((n) => n.id).concat(graph.edges.map((e) => e.id)).sort().join(",");
  if (cy === null || newSignature !== signature) {
    signature = newSignature;
    if (cy !== null) cy.destroy();
    cy = cytoscape({
      container: document.getElementById("graph"),
      elements: elementsOf(graph),
      style: STYLE,
      layout: { name: "cose", animate: false, randomize: false, nodeRepulsion: 9000, idealEdgeLength: 70 },
    });
    cy.on("tap", "node, edge", (event) => showDetails(event.target.data()));
    if (lastTrace) drawTrace(lastTrace);
  } else {
    for (const element of elementsOf(graph)) {
      const existing = cy.getElementById(element.data.id);
      existing.data(element.data);
      const onPath = existing.hasClass("on-path");
      existing.classes(element.classes);
      if (onPath) existing.addClass("on-path");
    }
  }
  renderList(graph);
  if (lastTrace) markList(lastTrace);
  const live = graph.nodes.filter((n) => n.kind === "host" && n.state === "live").length;
  statusEl.textContent = `${graph.nodes.length} elements, ${live} live hosts, revision ${graph.revision}`;
  statusEl.className = "";
  document.body.dataset.loaded = "true";
}

function pathIds(trace) {
  const ids = new Set([trace.ingress_port]);
  for (const step of trace.path) ids.add(step.id);
  for (const out of trace.egress) {
    ids.add(out.port_id);
    if (out.host) ids.add(`host:${out.host}`);
  }
  return ids;
}

function drawTrace(trace) {
  const ids = pathIds(trace);
  cy.elements().removeClass("on-path dropped-here");
  cy.nodes().forEach((node) => { if (ids.has(node.id())) node.addClass("on-path"); });
  cy.edges().forEach((edge) => {
    const data = edge.data();
    const linked = data.kind === "link" ? data.ports.some((p) => ids.has(p)) : true;
    if (linked && ids.has(data.source) && ids.has(data.target)) edge.addClass("on-path");
  });
  if (trace.drop_reason) {
    const last = trace.path[trace.path.length - 1];
    if (last) cy.getElementById(last.id).addClass("dropped-here");
  }
}

function markList(trace) {
  const ids = pathIds(trace);
  for (const item of document.querySelectorAll("#elements li")) {
    item.classList.toggle("on-path", ids.has(item.dataset.id));
  }
}

function showTrace(trace) {
  const result = document.getElementById("trace-result");
  const verdict = document.createElement("div");
  verdict.className = trace.drop_reason ? "dropped" : "forwarded";
  verdict.id = "trace-verdict";
  verdict.textContent = trace.drop_reason ? `dropped: ${trace.drop_reason}` : "forwarded";
  const steps = document.createElement("pre");
  steps.id = "trace-steps";
  steps.textContent = trace.steps
    .map((s) => `${"  ".repeat(s.depth)}[${s.device_kind} ${s.device_name}] ${s.event}: ${s.detail}`)
    .concat(trace.egress.map((e) => `=> leaves via ${e.port_id} on ${e.host} key ${e.tunnel_key}`))
    .concat([`=> megaflow: ${Object.entries(trace.megaflow.match).map(([k, v]) => `${k}=${v}`).join(", ")}`])
    .join("\n");
  result.replaceChildren(verdict, steps);
}

async function runTrace(request) {
  const result = document.getElementById("trace-result");
  try {
    const trace = await api("POST", "/v1/traces", request);
    lastTrace = trace;
    if (cy !== null) drawTrace(trace);
    markList(trace);
    showTrace(trace);
    document.body.dataset.trace = trace.drop_reason ? "dropped" : "forwarded";
  } catch (error) {
    result.textContent = `trace failed: ${error.message}`;
    result.className = "error";
    document.body.dataset.trace = "error";
  }
}

document.getElementById("trace-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const request = { from_port: form.get("from_port"), ip_dst: form.get("ip_dst"), proto: form.get("proto") };
  if (form.get("dst_port")) request.dst_port = Number(form.get("dst_port"));
  runTrace(request);
});

(async () => {
  await refresh();
  const initial = params.get("trace");
  if (initial) await runTrace(JSON.parse(initial));
  setInterval(refresh, REFRESH_MS);
})();
