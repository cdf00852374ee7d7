// Frame-score charts on a canvas. Long clips (thousands of frames) are decimated to the canvas width:
// each pixel column shows the min..max of the frames it covers, and is shaded red when any of them is
// anomalous. Nothing here creates DOM nodes per frame.

const COLORS = {
  score: "#1f2933",
  range: "rgba(31, 41, 51, 0.35)",
  tau: "#d97706",
  band: "rgba(217, 119, 6, 0.16)",
  bandEdge: "rgba(217, 119, 6, 0.45)",
  anomalous: "rgba(220, 38, 38, 0.22)",
  anomalousMark: "#dc2626",
  uncertain: "rgba(234, 179, 8, 0.18)",
  cursor: "#2563eb",
  grid: "#e5e7eb",
  label: "#616e7c",
};

export const FLAG_ANOMALOUS = 1;
export const FLAG_UNCERTAIN = 2;

/** Growable per-frame arrays (scores, flags); typed arrays, doubled when full. */
export class FrameSeries {
  constructor(capacity = 256) {
    this.count = 0;
    this.scores = new Float32Array(capacity);
    this.flags = new Uint8Array(capacity);
  }

  push(score, anomalous, uncertain) {
    if (this.count === this.scores.length) {
      const scores = new Float32Array(this.scores.length * 2);
      scores.set(this.scores);
      const flags = new Uint8Array(this.flags.length * 2);
      flags.set(this.flags);
      this.scores = scores;
      this.flags = flags;
    }
    this.scores[this.count] = Number.isFinite(score) ? score : NaN;
    this.flags[this.count] = (anomalous ? FLAG_ANOMALOUS : 0) | (uncertain ? FLAG_UNCERTAIN : 0);
    return this.count++;
  }
}

