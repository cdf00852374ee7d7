// "Score a clip": upload with NDJSON streaming (frames appear as they are scored), then the score
// timeline (tau, reject band, anomalous segments) and a frame viewer: the browser decodes the same
// file locally (<video> + seek to the frame's timestamp) and the anomaly map is drawn over it. When
// the browser cannot play the codec (an MJPG AVI), the page asks the server for thumbnails (the
// anomalous frames and a sample of the rest, small JPEGs) and draws each frame's thumbnail, or the
// nearest one, under its map.

import { ApiError, apiFetch, el, fmt, readNdjson, showError } from "./api.js";
import { FLAG_ANOMALOUS, FLAG_UNCERTAIN, FrameSeries, ScoreChart } from "./chart.js";
import { drawHeatmap, drawLegend, frameContext, frameSizeForMap, packMap } from "./heatmap.js";
import { activeModel, modelInfo, onActiveModel } from "./models.js";

const MAX_SEGMENT_ITEMS = 300;
const VIDEO_PROBE_MS = 5000;

const $ = (id) => document.getElementById(id);

let ui;
let chart;
let clip = null; // the current clip's state (see newClip)
let runId = 0;

function newClip(file) {
  return {
    file,
    series: new FrameSeries(512),
    timestamps: [],
    maps: [],
    thumbs: { indices: [], images: [] }, // thumbnails by frame index, in index order
    processedSize: null, // [w, h]: the frame size the maps lie on (sent with thumbnails)
    summary: null,
    fps: 0,
    threshold: null,
    band: null,
    geometry: null,
    segments: [],
    selected: -1,
    video: null, // true: the browser plays it; false: map-only; null: still probing
    objectUrl: null,
    abort: new AbortController(),
    state: "uploading",
  };
}

export function initClip() {
  ui = {
    form: $("clip-form"),
    file: $("clip-file"),
    maps: $("clip-maps"),
    submit: $("clip-submit"),
    cancel: $("clip-cancel"),
    bar: $("clip-progress-bar"),
    status: $("clip-status"),
    error: $("clip-error"),
    results: $("clip-results"),
    summary: $("clip-summary"),
    timeline: $("timeline"),
    scrubber: $("scrubber"),
    canvas: $("frame-canvas"),
    note: $("frame-note"),
    readout: $("frame-readout"),
    prev: $("frame-prev"),
    next: $("frame-next"),
    play: $("frame-play"),
    overlay: $("frame-overlay"),
    segments: $("segments"),
    segmentCount: $("segment-count"),
    video: $("clip-video"),
  };
  chart = new ScoreChart(ui.timeline, { onSelect: (frame) => select(frame) });
  drawLegend($("map-legend"));

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    start();
  });
  ui.cancel.addEventListener("click", () => clip && clip.abort.abort());
  ui.scrubber.addEventListener("input", () => select(Number(ui.scrubber.value)));
  ui.prev.addEventListener("click", () => step(-1));
  ui.next.addEventListener("click", () => step(1));
  ui.play.addEventListener("click", togglePlay);
  ui.overlay.addEventListener("change", () => showFrame());
  $("timeline-zoom").addEventListener("change", (event) => chart.setZoom(event.target.checked));
  ui.timeline.addEventListener("keydown", (event) => {
    const jumps = { ArrowLeft: -1, ArrowRight: 1, PageUp: -10, PageDown: 10 };
    if (event.key in jumps) step(jumps[event.key] * (event.shiftKey ? 10 : 1));
    else if (event.key === "Home") select(0);
    else if (event.key === "End" && clip) select(clip.series.count - 1);
    else return;
    event.preventDefault();
  });
  onActiveModel((model) => {
    // before a clip's summary names its model, the active model's tau and band are shown
    if (clip && !clip.summary) applyModel(model.version);
  });
}

