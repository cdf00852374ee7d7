// "Events": the runs of anomalous frames the server recorded (cameras, opted-in streams, clip
// uploads), newest first with their peak frame's snapshot, filtered by camera and paged with "More";
// a click shows the peak frame with its anomaly map, large. Live updates come over the Server-Sent
// Events feed (GET /v1/events/stream), opened the first time the view is shown: new events appear
// at the top, open ones change in place, and events opened while the view is hidden are counted on
// its tab.

import { ApiError, el, fmt, getJSON, showError } from "./api.js";

const PAGE_SIZE = 24;

const $ = (id) => document.getElementById(id);
let ui;
let started = false;
let feed = null; // the EventSource
let cursor = null; // next_cursor of the last page loaded
let generation = 0; // bumped by each reload, so a late page of an older listing is dropped
let unseen = 0;
let selected = null; // the id shown in the detail panel
const shown = new Map(); // id -> {event, li, image, parts}
const cameraNames = new Set();

export function initEvents() {
  ui = {
    panel: $("tab-events"),
    camera: $("events-camera"),
    refresh: $("events-refresh"),
    live: $("events-live"),
    status: $("events-status"),
    error: $("events-error"),
    list: $("events"),
    more: $("events-more"),
    newCount: $("events-new"),
    detail: $("event-detail"),
    detailTitle: $("event-detail-title"),
    heatmap: $("event-heatmap"),
    snapshot: $("event-snapshot"),
    facts: $("event-facts"),
  };
  ui.camera.addEventListener("change", () => reload());
  ui.refresh.addEventListener("click", () => reload());
  ui.more.addEventListener("click", () => loadPage(generation));
  $("event-detail-close").addEventListener("click", closeDetail);
  document.addEventListener("tabshown", (event) => {
    if (event.detail !== "events") return;
    unseen = 0;
    ui.newCount.hidden = true;
    if (!started) {
      started = true;
      loadCameraNames();
      reload().then((available) => { if (available) connect(); });
    }
  });
}

function eventsVisible() {
  return !ui.panel.hidden && !document.hidden;
}

// ------------------------------------------------------------------ listing and paging

/** The first page again (after a filter change or Refresh); resolves false when the server has no events API. */
async function reload() {
  generation++;
  cursor = null;
  shown.clear();
  ui.list.replaceChildren();
  ui.more.hidden = true;
  return loadPage(generation);
}

async function loadPage(gen) {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (ui.camera.value) params.set("camera", ui.camera.value);
  if (cursor) params.set("cursor", cursor);
  ui.more.disabled = true;
  try {
    const body = await getJSON(`/v1/events?${params}`);
    if (gen !== generation) return true;
    for (const event of body.events || []) {
      noteCamera(event.camera);
      if (!shown.has(event.id)) ui.list.append(newItem(event).li);
    }
    cursor = body.next_cursor || null;
    showError(ui.error, null);
    ui.list.dataset.available = "true";
    return true;
  } catch (error) {
    if (gen !== generation) return true;
    if (error instanceof ApiError && (error.status === 404 || error.status === 405)) {
      ui.list.dataset.available = "false";
      ui.status.textContent = "This server does not record events.";
      return false;
    }
    showError(ui.error, error);
    return true;
  } finally {
    if (gen === generation) {
      ui.more.disabled = false;
      ui.more.hidden = !cursor;
      renderCount();
    }
  }
}

function renderCount() {
  ui.list.dataset.count = String(shown.size);
  if (ui.list.dataset.available !== "true") return;
  const which = ui.camera.value ? ` for ${ui.camera.value}` : "";
  ui.status.textContent = shown.size
    ? `${shown.size} event${shown.size === 1 ? "" : "s"}${which}, newest first${cursor ? "; older ones below “More”" : ""}. Click one to see where in the frame.`
    : `No events${which} yet.`;
}

/** The camera filter offers every camera the server watches and every name seen in an event. */
async function loadCameraNames() {
  try {
    const body = await getJSON("/v1/cameras");
    for (const camera of body.cameras || []) noteCamera(camera.name);
  } catch {
    // no cameras API: the names come from the events alone
  }
}

function noteCamera(name) {
  if (!name || cameraNames.has(name)) return;
  cameraNames.add(name);
  const options = [...cameraNames].sort().map((n) => el("option", { value: n }, n));
  const current = ui.camera.value;
  ui.camera.replaceChildren(el("option", { value: "" }, "all"), ...options);
  ui.camera.value = current;
}

// ------------------------------------------------------------------ one event

function newItem(event) {
  const parts = {
    image: el("img", { className: "snap", alt: `Peak frame of the event on ${event.camera}`, loading: "lazy" }),
    state: el("span", { className: "state" }),
    when: el("span", { className: "when" }),
    figures: el("div", { className: "meta" }),
  };
  parts.image.addEventListener("load", () => { item.li.dataset.snapshot = "loaded"; });
  parts.image.addEventListener("error", () => { item.li.dataset.snapshot = "error"; });
  const li = el("li", { className: "event", dataset: { event: event.id } },
    el("button", { type: "button", className: "pick", title: "Show the peak frame with its anomaly map", onclick: () => openDetail(event.id) },
      parts.image,
      el("div", { className: "text" },
        el("div", { className: "head" }, el("b", {}, event.camera), parts.state, el("span", { className: "source" }, event.source)),
        parts.when, parts.figures)));
  const item = { event, li, parts };
  shown.set(event.id, item);
  updateItem(item, event);
  return item;
}

