// Talking to the API: fetch wrappers that turn {"error": {"code", "message"}} bodies (and network
// failures) into ApiError, and plain-words explanations of every error code the server sends.

const KEY_STORAGE = "vad.apiKey";

/** Plain words for each error code (docs/server.md); the server's own message is shown after them. */
const PLAIN = {
  bad_request: "The server could not read the upload (the request was malformed).",
  unauthorized: "This needs the server's API key: type it in the API key box and try again.",
  forbidden: "The API key was not accepted.",
  version_not_found: "That model version does not exist on the server.",
  not_found: "The server has no such page or endpoint.",
  method_not_allowed: "The server does not allow this action here.",
  too_large: "The file is too large for this server.",
  unsupported_media_type: "This file is not a video the server recognises.",
  empty_upload: "The file is empty.",
  undecodable: "The server could not decode this video: it may be damaged or use a codec the server cannot read.",
  limit_exceeded: "The video is over the server's limits (frame size or number of frames).",
  frame_too_small: "The frames are smaller than one detector patch.",
  missing_file: "No file was sent.",
  invalid_request: "The request had an invalid setting.",
  invalid_control: "The stream refused a setting.",
  version_rejected: "The server refused this version: it failed verification or its test run, so the previous model keeps serving.",
  inference_failed: "Scoring failed on the server.",
  internal: "The server hit an internal error.",
  overloaded: "The server is busy right now; try again in a moment.",
  not_ready: "No model is loaded on the server yet.",
  cameras_disabled: "This server watches no cameras: its VAD_CAMERA_URL_ALLOW list is empty.",
  camera_url_refused: "The server may not open this camera URL (not in VAD_CAMERA_URL_ALLOW, or a file outside VAD_FOOTAGE_ROOT).",
  invalid_camera_url: "The camera URL is not valid.",
  camera_not_found: "There is no camera of that name (any more).",
  camera_exists: "A camera of that name exists already: choose another name.",
  too_many_cameras: "The server watches as many cameras as it may (VAD_MAX_CAMERAS): remove one first.",
  no_frame_yet: "The camera has no scored frame yet.",
  network: "Could not reach the server. Is it still running?",
  bad_response: "The server sent a reply this page does not understand.",
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code);
    this.status = status;
    this.code = code;
    this.serverMessage = message || "";
  }
}

/** One sentence for a person, plus the server's details. */
export function explain(error) {
  if (error instanceof ApiError) {
    const plain = PLAIN[error.code] || `The server answered with an error (${error.code}${error.status ? ", HTTP " + error.status : ""}).`;
    return { plain, detail: error.serverMessage && error.serverMessage !== error.code ? error.serverMessage : "" };
  }
  if (error && error.name === "AbortError") return { plain: "Cancelled.", detail: "" };
  return { plain: PLAIN.network, detail: error ? String(error.message || error) : "" };
}

/** Shows an error in a role=alert box (plain words, then the server's message in small print). */
export function showError(box, error) {
  if (!error) {
    box.hidden = true;
    box.replaceChildren();
    box.removeAttribute("data-code");
    return;
  }
  const { plain, detail } = explain(error);
  const main = document.createElement("span");
  main.className = "plain";
  main.textContent = plain;
  box.replaceChildren(main);
  if (detail) {
    const small = document.createElement("span");
    small.className = "detail";
    small.textContent = `Server said: ${detail}`;
    box.append(small);
  }
  box.dataset.code = error instanceof ApiError ? error.code : "network";
  box.hidden = false;
}

export async function errorFromResponse(response) {
  let code = `http_${response.status}`;
  let message = response.statusText;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message);
}

/** fetch() that throws ApiError for non-2xx answers and for network failures. */
export async function apiFetch(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { cache: "no-store", ...options });
  } catch (exc) {
    if (exc && exc.name === "AbortError") throw exc;
    throw new ApiError(0, "network", String(exc && exc.message ? exc.message : exc));
  }
  if (!response.ok) throw await errorFromResponse(response);
  return response;
}

export async function getJSON(path, options = {}) {
  const response = await apiFetch(path, { headers: { Accept: "application/json" }, ...options });
  try {
    return await response.json();
  } catch (exc) {
    throw new ApiError(response.status, "bad_response", String(exc));
  }
}

export function getApiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled: the key simply is not remembered
  }
}

/** Headers for state-changing calls: the Bearer key when the user gave one. */
export function authHeaders() {
  const key = getApiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** Reads an NDJSON response body line by line as it streams in; calls onLine(object) per line. */
export async function readNdjson(response, onLine) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      if (line) onLine(parseLine(line));
    }
  }
  buffer += decoder.decode();
  if (buffer.trim()) onLine(parseLine(buffer.trim()));
}

function parseLine(line) {
  try {
    return JSON.parse(line);
  } catch (exc) {
    throw new ApiError(0, "bad_response", `unreadable line: ${line.slice(0, 80)}`);
  }
}

/** Small formatting helpers shared by the views. */
export function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
  return value.toFixed(digits);
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "className") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