async function applyModel(version) {
  const info = await modelInfo(version);
  if (!clip) return;
  clip.threshold = clip.summary ? clip.summary.threshold : info.threshold;
  clip.band = info.band;
  clip.geometry = info.patch && info.stride ? { patch: info.patch, stride: info.stride } : null;
  chart.setThreshold(clip.threshold, clip.band);
}

function setProgress(fraction) {
  if (fraction === null) {
    ui.bar.classList.add("indeterminate");
    ui.bar.style.width = "";
  } else {
    ui.bar.classList.remove("indeterminate");
    ui.bar.style.width = `${Math.round(Math.min(1, Math.max(0, fraction)) * 100)}%`;
  }
}

function setState(state) {
  clip.state = state;
  ui.results.dataset.state = state;
  const busy = state === "uploading" || state === "scoring";
  ui.submit.disabled = busy;
  ui.cancel.hidden = !busy;
}

async function start() {
  const file = ui.file.files[0];
  showError(ui.error, null);
  if (!file) {
    ui.status.textContent = "Choose a video file first.";
    ui.file.focus();
    return;
  }
  stopPlaying();
  if (clip) {
    clip.abort.abort();
    if (clip.objectUrl) URL.revokeObjectURL(clip.objectUrl);
  }
  const run = ++runId;
  clip = newClip(file);
  const current = clip;
  chart.series = current.series;
  chart.span = 0;
  chart.fps = 0;
  chart.setCursor(-1);
  setState("uploading");
  ui.results.hidden = false;
  ui.results.dataset.frames = "0";
  ui.results.dataset.segments = "0";
  ui.summary.replaceChildren();
  ui.segments.replaceChildren();
  ui.segmentCount.textContent = "";
  ui.readout.replaceChildren();
  ui.note.textContent = "";
  ui.scrubber.max = "0";
  ui.canvas.dataset.heatmap = "none";
  clearCanvas();
  ui.status.textContent = `Checking whether this browser can play ${file.name}…`;
  setProgress(null);

  // the probe decides the request: a file the browser cannot play comes back with thumbnails
  const [playable] = await Promise.all([probeVideo(current), applyModel(activeModel() ? activeModel().version : null)]);
  if (run !== runId) return;
  ui.status.textContent = `Uploading ${file.name} (${formatBytes(file.size)}) and decoding…`;

  const started = performance.now();
  const form = new FormData();
  form.append("file", file, file.name);
  const query = `stream=true&maps=${ui.maps.checked ? "true" : "false"}${playable ? "" : "&thumbnails=anomalous"}`;
  try {
    const response = await apiFetch(`/v1/clips?${query}`, {
      method: "POST",
      body: form,
      headers: { Accept: "application/x-ndjson" },
      signal: current.abort.signal,
    });
    if (run !== runId) return;
    setState("scoring");
    let lastStatus = 0;
    await readNdjson(response, (line) => {
      if (run !== runId) return;
      if (line.type === "frame") {
        addFrame(current, line);
        const now = performance.now();
        if (now - lastStatus > 100) {
          lastStatus = now;
          updateStreamingStatus(current, started);
        }
      } else if (line.type === "thumbnail") {
        addThumbnail(current, line);
      } else if (line.type === "summary") {
        finish(current, line, started);
      } else if (line.type === "error") {
        throw new ApiError(200, line.error && line.error.code, line.error && line.error.message);
      }
    });
    if (run !== runId) return;
    if (!current.summary) throw new ApiError(200, "bad_response", "the stream ended without a summary");
  } catch (error) {
    if (run !== runId) return;
    const n = current.series.count;
    setState(error && error.name === "AbortError" ? "cancelled" : "error");
    setProgress(0);
    if (error && error.name === "AbortError") {
      ui.status.textContent = `Cancelled after ${n} frames.`;
    } else {
      showError(ui.error, error);
      ui.status.textContent = n ? `Stopped after ${n} scored frames.` : "";
    }
    if (n === 0) ui.results.hidden = true;
    else finishPartial(current);
  }
}

