// "Cameras": the cameras the server watches itself (GET /v1/cameras), each with its state, counters
// and its latest scored frame beside the same frame with its anomaly map, refreshed every 2 s while
// the view is visible. Adding, pausing / resuming and removing send the API key of the side panel.

import { ApiError, apiFetch, authHeaders, el, fmt, getJSON, showError } from "./api.js";

const REFRESH_MS = 2000;
const IDLE_MS = 60000; // how often a server without cameras is asked again
const CONFIRM_MS = 5000; // how long a "Remove" button waits for its second click

const $ = (id) => document.getElementById(id);
let ui;
let timer = null;
let refreshing = false;
let refreshAgain = false; // asked for while a refresh was under way (after a change)
let listFailed = false; // the error box shows a listing error (a refresh that works clears it; a change's stays)
const cards = new Map(); // name -> {li, parts, shownFrameAt}

export function initCameras() {
  ui = {
    panel: $("tab-cameras"),
    form: $("camera-form"),
    name: $("camera-name"),
    url: $("camera-url"),
    fps: $("camera-fps"),
    add: $("camera-add"),
    status: $("cameras-status"),
    error: $("cameras-error"),
    list: $("cameras"),
  };
  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    addCamera();
  });
  document.addEventListener("tabshown", (event) => { if (event.detail === "cameras") refresh(); });
  document.addEventListener("visibilitychange", () => { if (visible()) refresh(); });
}

function visible() {
  return !ui.panel.hidden && !document.hidden;
}

/** Lists the cameras now and, while the view is visible, every REFRESH_MS. */
async function refresh() {
  if (refreshing) {
    refreshAgain = true;
    return;
  }
  refreshing = true;
  refreshAgain = false;
  clearTimeout(timer);
  let delay = REFRESH_MS;
  try {
    const body = await getJSON("/v1/cameras");
    ui.list.dataset.available = "true";
    render(Array.isArray(body.cameras) ? body.cameras : []);
    if (listFailed) showError(ui.error, null);
    listFailed = false;
  } catch (error) {
    if (error instanceof ApiError && (error.status === 404 || error.status === 405)) {
      ui.list.dataset.available = "false";
      render([]);
      ui.status.textContent = "This server does not watch cameras.";
      delay = IDLE_MS;
    } else {
      showError(ui.error, error);
      listFailed = true;
    }
  } finally {
    refreshing = false;
  }
  if (refreshAgain) refresh();
  else if (visible()) timer = setTimeout(refresh, delay);
}

function render(cameras) {
  const names = new Set(cameras.map((camera) => camera.name));
  for (const [name, card] of cards) {
    if (!names.has(name)) {
      card.li.remove();
      cards.delete(name);
    }
  }
  for (const camera of cameras) {
    let card = cards.get(camera.name);
    if (!card) {
      card = newCard(camera.name);
      cards.set(camera.name, card);
    }
    updateCard(card, camera);
    ui.list.append(card.li); // in the server's order (by name)
  }
  ui.list.dataset.count = String(cameras.length);
  if (ui.list.dataset.available === "true" && !cameras.length) {
    ui.list.replaceChildren(el("li", { className: "note empty" }, "No cameras yet: add one above."));
  } else {
    for (const stale of ui.list.querySelectorAll("li.empty")) stale.remove();
  }
}

function newCard(name) {
  const parts = {
    state: el("span", { className: "state" }),
    url: el("code", { className: "url" }),
    toggle: el("button", { type: "button", dataset: { action: "toggle" } }),
    remove: el("button", { type: "button", dataset: { action: "remove" } }, "Remove"),
    frame: el("img", { className: "latest", alt: `The latest scored frame of ${name}` }),
    heatmap: el("img", { className: "latest", alt: `The latest scored frame of ${name} with its anomaly map` }),
    pictures: el("div", { className: "pictures" }),
    placeholder: el("p", { className: "note" }),
    meta: el("div", { className: "meta" }),
    problem: el("div", { className: "jerr" }),
  };
  parts.pictures.append(
    el("figure", {}, parts.frame, el("figcaption", {}, "latest frame")),
    el("figure", {}, parts.heatmap, el("figcaption", {}, "with its anomaly map")));
  const li = el("li", { className: "camera", dataset: { camera: name } },
    el("div", { className: "head" }, el("b", {}, name), parts.state, parts.url,
      el("span", { className: "push" }, parts.toggle, " ", parts.remove)),
    parts.meta, parts.problem, parts.pictures, parts.placeholder);
  const card = { li, parts, shownFrameAt: null, camera: null, confirmTimer: null };
  parts.toggle.addEventListener("click", () => change(card, { enabled: !card.camera.enabled }));
  parts.remove.addEventListener("click", () => removeClicked(card));
  for (const image of [parts.frame, parts.heatmap]) {
    image.addEventListener("load", () => picturesLoaded(card));
    image.addEventListener("error", () => { card.li.dataset.pictures = "error"; });
  }
  return card;
}

