// treeflow's web page: the executions list (GET /api/executions), one tree live over the gateway's
// server-sent events (GET /v1/workflows/events/stream), an execution's history, and signal /
// cancel / terminate (POST /api/executions/{id}/...). Plain JS, no build step.
"use strict";

// Every event type: EventSource hands named frames only to listeners of that name.
// (tests/unit/test_web_page.py checks this list against treeflow.schemas.EventType.)
const EVENT_TYPES = [
  "WORKFLOW_EXECUTION_STARTED", "WORKFLOW_EXECUTION_COMPLETED", "WORKFLOW_EXECUTION_FAILED",
  "WORKFLOW_EXECUTION_CANCELED", "WORKFLOW_EXECUTION_CONTINUED_AS_NEW", "WORKFLOW_EXECUTION_TERMINATED",
  "WORKFLOW_EXECUTION_TIMED_OUT", "WORKFLOW_EXECUTION_CANCEL_REQUESTED", "WORKFLOW_EXECUTION_SIGNALED",
  "WORKFLOW_TASK_COMPLETED", "WORKFLOW_TASK_TIMED_OUT", "WORKFLOW_TASK_FAILED",
  "ACTIVITY_TASK_SCHEDULED", "ACTIVITY_TASK_STARTED", "ACTIVITY_TASK_COMPLETED", "ACTIVITY_TASK_RETRYING",
  "ACTIVITY_TASK_FAILED", "ACTIVITY_TASK_TIMED_OUT", "ACTIVITY_TASK_CANCEL_REQUESTED", "ACTIVITY_TASK_CANCELED",
  "CUSTOM_TASK_STARTED", "CUSTOM_TASK_IN_PROGRESS", "CUSTOM_TASK_COMPLETED", "CUSTOM_TASK_FAILED",
  "CUSTOM_TASK_TIMED_OUT", "CUSTOM_TASK_CANCELED", "TIMER_STARTED", "TIMER_FIRED", "TIMER_CANCELED",
  "START_CHILD_WORKFLOW_EXECUTION_INITIATED", "START_CHILD_WORKFLOW_EXECUTION_FAILED",
  "CHILD_WORKFLOW_EXECUTION_STARTED", "CHILD_WORKFLOW_EXECUTION_COMPLETED", "CHILD_WORKFLOW_EXECUTION_FAILED",
  "CHILD_WORKFLOW_EXECUTION_CANCELED", "CHILD_WORKFLOW_EXECUTION_TERMINATED", "CHILD_WORKFLOW_EXECUTION_TIMED_OUT",
  "CHILD_WORKFLOW_EXECUTION_CANCEL_REQUESTED", "PARENT_CLOSE_POLICY_APPLIED",
  "WORKFLOW_EXECUTION_UPDATE_ACCEPTED", "WORKFLOW_EXECUTION_UPDATE_COMPLETED", "MARKER_RECORDED",
  "EXTERNAL_WORKFLOW_EXECUTION_SIGNALED", "SCHEDULE_CREATED", "SCHEDULE_PAUSED", "SCHEDULE_RESUMED",
  "SCHEDULE_DELETED", "SCHEDULE_FIRED", "SCHEDULE_SKIPPED", "SCHEDULE_BUFFERED",
];
const CLOSING = {
  WORKFLOW_EXECUTION_COMPLETED: "COMPLETED", WORKFLOW_EXECUTION_FAILED: "FAILED",
  WORKFLOW_EXECUTION_CANCELED: "CANCELED", WORKFLOW_EXECUTION_TERMINATED: "TERMINATED",
  WORKFLOW_EXECUTION_TIMED_OUT: "TIMED_OUT", WORKFLOW_EXECUTION_CONTINUED_AS_NEW: "CONTINUED_AS_NEW",
};
const REFRESH_MS = 2000;

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

function badge(status) {
  return el("span", { class: `status status-${status}`, "data-status": status }, status);
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { hour12: false });
}

// ------------------------------------------------------------------ the executions list

let listTimer = null;

function filters() {
  const form = new FormData($("#filters"));
  const params = new URLSearchParams();
  for (const name of ["status", "workflow", "root", "parent", "since", "limit"]) {
    const value = (form.get(name) || "").trim();
    if (value) params.set(name, value);
  }
  return params;
}

function showFreshness(freshness) {
  const node = $("#freshness");
  if (!freshness) return;
  const lag = freshness.lag === null ? "unknown" : `${freshness.lag} event(s)`;
  const applied = freshness.applied_at ? when(freshness.applied_at) : "never";
  node.textContent = `visibility lag: ${lag} · last applied ${applied}`;
  node.classList.toggle("behind", freshness.lag !== 0);
}