function addFrame(current, line) {
  const index = current.series.push(line.score, line.anomalous, line.uncertain);
  current.timestamps[index] = Number(line.timestamp_s) || 0;
  current.maps[index] = packMap(line.map);
  if (!current.fps && index === 1 && current.timestamps[1] > current.timestamps[0]) {
    current.fps = 1 / (current.timestamps[1] - current.timestamps[0]);
  }
  const duration = ui.video.duration;
  if (current.fps && Number.isFinite(duration) && duration > 0) chart.span = Math.round(duration * current.fps);
  ui.results.dataset.frames = String(current.series.count);
  chart.requestDraw();
}

/** A frame's thumbnail (base64 JPEG) as an image; the frame on screen is redrawn once it has decoded. */
function addThumbnail(current, line) {
  const image = new Image();
  image.src = `data:image/jpeg;base64,${line.jpeg}`;
  current.thumbs.indices.push(Number(line.index));
  current.thumbs.images.push(image);
  image.decode().then(() => {
    if (clip === current && current.selected >= 0 && nearestThumbnail(current, current.selected).image === image) showFrame();
  }, () => {});
}

/** The thumbnail of ``frame``, or of the nearest frame that has one: {index, image} or null. */
function nearestThumbnail(current, frame) {
  const { indices, images } = current.thumbs;
  if (!indices.length) return null;
  let lo = 0, hi = indices.length - 1;
  while (lo < hi) { // the first index >= frame
    const mid = (lo + hi) >> 1;
    if (indices[mid] < frame) lo = mid + 1;
    else hi = mid;
  }
  const k = lo > 0 && Math.abs(indices[lo - 1] - frame) <= Math.abs(indices[lo] - frame) ? lo - 1 : lo;
  return { index: indices[k], image: images[k] };
}

function updateStreamingStatus(current, started) {
  const n = current.series.count;
  const seconds = (performance.now() - started) / 1000;
  const duration = ui.video.duration;
  const t = current.timestamps[n - 1] || 0;
  let text = `Scored ${n} frames (${fmt(n / Math.max(seconds, 1e-3), 1)} frames/s)`;
  if (Number.isFinite(duration) && duration > 0) {
    setProgress(t / duration);
    text += ` · ${t.toFixed(1)} of ${duration.toFixed(1)} s`;
  }
  ui.status.textContent = text + "…";
}

function finish(current, summary, started) {
  current.summary = summary;
  current.fps = summary.fps || current.fps;
  current.threshold = summary.threshold;
  const size = summary.processed_size;
  if (size && size.width > 0 && size.height > 0) current.processedSize = [size.width, size.height];
  setState("done");
  setProgress(1);
  chart.span = 0;
  chart.fps = current.fps;
  const seconds = (performance.now() - started) / 1000;
  ui.status.textContent = `Done: ${current.series.count} frames scored in ${seconds.toFixed(1)} s by ${summary.model_version}.`;
  applyModel(summary.model_version).then(() => {
    renderSummary(current);
    showFrame();
  });
  afterFrames(current);
}

function finishPartial(current) {
  chart.span = 0;
  afterFrames(current);
}

/** Segments, scrubber, summary figures and the first frame to show, once no more frames come. */
function afterFrames(current) {
  current.segments = segmentsOf(current.series);
  const n = current.series.count;
  ui.scrubber.max = String(Math.max(0, n - 1));
  ui.results.dataset.frames = String(n);
  ui.results.dataset.segments = String(current.segments.length);
  ui.results.dataset.anomalousFrames = String(countFlag(current.series, FLAG_ANOMALOUS));
  renderSegments(current);
  renderSummary(current);
  chart.requestDraw();
  // start on the most anomalous frame: its map is the most telling
  let peak = 0;
  for (let i = 1; i < n; i++) if (current.series.scores[i] > current.series.scores[peak]) peak = i;
  select(n ? peak : -1);
}

