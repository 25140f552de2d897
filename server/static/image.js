// Image-to-image in the playground: an input image (file picker or drop), a mask painted over it
// (brush strokes or dragged rectangles, an eraser; arrows and Space from the keyboard), a strength
// and the paste option. imageFields() gives what POST /generate takes: `image` and `mask` as PNG
// data URLs of one pixel size (the mask's painted pixels fully transparent, the rest opaque:
// OpenAI's convention), `strength`, `paste`. Nothing is sent while no image is chosen.
// Loaded before app.js, which calls bindImageInput() and imageFields() and lends `$`, showError,
// clearError and selectAspectFor.
"use strict";

const MAX_INPUT_SIDE = 2048;   // longer inputs are scaled down here: the server fits them to <= 1M pixels anyway
const DEFAULT_STRENGTH = { edit: 1, variation: 0.6 };   // the server's own defaults (server/uploads.py)
const MASK_COLOUR = "#ff2d78";  // painted on the mask canvas, which app.css shows at half opacity
const PAINTED_ALPHA = 128;      // a mask pixel at least this opaque is painted (brush edges are antialiased)

let source = null;             // the chosen image: {dataUrl, width, height, name, scaledFrom}
let stroke = null;             // the pointer gesture in progress: {rectangle, erase, start, last, snapshot}
let maskPainted = false;       // whether any mask pixel is painted (read after every change)
let strengthTouched = false;   // the user moved the slider: painting a mask no longer resets it
let cursor = { x: 0, y: 0 };   // the keyboard brush, in image pixels

function bindImageInput() {
  const zone = $("image-field");
  $("image-file").addEventListener("change", (e) => chooseImage(e.target.files[0]));
  zone.addEventListener("dragover", (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", (e) => {
    if (!zone.contains(e.relatedTarget)) zone.classList.remove("dragging");
  });
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    chooseImage(e.dataTransfer.files[0]);
  });
  // A file dropped just beside the zone would otherwise open in the tab, and the form would be lost.
  for (const name of ["dragover", "drop"]) {
    document.addEventListener(name, (e) => { if (carriesFiles(e)) e.preventDefault(); });
  }
  $("remove-image").addEventListener("click", removeImage);
  $("clear-mask").addEventListener("click", clearMask);
  $("brush-size").addEventListener("input", showBrushSize);
  $("strength").addEventListener("input", () => { strengthTouched = true; showStrength(); });
  const canvas = $("mask-canvas");
  canvas.addEventListener("pointerdown", startStroke);
  canvas.addEventListener("pointermove", moveStroke);
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("pointerleave", () => { if (!stroke) $("brush-cursor").hidden = true; });
  canvas.addEventListener("keydown", maskKey);
  canvas.addEventListener("focus", () => showCursor(cursor));
  canvas.addEventListener("blur", () => { $("brush-cursor").hidden = true; });
  showBrushSize();
  showStrength();
}

function carriesFiles(event) {
  return Boolean(event.dataTransfer?.types.includes("Files"));
}

/** The fields an image-to-image request adds; none without an image (plain text-to-image). */
function imageFields() {
  if (!source) return {};
  const fields = { image: source.dataUrl, strength: Number($("strength").value) };
  if (maskPainted) {
    fields.mask = maskDataUrl();
    fields.paste = $("paste").checked;
  }
  return fields;
}

/** "edit" (with a mask), "variation" (without) or null (no input image), for the history. */
function imageKind() {
  return source ? (maskPainted ? "edit" : "variation") : null;
}

// ---- the input image -------------------------------------------------------------------------------

