// "Live stream": frames of a local video file (decoded by the browser) or of a webcam are drawn to a
// canvas at ~10 fps, encoded as JPEG (canvas.toBlob) and sent over WS /v1/stream. Each reply (same
// order, with its seq) is drawn as a heatmap over the frame that was sent, added to a running score
// chart, and timed: the round trip from send to reply.

import { ApiError, el, fmt, showError } from "./api.js";
import { FrameSeries, ScoreChart } from "./chart.js";
import { drawHeatmap, frameContext } from "./heatmap.js";
import { modelInfo } from "./models.js";

const MAX_IN_FLIGHT = 4; // frames sent and not yet answered; beyond it a tick is skipped (no queue build-up)
const MAX_WIDTH = 1280; // larger sources are scaled down before encoding
const CHART_FRAMES = 300;
const JPEG_QUALITY = 0.85;

const CLOSE_REASONS = {
  1003: "The server refused a frame that was not a PNG or JPEG image.",
  1007: "The server refused a control message that was not JSON.",
  1009: "A frame was larger than the server accepts.",
  1011: "The stream failed on the server.",
  1013: "No model is loaded on the server yet; try again once one is.",
  1006: "The connection to the server was lost.",
};

const $ = (id) => document.getElementById(id);
let ui;
let chart;
let session = null;
let source = null; // {kind: "file" | "webcam", url?, stream?}

export function initLive() {
  ui = {
    file: $("live-file"),
    webcam: $("live-webcam"),
    loop: $("live-loop"),
    fps: $("live-fps"),
    start: $("live-start"),
    stop: $("live-stop"),
    status: $("live-status"),
    error: $("live-error"),
    stats: $("live-stats"),
    canvas: $("live-canvas"),
    chart: $("live-chart"),
    video: $("live-video"),
  };
  chart = new ScoreChart(ui.chart);
  $("live-zoom").addEventListener("change", (event) => chart.setZoom(event.target.checked));
  renderStats();

  if (navigator.mediaDevices && typeof navigator.mediaDevices.getUserMedia === "function") {
    ui.webcam.hidden = false;
    ui.webcam.addEventListener("click", useWebcam);
  }
  ui.file.addEventListener("change", () => {
    const file = ui.file.files[0];
    if (file) useFile(file);
  });
  ui.loop.addEventListener("change", () => { ui.video.loop = ui.loop.checked; });
  ui.start.addEventListener("click", startStreaming);
  ui.stop.addEventListener("click", () => stopStreaming("Stopped."));
  ui.video.addEventListener("ended", () => {
    if (session && !ui.video.loop) finishWhenAnswered("The file has ended.");
  });
  ui.video.addEventListener("error", () => {
    if (source && source.kind === "file") {
      showError(ui.error, null);
      ui.error.hidden = false;
      ui.error.replaceChildren(el("span", { className: "plain" },
        "This browser cannot play this video file, so its frames cannot be streamed. Try a WebM or MP4 file, or score it in the \"Score a clip\" tab (the server decodes it there)."));
      ui.start.disabled = true;
    }
  });
}

function releaseSource() {
  if (!source) return;
  if (source.url) URL.revokeObjectURL(source.url);
  if (source.stream) for (const track of source.stream.getTracks()) track.stop();
  ui.video.removeAttribute("src");
  ui.video.srcObject = null;
  source = null;
}

function useFile(file) {
  if (session) stopStreaming("Stopped: a new source was chosen.");
  releaseSource();
  showError(ui.error, null);
  source = { kind: "file", url: URL.createObjectURL(file), name: file.name };
  ui.video.loop = ui.loop.checked;
  ui.video.src = source.url;
  ui.video.load();
  ui.start.disabled = false;
  ui.status.textContent = `Ready to stream ${file.name}.`;
}