function countFlag(series, flag) {
  let count = 0;
  for (let i = 0; i < series.count; i++) if (series.flags[i] & flag) count++;
  return count;
}

/** Runs of consecutive anomalous frames: [{start, end (inclusive), peak}] */
function segmentsOf(series) {
  const segments = [];
  let start = -1;
  for (let i = 0; i <= series.count; i++) {
    const on = i < series.count && series.flags[i] & FLAG_ANOMALOUS;
    if (on && start < 0) start = i;
    if (!on && start >= 0) {
      let peak = start;
      for (let k = start; k < i; k++) if (series.scores[k] > series.scores[peak]) peak = k;
      segments.push({ start, end: i - 1, peak });
      start = -1;
    }
  }
  return segments;
}

function renderSummary(current) {
  const s = current.summary;
  const n = current.series.count;
  const anomalous = countFlag(current.series, FLAG_ANOMALOUS);
  const uncertain = countFlag(current.series, FLAG_UNCERTAIN);
  const figure = (value, label, cls) => el("div", { className: cls || "" }, el("b", {}, value), el("small", {}, label));
  const items = [
    figure(String(n), "frames"),
    figure(`${anomalous}${n ? ` (${fmt((100 * anomalous) / n, 1)} %)` : ""}`, "anomalous frames", anomalous ? "alarm" : ""),
    figure(String(current.segments.length), "segments", current.segments.length ? "alarm" : ""),
    figure(String(uncertain), "uncertain"),
  ];
  if (s) {
    items.push(figure(s.model_version, "model"), figure(fmt(s.threshold, 3), "threshold τ"), figure(fmt(s.fps, 2), "fps"));
    if (s.timings) items.push(figure(`${fmt(s.timings.total_s, 2)} s`, "server time"));
  } else {
    items.push(figure("incomplete", "result"));
  }
  ui.summary.replaceChildren(...items);
}

function renderSegments(current) {
  const segs = current.segments;
  ui.segmentCount.textContent = segs.length ? `(${segs.length})` : "";
  if (!segs.length) {
    ui.segments.replaceChildren(el("li", { className: "note" }, "None: no frame went over τ."));
    return;
  }
  const items = segs.slice(0, MAX_SEGMENT_ITEMS).map((seg, k) => {
    const t0 = current.timestamps[seg.start], t1 = current.timestamps[seg.end];
    const frames = seg.end - seg.start + 1;
    return el("li", {},
      el("button", {
        type: "button",
        dataset: { segment: String(k), start: String(seg.start) },
        title: `Jump to frame ${seg.start}; peak at frame ${seg.peak}`,
        onclick: () => select(seg.start),
      }, frames === 1 ? formatTime(t0) : `${formatTime(t0)}–${formatTime(t1)}`),
      frames === 1 ? ` frame ${seg.start}, score ${fmt(current.series.scores[seg.peak], 3)}`
        : ` frames ${seg.start}–${seg.end} (${frames}), peak ${fmt(current.series.scores[seg.peak], 3)}`);
  });
  if (segs.length > MAX_SEGMENT_ITEMS) items.push(el("li", { className: "note" }, `…and ${segs.length - MAX_SEGMENT_ITEMS} more (see the timeline).`));
  ui.segments.replaceChildren(...items);
}

// ------------------------------------------------------------------ frame selection and drawing

function select(frame) {
  if (!clip || frame < 0 || frame >= clip.series.count) return;
  clip.selected = frame;
  chart.setCursor(frame);
  ui.scrubber.value = String(frame);
  ui.results.dataset.selected = String(frame);
  renderReadout();
  for (const button of ui.segments.querySelectorAll("button[data-segment]")) {
    const seg = clip.segments[Number(button.dataset.segment)];
    button.classList.toggle("current", Boolean(seg) && frame >= seg.start && frame <= seg.end);
  }
  showFrame();
}

function step(delta) {
  if (!clip || clip.series.count === 0) return;
  select(Math.min(clip.series.count - 1, Math.max(0, clip.selected + delta)));
}

