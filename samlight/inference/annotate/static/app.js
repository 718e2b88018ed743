// samlight annotate: the page. Draws the image, the saved masks and the current candidate on stacked
// canvases; every prompt change asks the server for masks (/api/predict); Enter saves (/api/accept).
"use strict";

const $ = (id) => document.getElementById(id);
const layers = {
  image: $("image-layer"), saved: $("saved-layer"), mask: $("mask-layer"), prompt: $("prompt-layer"),
};
const S = {
  images: [], index: 0, image: null,      // image: {id, width, height}
  saved: [], editing: null, hideSaved: false,
  points: [], box: null,                  // the prompt being built: [[x, y, label]], [x0, y0, x1, y1]
  response: null, candidate: 0,           // the last /api/predict answer and the candidate shown
  history: [], seq: 0, drag: null, busy: false,
};
window.samlight = S;                        // for tests and the curious

// --------------------------------------------------------------------------------------------- server

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({error: `${r.status} ${r.statusText}`}));
  if (!r.ok) throw new Error(data.error || `${r.status}`);
  return data;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// ------------------------------------------------------------------------------------------------ RLE

// COCO compressed RLE (the string form of pycocotools / SA-1B) -> run lengths, column-major from a 0-run.
function rleCounts(counts) {
  if (Array.isArray(counts)) return counts;
  const out = [];
  let p = 0;
  while (p < counts.length) {
    let x = 0, k = 0, more = 1, c = 0;
    while (more) {
      c = counts.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (out.length > 2) x += out[out.length - 2];
    out.push(x);
  }
  return out;
}

// Paint the 1-runs of an RLE into RGBA `data` (row-major, width w) with colour [r, g, b, a]; returns the area.
function paintRle(data, rle, w, color) {
  const h = rle.size[0];
  const counts = rleCounts(rle.counts);
  let pos = 0, area = 0;
  for (let i = 0; i < counts.length; i++) {
    const n = counts[i];
    if (i % 2 === 1) {
      for (let j = pos; j < pos + n; j++) {
        const x = Math.floor(j / h), y = j - x * h, o = (y * w + x) * 4;
        data[o] = color[0]; data[o + 1] = color[1]; data[o + 2] = color[2]; data[o + 3] = color[3];
      }
      area += n;
    }
    pos += n;
  }
  return area;
}

function colorOf(id) {
  const hue = (id * 137.508) % 360;  // golden angle: neighbouring ids get distant hues
  const c = (1 - Math.abs(0.5 * 2 - 1)) * 0.85, x = c * (1 - Math.abs(((hue / 60) % 2) - 1));
  const [r, g, b] = hue < 60 ? [c, x, 0] : hue < 120 ? [x, c, 0] : hue < 180 ? [0, c, x]
    : hue < 240 ? [0, x, c] : hue < 300 ? [x, 0, c] : [c, 0, x];
  return [Math.round((r + 0.1) * 255), Math.round((g + 0.1) * 255), Math.round((b + 0.1) * 255), 110];
}

// -------------------------------------------------------------------------------------------- drawing

function drawSaved() {
  const {width: w, height: h} = S.image;
  const ctx = layers.saved.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  if (S.hideSaved || !S.saved.length) return;
  const img = ctx.createImageData(w, h);
  for (const a of S.saved) if (a.id !== S.editing) paintRle(img.data, a.rle, w, colorOf(a.id));
  ctx.putImageData(img, 0, 0);
}

function currentRle() {
  if (S.response) return S.response.masks[S.candidate].rle;
  if (S.editing !== null) return S.saved.find((a) => a.id === S.editing)?.rle || null;
  return null;
}

// The current mask comes in the display frame (at most 1024 px long; the saved mask is full size): its canvas
// takes that size and CSS scales it onto the image like the other layers.
function drawMask() {
  const rle = currentRle();
  const [h, w] = rle ? rle.size : [S.image.height, S.image.width];
  if (layers.mask.width !== w || layers.mask.height !== h) { layers.mask.width = w; layers.mask.height = h; }
  const ctx = layers.mask.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  let area = 0;
  if (rle) {
    const img = ctx.createImageData(w, h);
    area = paintRle(img.data, rle, w, [30, 144, 255, 140]);
    ctx.putImageData(img, 0, 0);
  }
  document.body.dataset.maskPixels = String(area);
  document.body.dataset.prediction = S.response ? String(S.response.prediction) : "";
  const r = S.response;
  $("candidate").textContent = r
    ? `candidate ${S.candidate + 1}/${r.masks.length} · predicted IoU ${r.masks[S.candidate].score.toFixed(3)}`
      + ` · ${(100 * r.masks[S.candidate].area / (w * h)).toFixed(1)}% of the image` + (S.editing !== null ? ` · correcting #${S.editing}` : "")
    : S.editing !== null ? `correcting mask #${S.editing}: click to add or remove parts` : "no prompt yet";
}

function drawPrompts() {
  const {width: w, height: h} = S.image;
  const ctx = layers.prompt.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const scale = w / layers.prompt.getBoundingClientRect().width || 1;  // keep marks a constant screen size
  const box = S.drag && S.drag.moved ? S.drag.box : S.box;
  if (box) {
    ctx.lineWidth = 2 * scale; ctx.strokeStyle = "#fc6";
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
  for (const [x, y, label] of S.points) {
    ctx.beginPath(); ctx.arc(x, y, 5 * scale, 0, 2 * Math.PI);
    ctx.fillStyle = label ? "#3c3" : "#e33"; ctx.fill();
    ctx.lineWidth = 1.5 * scale; ctx.strokeStyle = "#fff"; ctx.stroke();
  }
}

function redraw() { drawSaved(); drawMask(); drawPrompts(); }

function fitStage() {
  if (!S.image) return;
  const stage = $("stage");
  const scale = Math.min(stage.clientWidth / S.image.width, stage.clientHeight / S.image.height, 4);
  for (const c of Object.values(layers)) {
    c.style.width = `${S.image.width * scale}px`;
    c.style.height = `${S.image.height * scale}px`;
  }
  drawPrompts();
}

// ------------------------------------------------------------------------------------------- the list

function renderList() {
  const ul = $("masks");
  ul.innerHTML = "";
  for (const a of S.saved) {
    const li = document.createElement("li");
    li.dataset.id = a.id;
    if (a.id === S.editing) li.classList.add("editing");
    const sw = document.createElement("span");
    sw.className = "swatch";
    const [r, g, b] = colorOf(a.id);
    sw.style.background = `rgb(${r},${g},${b})`;
    const what = document.createElement("span");
    what.className = "what" + (a.source === "auto" ? " auto" : "");
    what.textContent = `#${a.id} ${a.source} · ${a.area} px`;
    const edit = document.createElement("button");
    edit.textContent = "edit"; edit.title = "correct this mask (E)";
    edit.onclick = () => startEdit(a.id);
    const del = document.createElement("button");
    del.textContent = "×"; del.title = "delete"; del.className = "delete";
    del.onclick = () => deleteMask(a.id);
    li.append(sw, what, edit, del);
    ul.append(li);
  }
  $("mask-count").textContent = `(${S.saved.length})`;
  document.body.dataset.saved = String(S.saved.length);
}

// ------------------------------------------------------------------------------------------ prompting

function snapshot() {
  return {points: S.points.slice(), box: S.box, response: S.response, candidate: S.candidate};
}

async function predict() {
  if (!S.points.length && !S.box) { S.response = null; redraw(); return; }
  const seq = ++S.seq;
  const t0 = performance.now();
  const prev = S.history.length ? S.history[S.history.length - 1].response : null;
  try {
    const r = await api("/api/predict", {
      image: S.image.id, points: S.points, box: S.box,
      previous: prev ? prev.prediction : null, candidate: prev ? S.history[S.history.length - 1].candidate : 0,
      base: S.editing,
    });
    if (seq !== S.seq) return;  // a newer prompt is on its way
    S.response = r;
    S.candidate = r.best;
    const ms = performance.now() - t0;
    document.body.dataset.clickMs = ms.toFixed(1);
    status(`mask in ${ms.toFixed(0)} ms (decoder ${r.decode_ms.toFixed(0)} ms)`);
    drawMask();
  } catch (e) { if (seq === S.seq) status(e.message, true); }
}

function addPrompt(change) {
  S.history.push(snapshot());
  change();
  drawPrompts();
  predict();
}

function undo() {
  const last = S.history.pop();
  if (!last) return;
  S.seq++;  // drop an answer still in flight
  Object.assign(S, last);
  redraw();
}

function clearPrompts() {
  S.seq++;
  S.points = []; S.box = null; S.response = null; S.candidate = 0; S.history = [];
  redraw();
}

function cycle() {
  if (!S.response || S.response.masks.length < 2) return;
  S.candidate = (S.candidate + 1) % S.response.masks.length;
  drawMask();
}

async function accept() {
  if (!S.response) { status("nothing to accept: click on the object first", true); return; }
  try {
    const r = await api("/api/accept", {
      prediction: S.response.prediction, candidate: S.candidate, replaces: S.editing,
    });
    S.saved = S.saved.filter((a) => a.id !== S.editing).concat([r.annotation]);
    status(`saved mask #${r.annotation.id} (${r.counts.human} human masks in all)`);
    S.editing = null;
    clearPrompts();
    renderList();
    updateImageCount();
  } catch (e) { status(e.message, true); }
}

async function deleteMask(id) {
  try {
    await api("/api/delete", {image: S.image.id, id});
    S.saved = S.saved.filter((a) => a.id !== id);
    if (S.editing === id) S.editing = null;
    renderList(); redraw(); updateImageCount();
    status(`deleted mask #${id}`);
  } catch (e) { status(e.message, true); }
}

function startEdit(id) {
  clearPrompts();
  S.editing = S.editing === id ? null : id;
  renderList(); redraw();
}

// --------------------------------------------------------------------------------------------- mouse

function imageXY(e) {
  const rect = layers.prompt.getBoundingClientRect();
  const x = (e.clientX - rect.left) * (S.image.width / rect.width);
  const y = (e.clientY - rect.top) * (S.image.height / rect.height);
  return [Math.min(Math.max(x, 0), S.image.width), Math.min(Math.max(y, 0), S.image.height)];
}

layers.prompt.addEventListener("contextmenu", (e) => e.preventDefault());
layers.prompt.addEventListener("mousedown", (e) => {
  if (!S.image) return;
  const [x, y] = imageXY(e);
  S.drag = {x, y, sx: e.clientX, sy: e.clientY, moved: false, button: e.button, shift: e.shiftKey, box: null};
});
window.addEventListener("mousemove", (e) => {
  const d = S.drag;
  if (!d || d.button !== 0) return;
  if (Math.hypot(e.clientX - d.sx, e.clientY - d.sy) > 6) d.moved = true;
  if (d.moved) {
    const [x, y] = imageXY(e);
    d.box = [Math.min(d.x, x), Math.min(d.y, y), Math.max(d.x, x), Math.max(d.y, y)];
    drawPrompts();
  }
});
window.addEventListener("mouseup", (e) => {
  const d = S.drag;
  S.drag = null;
  if (!d) return;
  if (d.moved && d.box) {
    addPrompt(() => { S.box = d.box; });
  } else if (e.target === layers.prompt) {
    const label = d.button === 2 || d.shift || e.altKey ? 0 : 1;
    addPrompt(() => { S.points.push([Math.round(d.x * 10) / 10, Math.round(d.y * 10) / 10, label]); });
  }
});

// ---------------------------------------------------------------------------------------------- keys

window.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT") return;
  const k = e.key;
  if (k === "Enter") { e.preventDefault(); accept(); }
  else if (k === "Tab" || k === "c") { e.preventDefault(); cycle(); }
  else if (k === "z" || k === "Z" || k === "Backspace") { e.preventDefault(); undo(); }
  else if (k === "Escape") { S.editing = null; clearPrompts(); renderList(); }
  else if (k === "n" || k === "ArrowRight") go(1);
  else if (k === "p" || k === "ArrowLeft") go(-1);
  else if (k === "h") { S.hideSaved = !S.hideSaved; drawSaved(); }
  else if (k === "e" && S.saved.length) startEdit(S.saved[S.saved.length - 1].id);
});

