// concept-atlas browser: the few interactions a page needs, in plain JavaScript (no library).
"use strict";

// Exemplar overlays: the radio buttons swap every exemplar picture between the iERF mask,
// the activation map and the plain image (each a server-rendered PNG named in data-*).
function initOverlayToggle() {
  const toggle = document.getElementById("overlay-toggle");
  if (!toggle) return;
  toggle.addEventListener("change", (ev) => {
    const mode = ev.target.value;
    document.querySelectorAll("img.overlay").forEach((img) => {
      if (img.dataset[mode]) img.src = img.dataset[mode];
    });
    document.body.dataset.overlay = mode;
  });
}

// Layer tables: a click anywhere on a row opens its latent (the id cell stays a real link,
// so keyboard users tab to it).
function initClickableRows() {
  document.querySelectorAll("table.clickable tbody tr").forEach((tr) => {
    const link = tr.querySelector("a");
    if (!link) return;
    tr.addEventListener("click", (ev) => {
      if (ev.target.closest("a")) return;
      window.location.href = link.href;
    });
  });
}

// Search: drag a box on the query image; the box field gets x,y,w,h in the image's own
// pixels (the model input), whatever size the picture is shown at.
function initBoxDrawing() {
  const img = document.getElementById("query-image");
  const field = document.getElementById("box");
  const shape = document.getElementById("box-shape");
  if (!img || !field || !shape) return;
  let start = null;
  const scale = () => (img.naturalWidth || img.width) / img.clientWidth;
  const at = (ev) => {
    const r = img.getBoundingClientRect();
    return [Math.min(Math.max(ev.clientX - r.left, 0), r.width),
            Math.min(Math.max(ev.clientY - r.top, 0), r.height)];
  };
  const show = (a, b) => {
    const [x0, y0] = [Math.min(a[0], b[0]), Math.min(a[1], b[1])];
    const [w, h] = [Math.abs(a[0] - b[0]), Math.abs(a[1] - b[1])];
    Object.assign(shape.style, {left: x0 + "px", top: y0 + "px", width: w + "px", height: h + "px"});
    shape.hidden = false;
    const s = scale();
    field.value = [x0, y0, Math.max(w, 1), Math.max(h, 1)].map((v) => Math.round(v * s)).join(",");
  };
  img.addEventListener("mousedown", (ev) => { ev.preventDefault(); start = at(ev); });
  window.addEventListener("mousemove", (ev) => { if (start) show(start, at(ev)); });
  window.addEventListener("mouseup", (ev) => { if (start) { show(start, at(ev)); start = null; } });
  // a box typed into the field is drawn too
  const fromField = () => {
    const v = field.value.split(",").map(Number);
    if (v.length !== 4 || v.some(isNaN)) { shape.hidden = true; return; }
    const s = scale();
    Object.assign(shape.style, {left: v[0] / s + "px", top: v[1] / s + "px",
                                width: v[2] / s + "px", height: v[3] / s + "px"});
    shape.hidden = false;
  };
  field.addEventListener("change", fromField);
  if (img.complete) fromField(); else img.addEventListener("load", fromField);
}

document.addEventListener("DOMContentLoaded", () => {
  initOverlayToggle();
  initClickableRows();
  initBoxDrawing();
});