function updateItem(item, event) {
  const { li, parts } = item;
  const peakMoved = !item.event || item.event.peak_frame !== event.peak_frame || !parts.image.src;
  item.event = event;
  li.dataset.state = event.state;
  li.dataset.camera = event.camera;
  li.dataset.start = String(Date.parse(event.start));
  parts.state.className = `state ${event.state}`;
  parts.state.textContent = event.state;
  parts.when.textContent = `${new Date(event.start).toLocaleString()} · ${duration(event)}`;
  parts.figures.textContent = `peak ${fmt(event.peak_score, 3)} at frame ${event.peak_frame} · ${event.frames} frames · ${event.model_version}`;
  if (peakMoved) parts.image.src = pictureUrl(event, event.snapshot_url, "snapshot.jpg");
}

/** A picture's URL; the peak frame in the query, so a moved peak (open events) is fetched anew. */
function pictureUrl(event, url, name) {
  return `${url || `/v1/events/${event.id}/${name}`}?peak=${event.peak_frame}`;
}

function duration(event) {
  const end = event.end ? Date.parse(event.end) : Date.now();
  const seconds = Math.max(0, (end - Date.parse(event.start)) / 1000);
  const text = seconds < 60 ? `${fmt(seconds, 1)} s` : `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return event.state === "open" ? `open for ${text}` : text;
}

function openDetail(id) {
  const item = shown.get(id);
  if (!item) return;
  selected = id;
  for (const other of ui.list.querySelectorAll("li.event.current")) other.classList.remove("current");
  item.li.classList.add("current");
  renderDetail(item.event);
  ui.detail.hidden = false;
  ui.detail.scrollIntoView({ block: "nearest" });
}

function renderDetail(event) {
  ui.detail.dataset.event = event.id;
  ui.detailTitle.textContent = `${event.camera} · ${new Date(event.start).toLocaleString()}`;
  const heatmap = pictureUrl(event, event.heatmap_url, "heatmap.png");
  if (ui.heatmap.getAttribute("src") !== heatmap) {
    ui.detail.dataset.heatmap = "loading";
    ui.heatmap.onload = () => { ui.detail.dataset.heatmap = "loaded"; };
    ui.heatmap.onerror = () => { ui.detail.dataset.heatmap = "error"; };
    ui.heatmap.src = heatmap;
  }
  const snapshot = pictureUrl(event, event.snapshot_url, "snapshot.jpg");
  if (ui.snapshot.getAttribute("src") !== snapshot) ui.snapshot.src = snapshot;
  const facts = [
    ["camera", event.camera], ["source", event.source], ["state", event.state],
    ["start", new Date(event.start).toLocaleString()], ["end", event.end ? new Date(event.end).toLocaleString() : "still open"],
    ["duration", duration(event)], ["peak score", fmt(event.peak_score, 4)], ["peak frame", String(event.peak_frame)],
    ["frames", String(event.frames)], ["model", event.model_version], ["id", event.id],
  ];
  ui.facts.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function closeDetail() {
  selected = null;
  ui.detail.hidden = true;
  for (const other of ui.list.querySelectorAll("li.event.current")) other.classList.remove("current");
}

// ------------------------------------------------------------------ live updates (SSE)

function connect() {
  feed = new EventSource("/v1/events/stream");
  setLive("connecting", "live updates: connecting…");
  feed.addEventListener("open", () => setLive("open", "live updates: on"));
  feed.addEventListener("error", () => {
    if (feed.readyState === EventSource.CLOSED) setLive("closed", "live updates: off (reload the page)");
    else setLive("connecting", "live updates: reconnecting…");
  });
  for (const kind of ["opened", "updated", "closed"]) {
    feed.addEventListener(kind, (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return; // not an event this page understands
      }
      changed(kind, event);
    });
  }
}

function setLive(state, text) {
  ui.live.dataset.state = state;
  ui.live.textContent = text;
}

function changed(kind, event) {
  noteCamera(event.camera);
  const item = shown.get(event.id);
  if (item) updateItem(item, event);
  else if (!ui.camera.value || ui.camera.value === event.camera) insert(event);
  if (selected === event.id) renderDetail(event);
  if (kind === "opened" && !eventsVisible()) {
    unseen++;
    ui.newCount.textContent = String(unseen);
    ui.newCount.hidden = false;
  }
  renderCount();
}

/** An event not listed yet, in its place by start (newest first); one older than every event listed
 * while older pages remain is left to "More". */
function insert(event) {
  const start = Date.parse(event.start);
  const after = [...ui.list.children].find((li) => Number(li.dataset.start) < start);
  if (!after && cursor) return;
  const { li } = newItem(event);
  if (after) ui.list.insertBefore(li, after);
  else ui.list.append(li);
}