async function loadList() {
  const note = $("#list-status");
  try {
    const response = await fetch(`/api/executions?${filters()}`);
    const body = await response.json();
    if (!response.ok) throw new Error(body.detail || response.statusText);
    const rows = body.executions.map((row) => el("tr", {
      "data-exec-id": row.execution_id,
      onclick: () => { location.hash = `#tree/${encodeURIComponent(row.root_execution_id)}/${encodeURIComponent(row.execution_id)}`; },
    },
      el("td", { class: "id" }, row.execution_id),
      el("td", {}, row.workflow_name),
      el("td", {}, badge(row.status)),
      el("td", {}, when(row.start_time)),
      el("td", {}, when(row.close_time)),
      el("td", { class: "id" }, row.parent_execution_id || "–"),
    ));
    $("#executions tbody").replaceChildren(...rows);
    note.textContent = `${rows.length} execution(s)`;
    note.classList.remove("error");
    showFreshness(body.freshness);
  } catch (error) {
    note.textContent = `cannot list executions: ${error.message}`;
    note.classList.add("error");
  }
}

function scheduleList() {
  clearInterval(listTimer);
  if (new FormData($("#filters")).get("live")) listTimer = setInterval(loadList, REFRESH_MS);
}

// ------------------------------------------------------------------ one tree, live

const tree = { root: null, source: null, nodes: new Map(), selected: null };

function node(id, name, parent) {
  let found = tree.nodes.get(id);
  if (!found) {
    if (parent && !tree.nodes.has(parent)) {
      tree.nodes.set(parent, { id: parent, name: "", parent: null, status: "UNKNOWN", children: [], events: [] });
    }
    found = { id, name, parent, status: "PENDING", children: [], events: [], run: null };
    tree.nodes.set(id, found);
    if (parent) tree.nodes.get(parent).children.push(id);
  }
  return found;
}

function observe(event) {
  const context = event.workflow_context;
  const own = node(context.workflow_exec_id, context.workflow_name, context.parent_workflow_exec_id);
  if (own.status === "UNKNOWN") own.status = "PENDING";
  own.name = context.workflow_name;
  own.events.push(event);
  const type = event.event_type;
  if (type === "WORKFLOW_EXECUTION_STARTED") {
    own.status = "RUNNING";
    own.run = context.workflow_run_id;
    own.queue = context.task_queue;
  } else if (CLOSING[type]) {
    own.status = CLOSING[type];
  } else if (type === "START_CHILD_WORKFLOW_EXECUTION_INITIATED") {
    node(event.payload.child_workflow_exec_id, event.payload.child_workflow_name, context.workflow_exec_id);
  } else if (type === "START_CHILD_WORKFLOW_EXECUTION_FAILED") {
    const child = tree.nodes.get(event.payload.child_workflow_exec_id);
    if (child && child.status === "PENDING") child.status = "START_FAILED";
  }
}

function renderTree() {
  const render = (id) => {
    const item = tree.nodes.get(id);
    const label = el("span", {
      class: `node${tree.selected === id ? " selected" : ""}`,
      onclick: () => { location.hash = `#tree/${encodeURIComponent(tree.root)}/${encodeURIComponent(id)}`; },
    }, el("span", { class: "name" }, item.name || "?"), el("span", { class: "id" }, id), badge(item.status));
    const li = el("li", { "data-exec-id": id, "data-status": item.status, "data-workflow": item.name }, label);
    if (item.children.length) li.append(el("ul", {}, ...item.children.map(render)));
    return li;
  };
  const tops = [...tree.nodes.values()].filter((n) => !n.parent || !tree.nodes.has(n.parent));
  $("#tree").replaceChildren(...tops.map((n) => render(n.id)));
  if (!tops.length) $("#tree").replaceChildren(el("li", { class: "note" }, "waiting for the tree's first event…"));
  renderExecution();
}

let renderPending = false;
function renderSoon() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; renderTree(); });
}

