// sam-train annotation page: prompts -> POST /api/predict (decoder on the cached embedding) -> mask overlay.
// Masks arrive and leave as uncompressed COCO RLE (column-major runs, first run background), so the
// accepted mask is exactly the one drawn. State is exposed on window.annot and as canvas data-* attributes.
"use strict";
const annot = {
  images: [], index: 0, image: null, scale: 1,
  points: [], labels: [], box: null, history: [],   // prompts of the current object; history for undo
  mask: null, accepted: [], latencies: [], seq: 0,
};
window.annot = annot;
const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch(path, opts);
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

function setStatus(state, text) {
  const el = document.getElementById("status");
  el.dataset.state = state;
  el.textContent = text || "";
}

function decodeRle(rle) {  // uncompressed COCO RLE -> Uint8Array of H*W in row-major order
  const [h, w] = rle.size;
  const out = new Uint8Array(h * w);
  let pos = 0, value = 0;
  for (const run of rle.counts) {
    if (value) for (let k = pos; k < pos + run; k++) out[(k % h) * w + Math.floor(k / h)] = 1;
    pos += run; value = 1 - value;
  }
  return out;
}

function overlay(bits, rgba) {
  const w = annot.image.width, h = annot.image.height;
  const layer = document.createElement("canvas");
  layer.width = w; layer.height = h;
  const lctx = layer.getContext("2d");
  const img = lctx.createImageData(w, h);
  for (let i = 0; i < w * h; i++) if (bits[i]) img.data.set(rgba, 4 * i);
  lctx.putImageData(img, 0, 0);
  ctx.drawImage(layer, 0, 0, w * annot.scale, h * annot.scale);
}

function draw() {
  if (!annot.image) return;
  const s = annot.scale;
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(annot.image, 0, 0, annot.image.width * s, annot.image.height * s);
  for (const m of annot.accepted) overlay(m.bits, [60, 200, 90, 110]);
  if (annot.mask) overlay(annot.mask.bits, [40, 130, 255, 140]);
  annot.points.forEach(([x, y], i) => {
    ctx.fillStyle = annot.labels[i] === 1 ? "#3f3" : "#f33";
    ctx.beginPath(); ctx.arc((x + 0.5) * s, (y + 0.5) * s, 4, 0, 2 * Math.PI); ctx.fill();
  });
  if (annot.box) {
    const [x0, y0, x1, y1] = annot.box;
    ctx.strokeStyle = "#fc3"; ctx.lineWidth = 2;
    ctx.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
  }
  const area = annot.mask ? annot.mask.area : 0;
  canvas.dataset.maskArea = String(area);
  canvas.dataset.accepted = String(annot.accepted.length);
  document.getElementById("mask-info").textContent = annot.mask ? `${area} px, predicted IoU ${annot.mask.score.toFixed(3)}` : "none";
  document.getElementById("accepted-count").textContent = String(annot.accepted.length);
}

async function loadImage(index) {
  canvas.dataset.embedded = "false";  // first: tests and users wait on this for the new image
  annot.index = index;
  annot.points = []; annot.labels = []; annot.box = null; annot.history = []; annot.mask = null;
  const info = annot.images[index];
  document.getElementById("image-name").textContent = `${index + 1}/${annot.images.length}: ${info.file_name}`;
  const img = new Image();
  img.src = `/api/image/${index}`;
  await img.decode();
  annot.image = img;
  annot.scale = Math.max(1, Math.min(8, Math.floor(768 / Math.max(img.width, img.height))));
  canvas.width = img.width * annot.scale; canvas.height = img.height * annot.scale;
  annot.accepted = (await api(`/api/annotations/${index}`)).map(r => ({ rle: r, bits: decodeRle(r) }));
  draw();
  setStatus("busy");
  await api("/api/embed", { image: index });  // encoder once per image; clicks only run the decoder
  canvas.dataset.embedded = "true";
  setStatus("idle");
}

async function predict(t0) {
  const seq = ++annot.seq;  // ignore answers to superseded prompts
  if (!annot.points.length && !annot.box) { annot.mask = null; draw(); return; }
  setStatus("busy");
  try {
    const res = await api("/api/predict", { image: annot.index, points: annot.points, labels: annot.labels, box: annot.box });
    if (seq !== annot.seq) return;
    annot.mask = { rle: { size: res.size, counts: res.counts }, bits: decodeRle(res), area: res.area, score: res.score };
    draw();
    const ms = performance.now() - t0;
    annot.latencies.push({ total_ms: ms, server_ms: res.server_ms });
    canvas.dataset.latencyMs = ms.toFixed(1);
    document.getElementById("latency").textContent = `${ms.toFixed(1)} (decoder ${res.server_ms.toFixed(1)})`;
    setStatus("idle");
  } catch (e) { setStatus("error", e.message); }
}

function imageXY(ev) {
  const r = canvas.getBoundingClientRect();
  const x = Math.min(annot.image.width - 1, Math.max(0, Math.floor((ev.clientX - r.left) / annot.scale)));
  const y = Math.min(annot.image.height - 1, Math.max(0, Math.floor((ev.clientY - r.top) / annot.scale)));
  return [x, y];
}

let down = null;
canvas.addEventListener("contextmenu", ev => ev.preventDefault());
canvas.addEventListener("mousedown", ev => { down = { xy: imageXY(ev), button: ev.button, shift: ev.shiftKey }; });
canvas.addEventListener("mouseup", ev => {
  if (!down || !annot.image) return;
  const t0 = performance.now();
  const [x0, y0] = down.xy, [x1, y1] = imageXY(ev);
  annot.history.push({ points: annot.points.slice(), labels: annot.labels.slice(), box: annot.box });
  if (Math.abs(x1 - x0) + Math.abs(y1 - y0) > 3) {  // a drag is a box (replaces the previous box)
    annot.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
  } else {
    annot.points.push([x0, y0]);
    annot.labels.push(down.button === 2 || down.shift ? 0 : 1);
  }
  down = null;
  draw();
  predict(t0);
});

async function accept() {
  if (!annot.mask || !annot.mask.area) return;
  const m = annot.mask;
  await api("/api/accept", { image: annot.index, size: m.rle.size, counts: m.rle.counts });
  annot.accepted.push({ rle: m.rle, bits: m.bits });
  annot.points = []; annot.labels = []; annot.box = null; annot.history = []; annot.mask = null; annot.seq++;
  draw();
}

async function undo() {
  if (annot.history.length) {
    const prev = annot.history.pop();
    annot.points = prev.points; annot.labels = prev.labels; annot.box = prev.box;
    await predict(performance.now());
  } else if (annot.accepted.length) {  // nothing left to undo on the current object: un-accept the last mask
    await api("/api/undo_accept", { image: annot.index });
    annot.accepted.pop();
    draw();
  }
}

async function save() {
  const res = await api("/api/save", {});
  document.getElementById("saved").textContent = `saved ${res.annotations} masks to ${res.path}`;
  document.getElementById("saved").dataset.saved = String(res.annotations);
  return res;
}

document.addEventListener("keydown", async ev => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  try {
    if (ev.key === "a") await accept();
    else if (ev.key === "z") await undo();
    else if (ev.key === "n") await loadImage((annot.index + 1) % annot.images.length);
    else if (ev.key === "p") await loadImage((annot.index - 1 + annot.images.length) % annot.images.length);
    else if (ev.key === "s") await save();
  } catch (e) { setStatus("error", e.message); }
});

(async () => {
  annot.images = await api("/api/images");
  await loadImage(0);
  document.body.dataset.ready = "true";
})();