function renderReadout() {
  const i = clip.selected;
  const flags = clip.series.flags[i];
  const map = clip.maps[i];
  let mapMax = null;
  if (map) mapMax = map.data.reduce((a, b) => Math.max(a, b), 0);
  const flag = flags & FLAG_ANOMALOUS
    ? el("span", { className: "flag anomalous" }, "anomalous")
    : flags & FLAG_UNCERTAIN
      ? el("span", { className: "flag uncertain" }, "uncertain")
      : el("span", { className: "flag normal" }, "normal");
  ui.readout.replaceChildren(
    el("div", {}, el("b", {}, `Frame ${i}`), ` of ${clip.series.count} · ${formatTime(clip.timestamps[i])}`, flag),
    el("div", {}, `score ${fmt(clip.series.scores[i], 4)}`, clip.threshold !== null ? ` (τ ${fmt(clip.threshold, 3)})` : ""),
    mapMax !== null ? el("div", {}, `hottest patch ${fmt(mapMax, 3)} on the map`) : "",
  );
}

let playing = null;

function togglePlay() {
  if (playing) stopPlaying();
  else startPlaying();
}

function startPlaying() {
  if (!clip || clip.series.count === 0) return;
  if (clip.selected >= clip.series.count - 1) select(0);
  const fps = Math.min(clip.fps || 10, 25);
  ui.play.textContent = "Pause";
  playing = setInterval(() => {
    if (seek.busy) return; // wait for the previous frame to be on screen
    if (clip.selected >= clip.series.count - 1) stopPlaying();
    else step(1);
  }, 1000 / fps);
}

function stopPlaying() {
  if (playing) clearInterval(playing);
  playing = null;
  if (ui) ui.play.textContent = "Play";
}

/** Probes whether this browser can decode the file: resolves true / false (also kept in clip.video). */
function probeVideo(current) {
  const video = ui.video;
  current.objectUrl = URL.createObjectURL(current.file);
  return new Promise((resolve) => {
    let settled = false;
    const settle = (ok) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      video.removeEventListener("loadeddata", onData);
      video.removeEventListener("error", onError);
      resolve(ok);
      if (clip !== current) return;
      current.video = ok;
      if (current.selected >= 0) showFrame();
    };
    const onData = () => settle(video.videoWidth > 0);
    const onError = () => settle(false);
    const timer = setTimeout(() => settle(false), VIDEO_PROBE_MS);
    video.addEventListener("loadeddata", onData);
    video.addEventListener("error", onError);
    video.src = current.objectUrl;
    video.load();
  });
}

const seek = { busy: false, wanted: -1, timer: null };

/** Draws the selected frame: video frame (when playable) + heatmap. Seeks are serialised. */
function showFrame() {
  if (!clip || clip.selected < 0) return;
  if (clip.video === null) {
    paint(clip.selected, null); // map alone until the probe answers
    return;
  }
  if (!clip.video) {
    paint(clip.selected, null);
    return;
  }
  seek.wanted = clip.selected;
  if (!seek.busy) seekTo(seek.wanted);
}

function seekTo(frame) {
  const video = ui.video;
  const current = clip;
  const fps = current.fps || 10;
  const duration = Number.isFinite(video.duration) ? video.duration : Infinity;
  // a quarter frame past the frame's timestamp, so rounding never lands on the previous frame
  const target = Math.max(0, Math.min(current.timestamps[frame] + 0.25 / fps, duration - 0.5 / fps));
  const done = () => {
    clearTimeout(seek.timer);
    video.removeEventListener("seeked", done);
    seek.busy = false;
    if (clip !== current) return;
    paint(frame, video);
    if (seek.wanted !== frame && seek.wanted >= 0) seekTo(seek.wanted);
  };
  seek.busy = true;
  if (Math.abs(video.currentTime - target) < 1e-6 && video.readyState >= 2) {
    done();
    return;
  }
  video.addEventListener("seeked", done);
  seek.timer = setTimeout(() => {
    // the browser never finished the seek: show the map alone
    video.removeEventListener("seeked", done);
    seek.busy = false;
    if (clip === current) paint(frame, null);
  }, 3000);
  video.currentTime = target;
}

