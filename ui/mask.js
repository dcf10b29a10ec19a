// The edit mask: the chosen image drawn on one canvas, the strokes on another above it. The mask sent is a PNG of
// the image's size, opaque where it must stay and transparent where painted (OpenAI's convention). The overlay is
// focusable: arrow keys move a brush cursor (Shift for bigger steps), Space or Enter paints a dab where it is, and
// holding Space/Enter down while moving paints a line.

export class MaskPainter {
  constructor(base, overlay, brush) {
    this.base = base;
    this.overlay = overlay;
    this.brush = brush;
    this.painted = false;
    this.drawing = false;
    const pos = (e) => {
      const r = overlay.getBoundingClientRect();
      return [((e.clientX - r.left) / r.width) * overlay.width, ((e.clientY - r.top) / r.height) * overlay.height];
    };
    overlay.addEventListener("pointerdown", (e) => {
      this.drawing = true;
      overlay.setPointerCapture(e.pointerId);
      this.last = pos(e);
      this.stroke(this.last, this.last);
    });
    overlay.addEventListener("pointermove", (e) => {
      if (!this.drawing) return;
      const p = pos(e);
      this.stroke(this.last, p);
      this.last = p;
    });
    const stop = () => { this.drawing = false; };
    overlay.addEventListener("pointerup", stop);
    overlay.addEventListener("pointercancel", stop);

    // Keyboard: a cursor (drawn by the page as #pg-mask-cursor, positioned in percent of the canvas).
    this.cursor = [0.5, 0.5];
    this.inking = false;
    this.cursorEl = overlay.parentElement?.querySelector(".mask-cursor") || null;
    overlay.tabIndex = 0;
    overlay.setAttribute("role", "application");
    overlay.setAttribute("aria-roledescription", "mask canvas");
    overlay.addEventListener("focus", () => this.showCursor(true));
    overlay.addEventListener("blur", () => { this.inking = false; this.showCursor(false); });
    overlay.addEventListener("keydown", (e) => this.key(e));
    overlay.addEventListener("keyup", (e) => {
      if (e.key === " " || e.key === "Enter") this.inking = false;
    });
  }

  /** Where the keyboard cursor is, in canvas pixels. */
  cursorPx() {
    return [this.cursor[0] * this.overlay.width, this.cursor[1] * this.overlay.height];
  }

  key(e) {
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (moves[e.key]) {
      e.preventDefault();
      const step = (e.shiftKey ? 0.1 : 0.025);
      const before = this.cursorPx();
      const [dx, dy] = moves[e.key];
      this.cursor = [
        Math.min(1, Math.max(0, this.cursor[0] + dx * step)),
        Math.min(1, Math.max(0, this.cursor[1] + dy * step)),
      ];
      if (this.inking) this.stroke(before, this.cursorPx());
      this.showCursor(true);
    } else if (e.key === " " || e.key === "Enter") {
      e.preventDefault();
      if (!e.repeat) {
        this.inking = true;
        const p = this.cursorPx();
        this.stroke(p, p);
      }
    }
  }

  showCursor(visible) {
    const el = this.cursorEl;
    if (!el) return;
    el.hidden = !visible;
    const r = this.overlay.getBoundingClientRect();
    const size = r.width && this.overlay.width ? (Number(this.brush.value) * r.width) / this.overlay.width : 16;
    el.style.left = `${this.cursor[0] * 100}%`;
    el.style.top = `${this.cursor[1] * 100}%`;
    el.style.width = el.style.height = `${Math.max(6, size)}px`;
  }

  /** Shows `img` (an HTMLImageElement that has loaded) and clears the mask. */
  load(img) {
    for (const c of [this.base, this.overlay]) {
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
    }
    this.base.getContext("2d").drawImage(img, 0, 0);
    this.clear();
  }

  stroke(a, b) {
    const ctx = this.overlay.getContext("2d");
    const scale = this.overlay.width / this.overlay.getBoundingClientRect().width || 1;
    ctx.strokeStyle = "rgba(255, 64, 96, 0.55)";
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number(this.brush.value) * scale;
    ctx.beginPath();
    ctx.moveTo(a[0], a[1]);
    ctx.lineTo(b[0] + 0.01, b[1]);
    ctx.stroke();
    this.painted = true;
  }

  all() {
    const ctx = this.overlay.getContext("2d");
    ctx.fillStyle = "rgba(255, 64, 96, 0.55)";
    ctx.fillRect(0, 0, this.overlay.width, this.overlay.height);
    this.painted = true;
  }

  clear() {
    this.overlay.getContext("2d").clearRect(0, 0, this.overlay.width, this.overlay.height);
    this.painted = false;
  }

  /** The mask as a PNG Blob: opaque black where unpainted, fully transparent where any paint is. */
  async toBlob() {
    const w = this.overlay.width, h = this.overlay.height;
    const strokes = this.overlay.getContext("2d").getImageData(0, 0, w, h).data;
    const c = document.createElement("canvas");
    c.width = w;
    c.height = h;
    const ctx = c.getContext("2d");
    const out = ctx.createImageData(w, h);
    for (let i = 3; i < strokes.length; i += 4) out.data[i] = strokes[i] > 0 ? 0 : 255;
    ctx.putImageData(out, 0, 0);
    return new Promise((resolve) => c.toBlob(resolve, "image/png"));
  }
}