async function chooseImage(file) {
  if (!file) return;
  clearError();
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.src = url;
  try {
    await img.decode();
    if (!img.naturalWidth || !img.naturalHeight) throw new Error("no pixel size");
    // Drawn once at its final size and sent as PNG: the server gets exactly the pixels shown (the
    // browser's EXIF rotation included), and the mask is painted on that same pixel grid.
    const scale = Math.min(1, MAX_INPUT_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
    const width = Math.max(1, Math.round(img.naturalWidth * scale));
    const height = Math.max(1, Math.round(img.naturalHeight * scale));
    const canvas = document.createElement("canvas");
    Object.assign(canvas, { width, height });
    canvas.getContext("2d").drawImage(img, 0, 0, width, height);
    source = { dataUrl: canvas.toDataURL("image/png"), width, height, name: file.name,
               scaledFrom: scale < 1 ? [img.naturalWidth, img.naturalHeight] : null };
  } catch {
    showError("Not an image", `${file.name || "The dropped file"} could not be read as an image.`, "image");
    return;
  } finally {
    URL.revokeObjectURL(url);
  }
  showSource();
}

function showSource() {
  const { width, height } = source;
  const preview = $("image-preview");
  preview.src = source.dataUrl;
  preview.alt = `Input image ${source.name}`;
  const canvas = $("mask-canvas");
  Object.assign(canvas, { width, height });          // also clears the mask of a previous image
  const stage = $("mask-stage");
  stage.style.aspectRatio = `${width} / ${height}`;
  stage.style.maxWidth = `calc(20rem * ${width / height})`;   // at most 20rem tall
  stage.classList.toggle("pixelated", Math.max(width, height) < 512);   // small images enlarged stay sharp
  const from = source.scaledFrom ? `, scaled down from ${source.scaledFrom[0]}×${source.scaledFrom[1]}` : "";
  $("image-info").textContent = `${source.name}: ${width}×${height} pixels${from}.`;
  $("image-editor").hidden = false;
  cursor = { x: width / 2, y: height / 2 };
  strengthTouched = false;
  maskChanged();
  selectAspectFor(width, height);
}

function removeImage() {
  source = null;
  maskPainted = false;
  $("image-file").value = "";              // choosing the same file again fires `change` again
  $("image-editor").hidden = true;
  $("image-preview").removeAttribute("src");
  Object.assign($("mask-canvas"), { width: 0, height: 0 });
  $("image-file").focus();                 // the button that had the focus is gone
}

// ---- strength and brush size ------------------------------------------------------------------------

function showStrength() {
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
}

function showBrushSize() {
  $("brush-size-value").textContent = `${$("brush-size").value} px`;
}

// ---- the mask ------------------------------------------------------------------------------------

function maskContext() {
  return $("mask-canvas").getContext("2d", { willReadFrequently: true });
}

/** After every change: whether anything is painted, what the request will be, the default strength. */
function maskChanged() {
  const alpha = maskContext().getImageData(0, 0, source.width, source.height).data;
  maskPainted = false;
  for (let i = 3; i < alpha.length; i += 4) {
    if (alpha[i] >= PAINTED_ALPHA) { maskPainted = true; break; }
  }
  $("mask-state").textContent = maskPainted
    ? "Edit: the painted part is repainted, the rest is kept."
    : "Variation: nothing painted, the whole image is varied.";
  $("paste").disabled = !maskPainted;
  $("clear-mask").disabled = !maskPainted;
  if (!strengthTouched) {
    $("strength").value = maskPainted ? DEFAULT_STRENGTH.edit : DEFAULT_STRENGTH.variation;
    showStrength();
  }
}

function clearMask() {
  maskContext().clearRect(0, 0, source.width, source.height);
  maskChanged();
  $("mask-canvas").focus();                // the button is disabled now: the focus goes to the mask
}

/** The mask as the API takes it: a PNG of the image's size, painted pixels alpha 0, the rest alpha 255. */
function maskDataUrl() {
  const { width, height } = source;
  const painted = maskContext().getImageData(0, 0, width, height).data;
  const out = document.createElement("canvas");
  Object.assign(out, { width, height });
  const context = out.getContext("2d");
  const pixels = context.createImageData(width, height);   // transparent black
  for (let i = 3; i < painted.length; i += 4) pixels.data[i] = painted[i] >= PAINTED_ALPHA ? 0 : 255;
  context.putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

function brushWidth() {   // the slider is in screen pixels, the mask in image pixels
  const canvas = $("mask-canvas");
  return Number($("brush-size").value) * canvas.width / canvas.getBoundingClientRect().width;
}

function paint(context, erase) {
  context.globalCompositeOperation = erase ? "destination-out" : "source-over";
  context.fillStyle = context.strokeStyle = MASK_COLOUR;
  return context;
}

function paintLine(from, to, erase) {
  const context = paint(maskContext(), erase);
  const width = brushWidth();
  context.beginPath();
  context.arc(to.x, to.y, width / 2, 0, 2 * Math.PI);   // a dot also where the line has no length
  context.fill();
  context.lineWidth = width;
  context.lineCap = "round";
  context.beginPath();
  context.moveTo(from.x, from.y);
  context.lineTo(to.x, to.y);
  context.stroke();
}

function paintRectangle(a, b, erase) {
  const [x, y] = [Math.min(a.x, b.x), Math.min(a.y, b.y)];
  paint(maskContext(), erase).fillRect(x, y, Math.abs(b.x - a.x), Math.abs(b.y - a.y));
}

function canvasPoint(event) {
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  return { x: (event.clientX - box.left) * canvas.width / box.width,
           y: (event.clientY - box.top) * canvas.height / box.height };
}

function startStroke(event) {
  if (event.button !== 0 || !source) return;
  event.preventDefault();
  event.target.setPointerCapture(event.pointerId);
  const point = canvasPoint(event);
  cursor = point;                          // the keys go on from where the pointer was
  const rectangle = document.querySelector('input[name="mask-tool"]:checked').value === "rectangle";
  stroke = { rectangle, erase: $("erase").checked, start: point, last: point, snapshot: null };
  if (rectangle) stroke.snapshot = maskContext().getImageData(0, 0, source.width, source.height);
  else paintLine(point, point, stroke.erase);
}

function moveStroke(event) {
  const point = canvasPoint(event);
  showCursor(point);
  if (!stroke) return;
  if (stroke.rectangle) {    // redrawn from the mask as it was, so the rectangle follows the pointer
    maskContext().putImageData(stroke.snapshot, 0, 0);
    paintRectangle(stroke.start, point, stroke.erase);
  } else {
    paintLine(stroke.last, point, stroke.erase);
  }
  stroke.last = point;
}

function endStroke() {
  if (!stroke) return;
  stroke = null;
  maskChanged();
}

// Keyboard: arrows move the brush (by half its width), Shift+arrows paint on the way, Space paints a dot.
function maskKey(event) {
  const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  const move = moves[event.key];
  if (!move && event.key !== " ") return;
  event.preventDefault();
  const from = cursor;
  if (move) {
    const step = Math.max(1, brushWidth() / 2);
    cursor = { x: Math.min(source.width, Math.max(0, cursor.x + move[0] * step)),
               y: Math.min(source.height, Math.max(0, cursor.y + move[1] * step)) };
    showCursor(cursor);
    if (!event.shiftKey) return;
  }
  paintLine(from, cursor, $("erase").checked);
  maskChanged();
}

function showCursor(point) {
  const canvas = $("mask-canvas");
  const scale = canvas.getBoundingClientRect().width / canvas.width;   // image pixels -> screen pixels
  const ring = $("brush-cursor");
  const size = `${$("brush-size").value}px`;
  Object.assign(ring.style, { left: `${point.x * scale}px`, top: `${point.y * scale}px`, width: size, height: size });
  ring.hidden = false;
}
