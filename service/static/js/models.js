// The side panel: the active model and its manifest figures, all published versions (with
// activation, API key kept in sessionStorage only), and training jobs (polled; absent on servers
// without the endpoint).

import { ApiError, apiFetch, authHeaders, el, fmt, getApiKey, getJSON, setApiKey, showError } from "./api.js";

const manifests = new Map(); // version -> manifest
let active = null; // GET /v1/models/active body
const listeners = new Set();

/** Calls fn(activeModel) now (when known) and whenever the active version changes. */
export function onActiveModel(fn) {
  listeners.add(fn);
  if (active) fn(active);
}

export function activeModel() {
  return active;
}

/** {threshold, band, patch, stride} of a version, from its manifest (fetched once). */
export async function modelInfo(version) {
  if (version && !manifests.has(version)) {
    try {
      await refreshVersions();
    } catch {
      // fall back to the active model below
    }
  }
  const manifest = (version && manifests.get(version)) || (active && active.manifest) || null;
  if (!manifest) return { threshold: active ? active.threshold : null, band: null, patch: null, stride: null };
  const calibration = manifest.calibration || {};
  const config = manifest.model_config || {};
  return {
    threshold: finiteOrNull(calibration.threshold),
    band: calibration.reject_band || null,
    patch: config.patch_size || null,
    stride: config.stride || null,
  };
}

/** tau and its band live in a manifest's calibration only (manifests up to v0003 repeated them at the top). */
function finiteOrNull(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

export function initModels() {
  const keyInput = document.getElementById("api-key");
  keyInput.value = getApiKey();
  keyInput.addEventListener("change", () => setApiKey(keyInput.value.trim()));
  keyInput.addEventListener("input", () => setApiKey(keyInput.value.trim()));

  refreshActive();
  refreshVersions().catch((error) => showError(document.getElementById("versions-error"), error));
  setInterval(() => {
    if (!document.hidden) refreshActive();
  }, 15000);
  pollJobs();
}

async function refreshActive() {
  const badge = document.getElementById("model-badge");
  const errorBox = document.getElementById("model-error");
  try {
    const body = await getJSON("/v1/models/active");
    const changed = !active || active.version !== body.version || active.loaded_at !== body.loaded_at;
    active = body;
    if (body.manifest) manifests.set(body.version, body.manifest);
    showError(errorBox, null);
    badge.textContent = `model ${body.version} · ${body.device}`;
    badge.className = "badge ok";
    badge.dataset.version = body.version;
    if (changed) {
      renderActive(body);
      for (const fn of listeners) fn(body);
      renderVersionsTable();
    }
  } catch (error) {
    badge.textContent = error instanceof ApiError && error.code === "not_ready" ? "no model loaded" : "server unreachable";
    badge.className = "badge bad";
    delete badge.dataset.version;
    showError(errorBox, error);
    document.getElementById("model-active").replaceChildren();
  }
}

function renderActive(model) {
  const m = model.manifest || {};
  const cal = m.calibration || {};
  const val = m.validation || {};
  const footage = m.training_footage || {};
  const band = cal.reject_band;
  const rows = (pairs) =>
    el("dl", {}, ...pairs.filter(([, v]) => v !== undefined && v !== null && v !== "").flatMap(([k, v, title]) => [
      el("dt", { title }, k),
      el("dd", {}, v),
    ]));
  const parts = [
    rows([
      ["version", model.version],
      ["device", model.device],
      ["input", model.input_mode],
      ["patch / stride", `${model.patch_size} / ${model.stride}`],
      ["loaded", model.loaded_at ? new Date(model.loaded_at * (model.loaded_at < 1e12 ? 1000 : 1)).toLocaleString() : null],
      ["created", m.created_at ? String(m.created_at).replace("T", " ").slice(0, 19) : null],
      ["parent", m.parent_version],
    ]),
    el("h3", {}, "Calibration"),
    rows([
      ["threshold τ", fmt(finiteOrNull(cal.threshold), 4)],
      ["reject band", band ? `${fmt(band[0], 4)} … ${fmt(band[1], 4)}` : null, "frame scores in this band are reported 'uncertain'"],
      ["score", cal.score_mode],
      ["smoothing", cal.smoothing_frames !== undefined ? `${cal.smoothing_frames} frame${cal.smoothing_frames === 1 ? "" : "s"}` : null, "causal mean of the frame scores over this many frames"],
      ["false alarms", cal.false_alarm_rate !== undefined ? `${fmt(cal.false_alarm_rate * 100, 2)} % of normal frames` : null],
    ]),
    el("h3", {}, "Validation"),
    rows([
      ["separation AUC", fmt(val.separation_auc, 4), "held-out normal patches vs. their distorted versions"],
      ["holdout recon.", fmt(val.holdout_reconstruction, 4)],
      ["epochs", val.epochs],
      ["training time", val.seconds !== undefined ? `${fmt(val.seconds, 1)} s` : null],
      ["phase two", m.phase_two ? `${m.phase_two.steps} steps against ${m.phase_two.negatives.join(", ")}` : null,
        "D retrained against R's output of normal patches and of pseudo-anomalies"],
      ["footage", footage.clips !== undefined ? `${footage.clips} clips, ${footage.frames} frames` : null],
    ]),
  ];
  const ped2 = m.ped2;
  if (ped2 && typeof ped2 === "object") {
    const served = ped2.served || {};
    const scores = ped2.scores || {};
    parts.push(el("h3", {}, "UCSD Ped2 (test set)"));
    parts.push(rows([
      ["served AUC", fmt(served.auc, 4), ped2.protocol],
      ["served EER", fmt(served.eer, 4)],
      ["detection at τ", served.detection_rate_at_tau !== undefined ? `${fmt(served.detection_rate_at_tau * 100, 1)} %` : null],
      ["false alarms at τ", served.false_alarm_rate_at_tau !== undefined ? `${fmt(served.false_alarm_rate_at_tau * 100, 1)} %` : null],
      ...Object.entries(scores).map(([mode, f]) => [`${mode} AUC`, fmt(f && f.auc, 4)]),
      ["fused AUC", ped2.fused ? fmt(ped2.fused.auc, 4) : null],
      ["motion AUC", ped2.baselines && ped2.baselines.motion ? fmt(ped2.baselines.motion.auc, 4) : null,
        "baseline: the flow speed of the fastest patch, no network"],
      ["injected objects", ped2.injected ? `AUC ${fmt(ped2.injected.auc, 4)}, ${fmt(ped2.injected.detected_at_tau * 100, 1)} % flagged at τ` : null,
        "foreign objects pasted into normal test frames (vad eval --inject appearance)"],
      ["frames", ped2.frames],
    ]));
  }
  const box = document.getElementById("model-active");
  box.replaceChildren(...parts);
  box.dataset.version = model.version;
}

let versions = [];

async function refreshVersions() {
  const body = await getJSON("/v1/models");
  versions = Array.isArray(body.versions) ? body.versions : [];
  for (const entry of versions) if (entry.manifest) manifests.set(entry.version, entry.manifest);
  showError(document.getElementById("versions-error"), null);
  renderVersionsTable(body.active);
}

function renderVersionsTable(activeVersion) {
  const current = activeVersion || (active && active.version);
  const tbody = document.querySelector("#versions tbody");
  const rows = [...versions].reverse().map((entry) => {
    const m = entry.manifest || {};
    const cal = m.calibration || {};
    const isActive = entry.version === current;
    const ped2 = m.ped2 && m.ped2.served ? m.ped2.served.auc : null;
    const action = isActive
      ? el("span", { className: "tag" }, "active")
      : entry.error
        ? el("span", { className: "broken", title: entry.error }, "unreadable")
        : el("button", { type: "button", dataset: { version: entry.version }, onclick: () => activate(entry.version) }, "Activate");
    return el("tr", { className: isActive ? "active" : "" },
      el("td", { title: m.created_at || "" }, entry.version),
      el("td", {}, fmt(finiteOrNull(cal.threshold), 3)),
      el("td", {}, fmt(m.validation ? m.validation.separation_auc : null, 3)),
      el("td", {}, fmt(ped2, 3)),
      el("td", {}, action));
  });
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colspan: 5, className: "note" }, "No published versions.")));
  tbody.replaceChildren(...rows);
}