// -------------------------------------------------------------------------------------------- images

function loadBitmap(id) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`could not load image ${id}`));
    img.src = `/api/image?id=${encodeURIComponent(id)}`;
  });
}

async function openImage(index) {
  const id = S.images[index].id;
  S.busy = true;
  document.body.dataset.ready = "0";
  status(`opening ${id} …`);
  try {
    const t0 = performance.now();
    const [info, bitmap] = await Promise.all([api("/api/open", {image: id}), loadBitmap(id)]);
    S.index = index;
    S.image = {id, width: info.width, height: info.height};
    S.saved = info.annotations;
    S.editing = null;
    for (const c of Object.values(layers)) { c.width = info.width; c.height = info.height; }
    layers.image.getContext("2d").drawImage(bitmap, 0, 0);
    clearPrompts();
    fitStage();
    renderList();
    $("image-name").textContent = id;
    $("image-pos").textContent = `(${index + 1} / ${S.images.length})`;
    const took = performance.now() - t0;
    status(info.embedding_cached ? `ready (embedding from cache, ${took.toFixed(0)} ms)`
      : `ready (image embedded in ${info.embed_ms.toFixed(0)} ms)`);
    document.body.dataset.ready = "1";
    document.body.dataset.image = id;
  } catch (e) { status(e.message, true); }
  S.busy = false;
}