async function useWebcam() {
  if (session) stopStreaming("Stopped: a new source was chosen.");
  releaseSource();
  showError(ui.error, null);
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 } }, audio: false });
    source = { kind: "webcam", stream };
    ui.video.srcObject = stream;
    await ui.video.play();
    ui.start.disabled = false;
    ui.status.textContent = "Webcam ready.";
  } catch (exc) {
    ui.start.disabled = true;
    ui.error.hidden = false;
    ui.error.replaceChildren(el("span", { className: "plain" },
      `The browser did not give access to a camera (${exc && exc.name ? exc.name : exc}).`));
  }
}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/stream`;
}

function startStreaming() {
  if (!source || session) return;
  showError(ui.error, null);
  const fps = Math.min(30, Math.max(1, Number(ui.fps.value) || 10));
  const ws = new WebSocket(wsUrl());
  session = {
    ws,
    fps,
    timer: null,
    nextSeq: 0,
    sent: 0,
    replies: 0,
    dropped: 0,
    errors: 0,
    skipped: 0,
    anomalous: 0,
    encoding: false,
    pending: new Map(), // seq -> {sentAt, bitmap}
    latencies: [],
    series: new FrameSeries(1024),
    version: null,
    started: performance.now(),
    stopping: false,
    closeReason: null,
  };
  const current = session;
  chart.setSeries(current.series);
  chart.from = 0;
  chart.span = 50;
  ui.start.disabled = true;
  ui.stop.disabled = false;
  ui.stats.dataset.state = "connecting";
  ui.status.textContent = "Connecting…";
  ws.addEventListener("open", async () => {
    if (session !== current) return;
    ws.send(JSON.stringify({ fps, maps: true }));
    ui.stats.dataset.state = "streaming";
    ui.status.textContent = `Streaming ${source && source.kind === "webcam" ? "the webcam" : source ? source.name : ""} at ${fps} fps…`;
    try {
      await ui.video.play();
    } catch (exc) {
      // a webcam is already playing; a file that cannot play reports through the video's error event
    }
    current.timer = setInterval(() => capture(current), 1000 / fps);
  });
  ws.addEventListener("message", (event) => onReply(current, event.data));
  ws.addEventListener("close", (event) => onClose(current, event));
  renderStats();
}

async function capture(current) {
  const video = ui.video;
  if (session !== current || current.ws.readyState !== WebSocket.OPEN || current.stopping) return;
  if (current.encoding) return;
  if (video.readyState < 2 || video.videoWidth === 0 || (video.paused && source && source.kind === "file")) return;
  if (current.pending.size >= MAX_IN_FLIGHT) {
    current.skipped++;
    renderStats();
    return;
  }
  current.encoding = true;
  try {
    const scale = Math.min(1, MAX_WIDTH / video.videoWidth);
    const w = Math.round(video.videoWidth * scale), h = Math.round(video.videoHeight * scale);
    const canvas = current.captureCanvas || (current.captureCanvas = document.createElement("canvas"));
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w;
      canvas.height = h;
    }
    canvas.getContext("2d").drawImage(video, 0, 0, w, h);
    const bitmap = await createImageBitmap(canvas);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", JPEG_QUALITY));
    if (!blob || session !== current || current.ws.readyState !== WebSocket.OPEN) {
      bitmap.close();
      return;
    }
    const seq = current.nextSeq++;
    current.pending.set(seq, { sentAt: performance.now(), bitmap });
    current.ws.send(blob);
    current.sent++;
    renderStats();
  } finally {
    current.encoding = false;
  }
}

async function onReply(current, data) {
  if (typeof data !== "string") return;
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    return;
  }
  if (msg.options) return; // acknowledgement of a control message
  if (msg.seq === undefined) {
    if (msg.error) showError(ui.error, new ApiError(0, msg.error.code, msg.error.message));
    return;
  }
  const entry = current.pending.get(msg.seq);
  current.pending.delete(msg.seq);
  const latency = entry ? performance.now() - entry.sentAt : null;
  if (msg.error) {
    if (msg.error.code === "overloaded") current.dropped++;
    else {
      current.errors++;
      showError(ui.error, new ApiError(0, msg.error.code, msg.error.message));
    }
    if (entry) entry.bitmap.close();
    renderStats();
    return;
  }
  current.replies++;
  if (msg.anomalous) current.anomalous++;
  if (latency !== null) {
    current.latencies.push(latency);
    if (current.latencies.length > 200) current.latencies.shift();
    current.lastLatency = latency;
  }
  const index = current.series.push(msg.score, msg.anomalous, msg.uncertain);
  // the chart fills up to CHART_FRAMES frames, then slides
  chart.span = Math.min(CHART_FRAMES, Math.max(50, index + 1));
  chart.from = Math.max(0, index + 1 - CHART_FRAMES);
  chart.requestDraw();
  if (msg.model_version && msg.model_version !== current.version) {
    current.version = msg.model_version;
    const info = await modelInfo(msg.model_version);
    current.geometry = info.patch && info.stride ? { patch: info.patch, stride: info.stride } : null;
    chart.setThreshold(info.threshold, info.band);
  }
  if (entry) {
    paint(entry.bitmap, msg, current.geometry);
    entry.bitmap.close();
  }
  current.last = msg;
  renderStats();
  if (current.stopping && current.pending.size === 0) stopStreaming(current.stopMessage);
}

function paint(bitmap, msg, geometry) {
  const w = bitmap.width, h = bitmap.height;
  const ctx = frameContext(ui.canvas, w, h);
  ctx.save();
  ctx.filter = "grayscale(1)";
  ctx.drawImage(bitmap, 0, 0, w, h);
  ctx.restore();
  const map = Array.isArray(msg.map) ? packRows(msg.map) : null;
  const drawn = map ? drawHeatmap(ctx, map, w, h, geometry, true) : false;
  if (msg.anomalous) {
    ctx.strokeStyle = "#dc2626";
    ctx.lineWidth = Math.max(2, w / 80);
    ctx.strokeRect(0, 0, w, h);
  }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ui.canvas.dataset.heatmap = drawn ? "drawn" : "none";
  ui.canvas.dataset.seq = String(msg.seq);
}

function packRows(map) {
  if (!map.length || !Array.isArray(map[0])) return null;
  const rows = map.length, cols = map[0].length;
  const data = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) data[r * cols + c] = Number(map[r][c]) || 0;
  return { rows, cols, data };
}

function finishWhenAnswered(message) {
  const current = session;
  if (!current) return;
  clearInterval(current.timer);
  current.stopping = true;
  current.stopMessage = message;
  if (current.pending.size === 0) stopStreaming(message);
  else setTimeout(() => session === current && stopStreaming(message), 5000);
}

function stopStreaming(message) {
  const current = session;
  if (!current) return;
  session = null;
  clearInterval(current.timer);
  for (const entry of current.pending.values()) entry.bitmap.close();
  current.pending.clear();
  if (current.ws.readyState === WebSocket.OPEN || current.ws.readyState === WebSocket.CONNECTING) current.ws.close(1000, "client stopped");
  if (source && source.kind === "file") ui.video.pause();
  if (source && source.kind === "webcam") releaseSource();
  ui.start.disabled = !source;
  ui.stop.disabled = true;
  ui.stats.dataset.state = "stopped";
  ui.status.textContent = message || "Stopped.";
  renderStats(current);
}

function onClose(current, event) {
  if (session !== current) return; // we closed it
  const reason = CLOSE_REASONS[event.code];
  stopStreaming(current.replies ? `The stream ended after ${current.replies} replies.` : "The stream ended.");
  if (event.code !== 1000 && event.code !== 1001) {
    ui.error.hidden = false;
    ui.error.dataset.code = `close_${event.code}`;
    const plain = reason || `The server closed the stream (code ${event.code}).`;
    ui.error.replaceChildren(el("span", { className: "plain" }, plain),
      event.reason ? el("span", { className: "detail" }, `Server said: ${event.reason}`) : "");
  }
}

function percentile(values, q) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

function renderStats(s = session) {
  const figure = (value, label, cls) => el("div", { className: cls || "" }, el("b", {}, value), el("small", {}, label));
  if (!s) {
    ui.stats.replaceChildren(figure("0", "replies"), figure("–", "round trip"));
    ui.stats.dataset.replies = "0";
    return;
  }
  const elapsed = (performance.now() - s.started) / 1000;
  const last = s.last;
  ui.stats.dataset.replies = String(s.replies);
  ui.stats.dataset.sent = String(s.sent);
  ui.stats.dataset.anomalous = String(s.anomalous);
  if (s.lastLatency !== undefined) ui.stats.dataset.latencyMs = s.lastLatency.toFixed(1);
  ui.stats.replaceChildren(...[
    figure(String(s.sent), "frames sent"),
    figure(String(s.replies), "replies"),
    figure(s.lastLatency !== undefined ? `${s.lastLatency.toFixed(0)} ms` : "–", "round trip (last)"),
    figure(s.latencies.length ? `${percentile(s.latencies, 0.5).toFixed(0)} / ${percentile(s.latencies, 0.95).toFixed(0)} ms` : "–", "median / p95"),
    figure(elapsed > 0.5 ? fmt(s.replies / elapsed, 1) : "–", "replies/s"),
    figure(last ? fmt(last.score, 3) : "–", last && last.anomalous ? "score: ANOMALOUS" : "score", last && last.anomalous ? "alarm" : ""),
    figure(String(s.anomalous), "anomalous frames", s.anomalous ? "alarm" : ""),
    figure(String(s.dropped + s.skipped), "dropped (busy)"),
    s.errors ? figure(String(s.errors), "frame errors", "alarm") : null,
    figure(s.version || "–", "model"),
  ].filter(Boolean));
}