function clearCanvas() {
  const ctx = ui.canvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#111827";
  ctx.fillRect(0, 0, ui.canvas.width, ui.canvas.height);
}

/** The frame's size on the canvas: the video's, else the size the maps lie on, else the map's extent. */
function frameSize(current, map, video) {
  if (video) return [video.videoWidth, video.videoHeight];
  if (current.processedSize) return current.processedSize;
  return map ? frameSizeForMap(map, current.geometry) : [320, 240];
}

function paint(frame, video) {
  const current = clip;
  const map = current.maps[frame];
  const geometry = current.geometry;
  const hasVideo = Boolean(video && video.videoWidth);
  const thumb = hasVideo ? null : nearestThumbnail(current, frame);
  const hasThumb = Boolean(thumb && thumb.image.complete && thumb.image.naturalWidth);
  const [w, h] = frameSize(current, map, hasVideo ? video : null);
  const ctx = frameContext(ui.canvas, w, h);
  ctx.fillStyle = "#111827";
  ctx.fillRect(0, 0, w, h);
  if (hasVideo || hasThumb) {
    ctx.save();
    ctx.filter = "grayscale(1)"; // what the detector sees: the frame in gray levels
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(hasVideo ? video : thumb.image, 0, 0, w, h); // a thumbnail is stretched to the maps' frame
    ctx.restore();
  }
  const background = hasVideo || hasThumb;
  const wantMap = ui.overlay.checked || !background;
  const drawn = wantMap && map ? drawHeatmap(ctx, map, w, h, geometry, background) : false;
  if (!background && !map) {
    ctx.fillStyle = "#9ca3af";
    ctx.font = "14px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(current.video === null ? "loading the video…" : "nothing to draw for this frame", w / 2, h / 2);
  }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ui.canvas.dataset.frame = String(frame);
  ui.canvas.dataset.background = hasVideo ? "video" : hasThumb ? "thumbnail" : "none";
  if (hasThumb) ui.canvas.dataset.thumbnail = String(thumb.index);
  else delete ui.canvas.dataset.thumbnail;
  ui.canvas.dataset.heatmap = drawn ? "drawn" : "none";
  const thumbText = hasThumb
    ? `This browser cannot play the video's codec: the frame is the server's thumbnail${thumb.index === frame ? "" : ` of frame ${thumb.index}, the nearest one sent`}.`
    : "";
  if (!map && hasThumb) ui.note.textContent = `${thumbText} No anomaly maps for this clip (the "anomaly maps" box was off).`;
  else if (!map && current.video === false) ui.note.textContent = "No anomaly maps for this clip (the \"anomaly maps\" box was off), and this browser cannot play the video's codec: only the scores are shown.";
  else if (!map) ui.note.textContent = "No anomaly maps for this clip (the \"anomaly maps\" box was off).";
  else if (hasThumb) ui.note.textContent = drawn ? `${thumbText} Its anomaly map over it: blue below τ, yellow at τ, red above.` : thumbText;
  else if (current.video === false) ui.note.textContent = "This browser cannot play the video's codec, so the anomaly map is shown alone (one cell per patch).";
  else if (current.video === null) ui.note.textContent = "Loading the video in the browser…";
  else ui.note.textContent = "The frame in gray levels (what the detector sees) with its anomaly map: blue below τ, yellow at τ, red above.";
}

function formatTime(seconds) {
  if (!Number.isFinite(seconds)) return "–";
  const m = Math.floor(seconds / 60);
  const s = seconds - m * 60;
  return m ? `${m}:${s.toFixed(1).padStart(4, "0")}` : `${s.toFixed(2)} s`;
}

function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}
