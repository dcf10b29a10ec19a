// The edit mask: the chosen image drawn on one canvas, the strokes on another above it. The mask sent is a PNG of
// the image's size, opaque where it must stay and transparent where painted (OpenAI's convention).

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