async function activate(version) {
  const status = document.getElementById("versions-status");
  const errorBox = document.getElementById("versions-error");
  showError(errorBox, null);
  status.textContent = `Activating ${version}: verifying and test-scoring…`;
  for (const button of document.querySelectorAll("#versions button")) button.disabled = true;
  let failure = null;
  try {
    const response = await apiFetch(`/v1/models/${encodeURIComponent(version)}/activate`, {
      method: "POST",
      headers: { Accept: "application/json", ...authHeaders() },
    });
    const body = await response.json();
    status.textContent = body.changed ? `Now serving ${body.version} (was ${body.previous || "none"}).` : `${body.version} was already serving.`;
  } catch (error) {
    status.textContent = "";
    failure = error;
  }
  await refreshActive();
  await refreshVersions().catch((error) => { failure = failure || error; });
  showError(errorBox, failure); // after the refresh, which clears the box when it succeeds
  if (failure instanceof ApiError && (failure.code === "unauthorized" || failure.code === "forbidden")) {
    document.getElementById("api-key").focus();
  }
}

// ------------------------------------------------------------------ training jobs

const ACTIVE_STATES = new Set(["queued", "running"]);
let jobsTimer = null;
const knownFinished = new Set();

async function pollJobs() {
  clearTimeout(jobsTimer);
  let delay = 10000;
  const list = document.getElementById("jobs");
  const status = document.getElementById("jobs-status");
  const errorBox = document.getElementById("jobs-error");
  if (document.hidden) {
    jobsTimer = setTimeout(pollJobs, 3000);
    return;
  }
  try {
    const body = await getJSON("/v1/training-jobs");
    const jobs = Array.isArray(body) ? body : body.jobs || body.items || body.training_jobs || [];
    showError(errorBox, null);
    list.dataset.available = "true";
    status.textContent = jobs.length ? "" : "No training jobs.";
    list.replaceChildren(...jobs.slice(0, 50).map(renderJob));
    let newlyFinished = false;
    for (const job of jobs) {
      const state = String(job.state || job.status || "").toLowerCase();
      if (ACTIVE_STATES.has(state)) delay = 2000;
      else if (job.version && !knownFinished.has(jobId(job))) {
        knownFinished.add(jobId(job));
        newlyFinished = true;
      }
    }
    if (newlyFinished) refreshVersions().catch(() => {});
  } catch (error) {
    if (error instanceof ApiError && (error.status === 404 || error.status === 405)) {
      list.dataset.available = "false";
      list.replaceChildren();
      showError(errorBox, null);
      status.textContent = "This server does not run training jobs.";
      delay = 60000;
    } else {
      showError(errorBox, error);
      delay = 15000;
    }
  }
  jobsTimer = setTimeout(pollJobs, delay);
}