function updateCard(card, camera) {
  const { li, parts } = card;
  card.camera = camera;
  li.dataset.state = camera.state;
  li.dataset.enabled = String(Boolean(camera.enabled));
  parts.state.className = `state ${camera.state}`;
  parts.state.textContent = camera.state;
  parts.url.textContent = camera.url;
  parts.toggle.textContent = camera.enabled ? "Pause" : "Resume";
  parts.toggle.title = camera.enabled ? "Stop watching this camera (it stays configured)" : "Watch this camera again";
  const anomalous = camera.frames_anomalous;
  parts.meta.textContent = [
    `${fmt(camera.fps, 2)} fps`,
    `${camera.frames_scored} frames scored${anomalous !== undefined ? ` (${anomalous} anomalous)` : ""}`,
    camera.last_frame_at ? `last frame ${ago(camera.last_frame_at)}` : "no frame yet",
    camera.reconnects ? `${camera.reconnects} reconnect${camera.reconnects === 1 ? "" : "s"}` : "",
  ].filter(Boolean).join(" · ");
  parts.problem.textContent = camera.last_error ? `last error: ${camera.last_error}` : "";
  parts.problem.hidden = !camera.last_error;
  const hasFrame = Boolean(camera.last_frame_at) && camera.frames_scored > 0;
  parts.pictures.hidden = !hasFrame;
  parts.placeholder.hidden = hasFrame;
  parts.placeholder.textContent = camera.enabled ? "No scored frame yet." : "Paused: no frames are read.";
  if (hasFrame && camera.last_frame_at !== card.shownFrameAt) {
    // a new frame: both pictures again (the query only defeats caches; the server answers the latest)
    card.shownFrameAt = camera.last_frame_at;
    const stamp = encodeURIComponent(camera.last_frame_at);
    parts.frame.src = `${camera.latest_url || `/v1/cameras/${encodeURIComponent(camera.name)}/latest.jpg`}?t=${stamp}`;
    parts.heatmap.src = `${camera.latest_heatmap_url || `/v1/cameras/${encodeURIComponent(camera.name)}/latest-heatmap.png`}?t=${stamp}`;
  }
}

function picturesLoaded(card) {
  const { frame, heatmap } = card.parts;
  if (frame.complete && frame.naturalWidth && heatmap.complete && heatmap.naturalWidth) {
    card.li.dataset.pictures = "loaded";
    card.li.dataset.picturesAt = card.shownFrameAt || "";
  }
}

/** "3 s ago" for an ISO-8601 time. */
function ago(iso) {
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  if (!Number.isFinite(seconds)) return iso;
  if (seconds < 1.5) return "just now";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return new Date(iso).toLocaleString();
}

// ------------------------------------------------------------------ changes (API key)

async function send(path, method, body) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return apiFetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
}

function failed(error) {
  showError(ui.error, error);
  ui.status.textContent = "";
  listFailed = false;
  if (error instanceof ApiError && (error.code === "unauthorized" || error.code === "forbidden")) $("api-key").focus();
}

async function addCamera() {
  showError(ui.error, null);
  const name = ui.name.value.trim();
  const fps = Number(ui.fps.value);
  ui.add.disabled = true;
  try {
    await send("/v1/cameras", "POST", { name, url: ui.url.value.trim(), fps: fps > 0 ? fps : 10, enabled: true });
    ui.status.textContent = `Added ${name}: the server is connecting to it.`;
    ui.name.value = "";
    ui.url.value = "";
  } catch (error) {
    failed(error);
  } finally {
    ui.add.disabled = false;
  }
  refresh();
}

async function change(card, fields) {
  showError(ui.error, null);
  const name = card.camera.name;
  try {
    await send(`/v1/cameras/${encodeURIComponent(name)}`, "PATCH", fields);
    ui.status.textContent = fields.enabled === false ? `Paused ${name}.` : `Resumed ${name}: reconnecting.`;
  } catch (error) {
    failed(error);
  }
  refresh();
}

/** Remove asks twice: the first click arms the button for CONFIRM_MS. */
async function removeClicked(card) {
  const button = card.parts.remove;
  if (!button.classList.contains("armed")) {
    button.classList.add("armed");
    button.textContent = "Remove for good?";
    card.confirmTimer = setTimeout(() => {
      button.classList.remove("armed");
      button.textContent = "Remove";
    }, CONFIRM_MS);
    return;
  }
  clearTimeout(card.confirmTimer);
  showError(ui.error, null);
  const name = card.camera.name;
  try {
    await send(`/v1/cameras/${encodeURIComponent(name)}`, "DELETE");
    ui.status.textContent = `Removed ${name}.`;
  } catch (error) {
    failed(error);
    button.classList.remove("armed");
    button.textContent = "Remove";
  }
  refresh();
}