function openTree(root) {
  if (tree.root === root && tree.source) return;
  if (tree.source) tree.source.close();
  Object.assign(tree, { root, nodes: new Map(), selected: null });
  $("#tree-panel").hidden = false;
  $("#tree-root").textContent = root;
  const state = $("#stream-state");
  state.textContent = "connecting…";
  const source = new EventSource(`/v1/workflows/events/stream?format=treeflow&root_workflow_exec_id=${encodeURIComponent(root)}`);
  tree.source = source;
  const onEvent = (frame) => { observe(JSON.parse(frame.data)); state.textContent = "live"; renderSoon(); };
  for (const type of EVENT_TYPES) source.addEventListener(type, onEvent);
  source.addEventListener("open", () => { state.textContent = "live"; });
  source.addEventListener("error", (frame) => {
    // An "error" frame from the gateway carries data; a dropped connection does not (EventSource reconnects
    // with Last-Event-ID by itself).
    state.textContent = frame.data ? `stream error: ${JSON.parse(frame.data).message}` : "reconnecting…";
  });
  renderTree();
}

// ------------------------------------------------------------------ one execution

function decoded(payload) {
  const out = {};
  for (const [key, value] of Object.entries(payload || {})) {
    if (value === null || value === undefined) continue;
    if (key.endsWith("_json") && typeof value === "string") {
      try { out[key.slice(0, -5)] = JSON.parse(value); continue; } catch (_) { /* shown as it is */ }
    }
    out[key] = value;
  }
  return out;
}

function renderExecution() {
  const id = tree.selected;
  const panel = $("#execution-panel");
  const item = id && tree.nodes.get(id);
  panel.hidden = !item;
  if (!item) return;
  $("#exec-id").textContent = id;
  $("#exec-status").replaceChildren(badge(item.status));
  const details = [["workflow", item.name], ["run", item.run], ["parent", item.parent], ["root", tree.root],
                   ["task queue", item.queue], ["events", String(item.events.length)]];
  $("#exec-details").replaceChildren(...details.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v || "–")]));
  const open = ["RUNNING", "PENDING", "CONTINUED_AS_NEW"].includes(item.status);
  for (const button of ["#signal-button", "#cancel-button", "#terminate-button"]) $(button).disabled = !open;
  const body = $("#history tbody");
  if (body.dataset.exec === id && Number(body.dataset.count) === item.events.length) return;
  body.dataset.exec = id;
  body.dataset.count = String(item.events.length);
  body.replaceChildren(...item.events.map((event) => el("tr", { "data-event-type": event.event_type },
    el("td", {}, String(event.sequence)),
    el("td", {}, when(event.timestamp)),
    el("td", { class: "mono" }, event.event_type + (event.attempt ? ` (attempt ${event.attempt})` : "")),
    el("td", {}, el("pre", {}, JSON.stringify(decoded(event.payload), null, 2))),
  )));
}

async function act(action, body) {
  const id = tree.selected;
  const result = $("#action-result");
  result.classList.remove("error");
  result.textContent = `${action}…`;
  try {
    const response = await fetch(`/api/executions/${encodeURIComponent(id)}/${action}`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...body, root_workflow_exec_id: tree.root }),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.detail || response.statusText);
    result.textContent = `${action}: accepted (in the history)`;
  } catch (error) {
    result.textContent = `${action} failed: ${error.message}`;
    result.classList.add("error");
  }
}

$("#signal-form").addEventListener("submit", (submit) => {
  submit.preventDefault();
  const form = new FormData(submit.target);
  const raw = (form.get("input") || "").trim();
  let input = null;
  if (raw) {
    try { input = JSON.parse(raw); } catch (error) {
      $("#action-result").textContent = `the input is not JSON: ${error.message}`;
      $("#action-result").classList.add("error");
      return;
    }
  }
  act("signal", { name: form.get("name"), input });
});
$("#cancel-button").addEventListener("click", () => act("cancel", { reason: new FormData($("#close-form")).get("reason") || undefined }));
$("#terminate-button").addEventListener("click", () => act("terminate", { reason: new FormData($("#close-form")).get("reason") || undefined }));

// ------------------------------------------------------------------ routing: #tree/<root>[/<execution>]

function route() {
  const parts = location.hash.replace(/^#/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "tree" && parts[1]) {
    openTree(parts[1]);
    tree.selected = parts[2] || parts[1];
    renderTree();
  } else {
    if (tree.source) tree.source.close();
    Object.assign(tree, { root: null, source: null, nodes: new Map(), selected: null });
    $("#tree-panel").hidden = true;
    $("#execution-panel").hidden = true;
  }
}

$("#filters").addEventListener("submit", (submit) => { submit.preventDefault(); loadList(); scheduleList(); });
$("#filters").addEventListener("change", scheduleList);
window.addEventListener("hashchange", route);
route();
loadList();
scheduleList();
