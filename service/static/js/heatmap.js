// Anomaly maps: the server sends, per frame, the patch grid (rows x cols) of values in [0, 1] where
// 0.5 is the threshold tau. They are drawn as a heatmap over the frame: cool and faint below tau,
// hot and opaque above it.

const STOPS = [
  [0.0, [30, 40, 120]],
  [0.3, [40, 130, 200]],
  [0.45, [90, 200, 160]],
  [0.5, [250, 225, 60]],
  [0.7, [250, 130, 30]],
  [1.0, [215, 25, 30]],
];

function colourAt(v) {
  for (let i = 1; i < STOPS.length; i++) {
    const [v1, c1] = STOPS[i];
    if (v <= v1) {
      const [v0, c0] = STOPS[i - 1];
      const t = (v - v0) / (v1 - v0 || 1);
      return c0.map((c, k) => Math.round(c + t * (c1[k] - c)));
    }
  }
  return STOPS[STOPS.length - 1][1];
}

function smoothstep(a, b, x) {
  const t = Math.min(1, Math.max(0, (x - a) / (b - a)));
  return t * t * (3 - 2 * t);
}

/** 256-entry RGBA tables: opaque (heatmap alone) and overlay (alpha grows towards and past tau). */
const LUT_OPAQUE = new Uint8ClampedArray(256 * 4);
const LUT_OVERLAY = new Uint8ClampedArray(256 * 4);
for (let i = 0; i < 256; i++) {
  const v = i / 255;
  const [r, g, b] = colourAt(v);
  LUT_OPAQUE.set([r, g, b, 255], i * 4);
  LUT_OVERLAY.set([r, g, b, Math.round(255 * (0.08 + 0.72 * smoothstep(0.2, 0.6, v)))], i * 4);
}

/** A map as sent ([[...], ...]) -> {rows, cols, data: Float32Array}; null when absent or malformed. */
export function packMap(map) {
  if (!Array.isArray(map) || map.length === 0 || !Array.isArray(map[0])) return null;
  const rows = map.length;
  const cols = map[0].length;
  const data = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const row = map[r];
    for (let c = 0; c < cols; c++) data[r * cols + c] = Number(row[c]) || 0;
  }
  return { rows, cols, data };
}

const scratch = document.createElement("canvas");

/**
 * Draws ``map`` onto ``ctx`` over a frame of frameW x frameH pixels (the canvas's coordinates).
 * ``geometry`` {patch, stride} places cell (r, c) centred on its patch; without it the grid is
 * stretched over the whole frame.
 */
export function drawHeatmap(ctx, map, frameW, frameH, geometry, overlay) {
  if (!map) return false;
  const { rows, cols, data } = map;
  scratch.width = cols;
  scratch.height = rows;
  const sctx = scratch.getContext("2d");
  const image = sctx.createImageData(cols, rows);
  const lut = overlay ? LUT_OVERLAY : LUT_OPAQUE;
  for (let i = 0; i < rows * cols; i++) {
    const v = Math.min(255, Math.max(0, Math.round(data[i] * 255)));
    image.data.set(lut.subarray(v * 4, v * 4 + 4), i * 4);
  }
  sctx.putImageData(image, 0, 0);
  let x = 0, y = 0, w = frameW, h = frameH;
  if (geometry && geometry.patch && geometry.stride) {
    const { patch, stride } = geometry;
    x = patch / 2 - stride / 2;
    y = patch / 2 - stride / 2;
    w = cols * stride;
    h = rows * stride;
  }
  ctx.save();
  // over a frame: smooth (the map reads as a heat haze); alone: one crisp cell per patch
  ctx.imageSmoothingEnabled = overlay;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(scratch, x, y, w, h);
  ctx.restore();
  return true;
}

/** The canvas sized for a w x h frame, scaled up (at most 8x) to about 480 px wide; its 2D context
 * draws in frame pixels. */
export function frameContext(canvas, w, h) {
  const scale = Math.max(1, Math.min(8, Math.ceil(480 / w)));
  if (canvas.width !== w * scale || canvas.height !== h * scale) {
    canvas.width = w * scale;
    canvas.height = h * scale;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(scale, 0, 0, scale, 0, 0);
  return ctx;
}

/** The frame size a map covers when the video itself cannot be shown. */
export function frameSizeForMap(map, geometry) {
  if (geometry && geometry.patch && geometry.stride) {
    return [(map.cols - 1) * geometry.stride + geometry.patch, (map.rows - 1) * geometry.stride + geometry.patch];
  }
  return [map.cols * 30, map.rows * 30];
}

/** Paints the colour scale into a small legend canvas. */
export function drawLegend(canvas) {
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(canvas.width, canvas.height);
  for (let x = 0; x < canvas.width; x++) {
    const v = Math.round((x / (canvas.width - 1)) * 255);
    for (let y = 0; y < canvas.height; y++) image.data.set(LUT_OPAQUE.subarray(v * 4, v * 4 + 4), (y * canvas.width + x) * 4);
  }
  ctx.putImageData(image, 0, 0);
  ctx.fillStyle = "#111";
  ctx.fillRect(Math.round(canvas.width / 2), 0, 1, canvas.height);
}