export class ScoreChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{onSelect?: (frame: number) => void, fps?: number}} options
   */
  constructor(canvas, options = {}) {
    this.canvas = canvas;
    this.onSelect = options.onSelect || null;
    this.series = new FrameSeries();
    this.from = 0; // first frame shown (live chart: a sliding window)
    this.span = 0; // frames on the x axis (>= shown count; the expected total while a clip streams)
    this.threshold = null;
    this.band = null;
    this.cursor = -1;
    this.fps = options.fps || 0;
    this.zoom = false; // y axis around tau and the reject band (higher scores run off the top)
    this.pending = false;
    this.margin = { left: 46, right: 10, top: 10, bottom: 20 };
    new ResizeObserver(() => this.requestDraw()).observe(canvas);
    if (this.onSelect) this.attachPointer();
  }

  setSeries(series) {
    this.series = series;
    this.requestDraw();
  }

  setThreshold(threshold, band) {
    this.threshold = Number.isFinite(threshold) ? threshold : null;
    this.band = Array.isArray(band) && band.length === 2 && band.every(Number.isFinite) ? band : null;
    this.requestDraw();
  }

  setCursor(frame) {
    this.cursor = frame;
    this.requestDraw();
  }

  requestDraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  /** frames [from, to) on the x axis, and the axis length in frames. */
  window() {
    const to = this.series.count;
    const span = Math.max(this.span, to - this.from, 1);
    return { from: this.from, to, span };
  }

  plotRect() {
    const w = this.canvas.clientWidth;
    const h = this.canvas.clientHeight;
    const m = this.margin;
    return { x: m.left, y: m.top, w: Math.max(10, w - m.left - m.right), h: Math.max(10, h - m.top - m.bottom), cssW: w, cssH: h };
  }

  frameAtX(clientX) {
    const rect = this.canvas.getBoundingClientRect();
    const plot = this.plotRect();
    const { from, to, span } = this.window();
    if (to <= from) return -1;
    const t = (clientX - rect.left - plot.x) / plot.w;
    const frame = from + Math.floor(Math.min(0.999999, Math.max(0, t)) * span);
    return Math.min(to - 1, Math.max(from, frame));
  }

  attachPointer() {
    let dragging = false;
    const pick = (event) => {
      const frame = this.frameAtX(event.clientX);
      if (frame >= 0) this.onSelect(frame);
    };
    this.canvas.addEventListener("pointerdown", (event) => {
      dragging = true;
      this.canvas.setPointerCapture(event.pointerId);
      pick(event);
    });
    this.canvas.addEventListener("pointermove", (event) => dragging && pick(event));
    const stop = () => { dragging = false; };
    this.canvas.addEventListener("pointerup", stop);
    this.canvas.addEventListener("pointercancel", stop);
  }

  setZoom(zoom) {
    this.zoom = Boolean(zoom);
    this.requestDraw();
  }

  /** Score range of the shown frames, widened to include tau and the reject band. */
  yRange(from, to) {
    if (this.zoom && this.threshold !== null) {
      const [bandLo, bandHi] = this.band || [this.threshold, this.threshold];
      const width = Math.max(bandHi - bandLo, Math.abs(this.threshold) * 0.1, 1e-6);
      return [bandLo - 2 * width, bandHi + 3 * width];
    }
    let lo = Infinity, hi = -Infinity;
    const scores = this.series.scores;
    for (let i = from; i < to; i++) {
      const s = scores[i];
      if (s < lo) lo = s;
      if (s > hi) hi = s;
    }
    for (const v of [this.threshold, ...(this.band || [])]) {
      if (v !== null && Number.isFinite(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
    if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [0, 1];
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    const pad = (hi - lo) * 0.08;
    return [lo - pad, hi + pad];
  }

  draw() {
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const plot = this.plotRect();
    const pw = Math.round(plot.cssW * dpr), ph = Math.round(plot.cssH * dpr);
    if (canvas.width !== pw || canvas.height !== ph) {
      canvas.width = pw;
      canvas.height = ph;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, plot.cssW, plot.cssH);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, plot.cssW, plot.cssH);

    const { from, to, span } = this.window();
    const [lo, hi] = this.yRange(from, to);
    const yOf = (v) => plot.y + plot.h - ((v - lo) / (hi - lo)) * plot.h;
    const xOf = (frame) => plot.x + ((frame - from) / span) * plot.w;

    this.drawAxes(ctx, plot, lo, hi, yOf, from, span);
    ctx.save();
    ctx.beginPath();
    ctx.rect(plot.x, plot.y, plot.w, plot.h);
    ctx.clip();

    // reject band and tau
    if (this.band) {
      const top = yOf(this.band[1]), bottom = yOf(this.band[0]);
      ctx.fillStyle = COLORS.band;
      ctx.fillRect(plot.x, top, plot.w, Math.max(1, bottom - top));
      ctx.strokeStyle = COLORS.bandEdge;
      ctx.lineWidth = 1;
      ctx.setLineDash([3, 3]);
      for (const y of [top, bottom]) {
        ctx.beginPath(); ctx.moveTo(plot.x, y); ctx.lineTo(plot.x + plot.w, y); ctx.stroke();
      }
      ctx.setLineDash([]);
    }

    const n = to - from;
    const columns = Math.max(1, Math.floor(plot.w * dpr));
    const scores = this.series.scores, flags = this.series.flags;

    if (n > 0) {
      // anomalous / uncertain shading: per frame when frames are wider than a pixel column, else per column
      const perColumn = span > columns;
      const bins = perColumn ? columns : span;
      const binWidth = plot.w / bins;
      let runStart = -1;
      const flush = (end) => {
        if (runStart < 0) return;
        ctx.fillStyle = COLORS.anomalous;
        ctx.fillRect(plot.x + runStart * binWidth, plot.y, (end - runStart) * binWidth, plot.h);
        ctx.fillStyle = COLORS.anomalousMark;
        ctx.fillRect(plot.x + runStart * binWidth, plot.y + plot.h - 4, Math.max(1, (end - runStart) * binWidth), 4);
        runStart = -1;
      };
      const firstFrame = (b) => from + Math.floor((b * span) / bins);
      for (let b = 0; b < bins; b++) {
        const a = firstFrame(b), z = Math.min(to, Math.max(a + 1, firstFrame(b + 1)));
        let any = false;
        for (let i = a; i < z && i < to; i++) if (flags[i] & FLAG_ANOMALOUS) { any = true; break; }
        if (any && runStart < 0) runStart = b;
        if (!any) flush(b);
        if (a >= to) break;
      }
      flush(bins);

      // scores: a polyline (few frames) or min..max bars per column plus the column maxima
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = COLORS.score;
      ctx.beginPath();
      if (!perColumn) {
        let started = false;
        for (let i = from; i < to; i++) {
          const s = scores[i];
          if (!Number.isFinite(s)) { started = false; continue; }
          const x = xOf(i + 0.5), y = yOf(s);
          if (started) ctx.lineTo(x, y); else ctx.moveTo(x, y);
          started = true;
        }
        ctx.stroke();
        if (n <= plot.w / 6) {
          ctx.fillStyle = COLORS.score;
          for (let i = from; i < to; i++) {
            if (!Number.isFinite(scores[i])) continue;
            ctx.beginPath();
            ctx.arc(xOf(i + 0.5), yOf(scores[i]), flags[i] & FLAG_ANOMALOUS ? 2.6 : 1.8, 0, Math.PI * 2);
            ctx.fillStyle = flags[i] & FLAG_ANOMALOUS ? COLORS.anomalousMark : COLORS.score;
            ctx.fill();
          }
        }
      } else {
        const colW = plot.w / bins;
        const maxima = [];
        ctx.fillStyle = COLORS.range;
        for (let b = 0; b < bins; b++) {
          const a = firstFrame(b), z = Math.min(to, Math.max(a + 1, firstFrame(b + 1)));
          if (a >= to) break;
          let mn = Infinity, mx = -Infinity;
          for (let i = a; i < z; i++) {
            const s = scores[i];
            if (s < mn) mn = s;
            if (s > mx) mx = s;
          }
          if (!Number.isFinite(mx)) { maxima.push(null); continue; }
          const top = yOf(mx), bottom = yOf(mn);
          ctx.fillRect(plot.x + b * colW, top, Math.max(colW, 0.8), Math.max(1, bottom - top));
          maxima.push([plot.x + (b + 0.5) * colW, top]);
        }
        let started = false;
        for (const point of maxima) {
          if (!point) { started = false; continue; }
          if (started) ctx.lineTo(point[0], point[1]); else ctx.moveTo(point[0], point[1]);
          started = true;
        }
        ctx.lineWidth = 1;
        ctx.stroke();
      }
    }

    ctx.restore();

    if (this.threshold !== null) {
      const y = yOf(this.threshold);
      ctx.strokeStyle = COLORS.tau;
      ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.moveTo(plot.x, y); ctx.lineTo(plot.x + plot.w, y); ctx.stroke();
      ctx.fillStyle = COLORS.tau;
      ctx.font = "11px system-ui, sans-serif";
      ctx.textAlign = "right";
      ctx.textBaseline = "bottom";
      ctx.fillText(`τ ${this.threshold.toFixed(3)}`, plot.x + plot.w - 2, y - 2);
    }

    if (this.cursor >= from && this.cursor < to) {
      const x = xOf(this.cursor + 0.5);
      ctx.strokeStyle = COLORS.cursor;
      ctx.lineWidth = 2;
      ctx.beginPath(); ctx.moveTo(x, plot.y); ctx.lineTo(x, plot.y + plot.h); ctx.stroke();
    }
    canvas.dataset.frames = String(n);
    canvas.dataset.drawn = String(Date.now());
  }

  drawAxes(ctx, plot, lo, hi, yOf, from, span) {
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = COLORS.label;
    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const v of niceTicks(lo, hi, 4)) {
      const y = Math.round(yOf(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(plot.x, y); ctx.lineTo(plot.x + plot.w, y); ctx.stroke();
      ctx.fillText(formatTick(v), plot.x - 4, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const f of niceTicks(from, from + span, 8)) {
      if (f < from || f > from + span || !Number.isInteger(f)) continue;
      const x = plot.x + ((f - from) / span) * plot.w;
      const label = this.fps ? `${(f / this.fps).toFixed(f / this.fps < 10 ? 1 : 0)}s` : String(f);
      ctx.fillText(label, Math.min(Math.max(x, plot.x + 10), plot.x + plot.w - 10), plot.y + plot.h + 4);
    }
    ctx.strokeStyle = "#9aa5b1";
    ctx.strokeRect(plot.x + 0.5, plot.y + 0.5, plot.w - 1, plot.h - 1);
  }
}

function niceTicks(lo, hi, count) {
  const range = hi - lo;
  if (!(range > 0)) return [lo];
  const rough = range / count;
  const power = Math.pow(10, Math.floor(Math.log10(rough)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough) || power * 10;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) ticks.push(Math.round(v / step) * step);
  return ticks;
}

function formatTick(v) {
  const abs = Math.abs(v);
  if (abs !== 0 && (abs < 0.01 || abs >= 1e4)) return v.toExponential(0);
  return Number(v.toFixed(2)).toString();
}