function jobId(job) {
  return String(job.id ?? job.job_id ?? "");
}

function progressFraction(progress) {
  if (typeof progress === "number" && Number.isFinite(progress)) return progress > 1 ? progress / 100 : progress;
  if (progress && typeof progress === "object") {
    if (typeof progress.fraction === "number") return progress.fraction;
    if (typeof progress.percent === "number") return progress.percent / 100;
    const done = progress.epoch ?? progress.step ?? progress.done;
    const total = progress.max_epochs ?? progress.epochs ?? progress.total_steps ?? progress.total;
    if (typeof done === "number" && typeof total === "number" && total > 0) return done / total;
  }
  return null;
}

function progressText(progress) {
  if (progress === null || progress === undefined) return "";
  if (typeof progress !== "object") return "";
  const parts = [];
  const epoch = progress.epoch, total = progress.max_epochs ?? progress.epochs;
  if (epoch !== undefined) parts.push(`epoch ${epoch}${total !== undefined ? "/" + total : ""}`);
  if (progress.phase || progress.stage) parts.push(progress.phase || progress.stage);
  if (progress.phase_two) parts.push(`D step ${progress.phase_two.step}/${progress.phase_two.steps}`);
  if (progress.message) parts.push(progress.message);
  return parts.join(" · ");
}

function renderJob(job) {
  const state = String(job.state || job.status || "unknown").toLowerCase();
  const fraction = progressFraction(job.progress);
  const errorText = job.error ? (typeof job.error === "object" ? job.error.message || job.error.code : String(job.error)) : "";
  const created = job.created_at || job.submitted_at;
  const bar = el("div", { className: "jobbar" }, el("div"));
  if (fraction !== null) bar.firstChild.style.width = `${Math.round(Math.min(1, Math.max(0, fraction)) * 100)}%`;
  return el("li", { dataset: { job: jobId(job), state } },
    el("div", { className: "head" },
      el("b", {}, `#${jobId(job).slice(0, 8)}`),
      el("span", { className: `state ${state}` }, state),
      job.version ? el("span", {}, `→ ${job.version}`) : null),
    fraction !== null && ACTIVE_STATES.has(state) ? bar : null,
    el("div", { className: "meta" },
      [fraction !== null ? `${Math.round(fraction * 100)} %` : "", progressText(job.progress), created ? `submitted ${String(created).replace("T", " ").slice(0, 19)}` : ""]
        .filter(Boolean).join(" · ")),
    activationText(job.activation) ? el("div", { className: "meta" }, activationText(job.activation)) : null,
    errorText ? el("div", { className: "jerr" }, errorText) : null,
    (state === "queued" || state === "running") && !job.cancel_requested
      ? el("button", { type: "button", className: "link", dataset: { cancel: jobId(job) }, onclick: () => cancelJob(jobId(job)) }, "Cancel")
      : job.cancel_requested && !isFinished(state) ? el("div", { className: "meta" }, "cancel requested…") : null);
}

function isFinished(state) {
  return state === "succeeded" || state === "failed" || state === "cancelled";
}

function activationText(activation) {
  if (!activation || typeof activation !== "object") return "";
  const decision = activation.decision || activation.state || "";
  return [decision && `activation: ${decision}`, activation.reason].filter(Boolean).join(" · ");
}

async function cancelJob(id) {
  const errorBox = document.getElementById("jobs-error");
  showError(errorBox, null);
  try {
    await apiFetch(`/v1/training-jobs/${encodeURIComponent(id)}`, {
      method: "DELETE",
      headers: { Accept: "application/json", ...authHeaders() },
    });
  } catch (error) {
    showError(errorBox, error);
  }
  pollJobs();
}