function go(step) {
  const i = S.index + step;
  if (S.busy || i < 0 || i >= S.images.length) return;
  openImage(i);
}

function updateImageCount() {
  const entry = S.images[S.index];
  if (entry) entry.masks = S.saved.length;
}

// ----------------------------------------------------------------------------------------- retraining

function showRetrain(state) {
  $("model-round").textContent = state.model_round
    ? `serving retrain round ${state.model_round}` : "serving the starting checkpoint";
  const rt = state.retrain;
  if (!rt) { $("retrain").disabled = true; return; }
  const fmt = (v) => (v === null || v === undefined ? "n/a" : v.toFixed(3));
  const busy = ["starting", "training", "evaluating"].includes(rt.state);
  $("retrain").disabled = busy;
  let text = busy ? `round ${rt.round}: ${rt.phase || rt.state} …` : rt.state === "failed" ? `failed: ${rt.error}` : "";
  if (busy && rt.miou_before !== undefined) text += ` (held-out mIoU before: ${fmt(rt.miou_before)})`;
  if (rt.every) text += ` · retrains by itself every ${rt.every} new masks`;
  $("retrain-status").textContent = text;
  $("retrain-status").classList.toggle("error", rt.state === "failed");
  const body = $("retrain-history").querySelector("tbody");
  body.innerHTML = "";
  for (const r of rt.history) {
    const tr = document.createElement("tr");
    for (const v of [r.round, r.human_masks, `${r.heldout_masks} masks`,
                     `${fmt(r.miou_before)} → ${fmt(r.miou_after)}`]) {
      const td = document.createElement("td"); td.textContent = v; tr.append(td);
    }
    body.append(tr);
  }
}

async function poll() {
  try { showRetrain(await api("/api/retrain")); } catch (e) { /* the next poll retries */ }
  setTimeout(poll, 2000);
}

$("retrain").onclick = async () => {
  try { const r = await api("/api/retrain", {}); status(r.message); showRetrain(await api("/api/retrain")); }
  catch (e) { status(e.message, true); }
};
$("accept").onclick = accept;
$("cycle").onclick = cycle;
$("undo").onclick = undo;
$("clear").onclick = clearPrompts;
$("next").onclick = () => go(1);
$("prev").onclick = () => go(-1);
window.addEventListener("resize", fitStage);

(async () => {
  try {
    const state = await api("/api/state");
    S.images = state.images;
    showRetrain(state);
    const start = Math.max(0, S.images.findIndex((e) => e.id === state.current));
    await openImage(start);
  } catch (e) { status(e.message, true); }
  setTimeout(poll, 2000);
})();
