// The playground: builds the form from /playground/config and the chosen model's card of
// GET /v1/models (the model picker), streams POST /generate (server-sent events: queued, preview per
// scale, completed or error) and keeps a local history. The input image and its mask (image-to-image)
// are image.js's, loaded first.
// Plain browser JavaScript, no build step, no third-party code.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "infinity-playground.history";
const API_KEY = "infinity-playground.api-key";
const MODEL_KEY = "infinity-playground.model";   // the last model picked, on this device
const HISTORY_MAX = 12;
const THUMB_PX = 96;
// Form controls named by the `param` of an API error.
const FIELDS = { model: "model", prompt: "prompt", negative_prompt: "negative-prompt", n: "n", cfg: "cfg",
                 tau: "tau", seed: "seed", pn: "pn", aspect_ratio: "aspects", image: "image-file",
                 mask: "mask-canvas", strength: "strength", paste: "paste" };
const TITLES = { 400: "Invalid request", 401: "API key needed", 404: "Not found", 413: "Request too large",
                 429: "Server busy", 499: "Cancelled", 500: "Server error", 503: "Server unavailable",
                 504: "Too slow" };
// Errors that arrive inside the stream carry a code, not a status.

let config = null;
let models = [];            // what each served model offers (modelFromCard); the first model's alone until listed
let model = null;           // the one picked
let modelsListed = false;   // GET /v1/models answered (it needs the key where the server has keys)
let modelsAsked = 0;        // the latest GET /v1/models: an older answer (an older key) is dropped
let keyTimer = null;
let run = null;             // the generation in flight: {controller, started, timer, tiles, done}
let objectUrls = [];        // images of the last generation, released when the next one starts

// ---- start-up ------------------------------------------------------------------------------

async function boot() {
  restoreKey();
  bindEvents();
  renderHistory();
  try {
    const response = await fetch("/playground/config");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    config = await response.json();
  } catch (err) {
    showError("Cannot load the server's options", `${err.message}. Is the server running?`);
    $("generate").disabled = true;
    return;
  }
  applyConfig();
  loadModels();
}

function bindEvents() {
  $("form").addEventListener("submit", generate);
  $("form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("form").requestSubmit(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && run) cancel(); });
  $("cancel").addEventListener("click", cancel);
  $("random-seed").addEventListener("change", syncSeed);
  $("pn").addEventListener("change", updateSizes);
  $("model").addEventListener("change", () => {
    safeSet(localStorage, MODEL_KEY, $("model").value);
    applyModel();
  });
  $("api-key").addEventListener("input", storeKey);
  $("remember-key").addEventListener("change", storeKey);
  $("clear-history").addEventListener("click", () => { saveHistory([]); renderHistory(); });
  bindImageInput();
}

function applyConfig() {
  $("prompt").maxLength = config.max_prompt_chars;
  $("n").max = config.max_n;
  $("cfg").value = config.default_cfg;
  $("tau").value = config.default_tau;
  models = [modelFromConfig(config)];
  showModels();
  updateKeyState();
  if (config.auth_required && !$("api-key").value) $("key-box").open = true;
}

// ---- the model picker: each model offers its own sizes ----------------------------------------------

// What the page needs of a model: {name, budgets, defaultPn, templates: [{aspect_ratio, h_div_w,
// sizes: {pn: [w, h]}}], fixed: [w, h] of a one-size model, else null}. From its /v1/models card...
function modelFromCard(card) {
  const size = (wxh) => wxh.split("x").map(Number);
  const templates = (card.templates ?? []).map((t) => ({ aspect_ratio: t.aspect_ratio, h_div_w: t.h_div_w,
    sizes: Object.fromEntries(Object.entries(t.sizes).map(([pn, wxh]) => [pn, size(wxh)])) }));
  return { name: card.id, budgets: card.pixel_budgets, defaultPn: card.default_pn, templates,
           fixed: templates.length ? null : size(card.sizes[0]) };
}

// ...or, until the list comes (or without the key it needs), the first model's from /playground/config.
function modelFromConfig(c) {
  return { name: c.model, budgets: c.pixel_budgets, defaultPn: c.default_pn,
           templates: c.fixed_size ? [] : c.templates, fixed: c.fixed_size };
}

// Every served model, from GET /v1/models, with the key where the server needs one: without it (401) the
// picker keeps the first model, and typing the key asks again.
async function loadModels() {
  const asked = ++modelsAsked;
  let response, cards;
  try {
    response = await fetch("/v1/models", { headers: authHeader() });
    cards = response.ok ? (await response.json()).data : null;
  } catch {
    cards = null;                           // the page keeps the first model; generating says what is wrong
  }
  if (asked !== modelsAsked || modelsListed) return;
  if (!Array.isArray(cards) || !cards.length) {
    $("model-hint").textContent = response?.status === 401 ? "Enter the API key to list every model."
      : "Cannot list the models: the first one is offered.";
    return;
  }
  models = cards.map(modelFromCard);
  modelsListed = true;
  showModels();
}

function showModels() {
  const select = $("model");
  const wanted = safeGet(localStorage, MODEL_KEY) ?? select.value;
  select.replaceChildren(...models.map((m) => new Option(m.name, m.name)));
  select.value = models.some((m) => m.name === wanted) ? wanted : models[0].name;
  select.disabled = models.length < 2;     // one model: shown, nothing to choose
  if (modelsListed) {
    $("model-hint").textContent = models.length < 2 ? "The only model on this server."
      : `${models.length} models here, each with its own sizes.`;
  }
  applyModel();
}

// The chosen model's pixel budgets (its default picked when the model changes) and aspect ratios.
function applyModel() {
  const previous = model;
  model = models.find((m) => m.name === $("model").value) ?? models[0];
  const fixed = model.fixed;
  $("model-line").textContent = `Model ${model.name}` +
    (fixed ? ` · ${fixed[0]}×${fixed[1]} images` : "") + ` · up to ${config.max_n} images per request` +
    (config.auth_required ? " · this server needs an API key" : "");
  if (JSON.stringify(model) === JSON.stringify(previous)) return;   // same options: the form stays as it is
  const pn = previous?.name === model.name ? $("pn").value : model.defaultPn;
  $("pn").replaceChildren(...model.budgets.map((b) => new Option(b, b)));
  $("pn").value = model.budgets.includes(pn) ? pn : model.budgets.includes(model.defaultPn) ? model.defaultPn
    : model.budgets[0];
  $("pn").disabled = Boolean(fixed);
  renderAspects();
}

function renderAspects() {
  const box = $("aspects");
  const before = document.querySelector('input[name="aspect"]:checked')?.value;
  const offered = model.templates;      // none for a one-size model
  // The aspect ratio in use if this model offers it, else the one nearest an input image, else 1:1.
  const keep = offered.find((t) => t.aspect_ratio === before)
    ?? (source && nearestTemplate(source.width, source.height)) ?? offered.find((t) => t.h_div_w === 1) ?? offered[0];
  box.replaceChildren();
  for (const t of offered) {
    const [w, h] = t.aspect_ratio.split(":").map(Number);
    const label = document.createElement("label");
    label.className = "aspect";
    const input = document.createElement("input");
    Object.assign(input, { type: "radio", name: "aspect", value: t.aspect_ratio, checked: t === keep });
    input.addEventListener("change", updateSizes);
    const shape = document.createElement("span");
    shape.className = "shape";
    shape.setAttribute("aria-hidden", "true");
    const scale = 28 / Math.max(w, h);          // the longer side is 28 px
    shape.style.width = `${Math.round(w * scale)}px`;
    shape.style.height = `${Math.round(h * scale)}px`;
    const text = document.createElement("span");
    text.textContent = t.aspect_ratio;
    label.append(input, shape, text);
    box.append(label);
  }
  updateSizes();
}

function selectedTemplate() {
  const checked = document.querySelector('input[name="aspect"]:checked');
  return model.templates.find((t) => t.aspect_ratio === checked?.value) ?? model.templates[0];
}

function updateSizes() {
  if (model.fixed) {
    const [w, h] = model.fixed;
    $("size-hint").textContent = `This model makes one size only: ${w}×${h} pixels.`;
    return;
  }
  const template = selectedTemplate();
  for (const option of $("pn").options) {
    const [w, h] = template.sizes[option.value];
    option.textContent = `${option.value} (${w}×${h})`;
  }
  const [w, h] = template.sizes[$("pn").value];
  $("size-hint").textContent = `${template.aspect_ratio} at ${$("pn").value}: ${w}×${h} pixels.`;
}

// An input image picks the template nearest its shape (as the server does without a size); the user may change it.
function selectAspectFor(width, height) {
  if (!model || model.fixed) return;
  const nearest = nearestTemplate(width, height);
  const radio = [...document.querySelectorAll('input[name="aspect"]')].find((r) => r.value === nearest.aspect_ratio);
  if (radio) radio.checked = true;
  updateSizes();
}

function nearestTemplate(width, height) {
  const distance = (t) => Math.abs(t.h_div_w - height / width);
  return model.templates.reduce((a, b) => (distance(b) < distance(a) ? b : a), model.templates[0]);
}

function syncSeed() {
  const random = $("random-seed").checked;
  $("seed").disabled = random;
  if (!random && $("seed").value === "" && $("seed").dataset.used) $("seed").value = $("seed").dataset.used;
}

// ---- API key: per tab (sessionStorage), or on this device when asked (localStorage) ---------------

function restoreKey() {
  const remembered = safeGet(localStorage, API_KEY);
  $("api-key").value = safeGet(sessionStorage, API_KEY) ?? remembered ?? "";
  $("remember-key").checked = remembered !== null;
}

function storeKey() {
  const key = $("api-key").value.trim();
  safeSet(sessionStorage, API_KEY, key || null);
  safeSet(localStorage, API_KEY, key && $("remember-key").checked ? key : null);
  $("api-key").removeAttribute("aria-invalid");
  updateKeyState();
  if (!modelsListed) {                     // the key may be what listing the models needed
    clearTimeout(keyTimer);
    keyTimer = setTimeout(loadModels, 300);
  }
}

function updateKeyState() {
  const key = $("api-key").value.trim();
  $("key-state").textContent = key ? "(set)" : config?.auth_required ? "(required by this server)" : "(not needed)";
}

// ---- one generation ------------------------------------------------------------------------------

function requestBody() {
  const body = { prompt: $("prompt").value.trim(), model: model.name, stream: true };
  const image = imageFields();          // none without an input image: the request of a text-only page
  if (!body.prompt && !image.image) return { problem: ["prompt", "Type a prompt first, or choose an image to vary."] };
  const negative = $("negative-prompt").value.trim();
  if (negative) body.negative_prompt = negative;
  if (!model.fixed) {
    body.aspect_ratio = selectedTemplate().aspect_ratio;
    body.pn = $("pn").value;
  }
  for (const [id, name] of [["n", "n"], ["cfg", "cfg"], ["tau", "tau"], ["seed", "seed"]]) {
    const input = $(id);
    if (input.disabled) continue;
    if (input.validity.badInput) return { problem: [name, `\`${name}\` must be a number.`] };
    if (input.value !== "") body[name] = Number(input.value);
  }
  if (!$("random-seed").checked && body.seed === undefined) {
    return { problem: ["seed", "Enter a seed, or tick Random."] };
  }
  return { body: Object.assign(body, image) };
}

async function generate(event) {
  event.preventDefault();
  if (run || !config) return;
  clearError();
  const { body, problem } = requestBody();
  if (problem) { showError("Check the form", problem[1], problem[0]); return; }
  startRun(body);
  const current = run;
  const kind = imageKind();
  try {
    const response = await fetch("/generate", { method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeader() },
      signal: current.controller.signal });
    if (!response.ok) {
      const payload = await response.json().catch(() => null);
      showApiError(response.status, payload?.error ?? { message: response.statusText },
                   response.headers.get("Retry-After"));
      setStatus("Not generated.");
      return;
    }
    for await (const { event: name, data } of serverEvents(response)) {
      if (name === "queued") onQueued(data);
      else if (name === "preview") onPreview(data);
      else if (name === "completed") await onCompleted(data, body, kind);
      else if (name === "error") {
        showApiError(config.error_statuses[data.error.code] ?? 500, data.error, null);
        setStatus("Not generated.");
        current.done = true;
      }
    }
    if (!current.done) {
      showError("Connection lost", "The stream ended before the image was finished.");
      setStatus("Not generated.");
    }
  } catch (err) {
    if (err.name === "AbortError") setStatus("Cancelled: the server dropped the request.");
    else { showError("Cannot reach the server", err.message); setStatus("Not generated."); }
  } finally {
    endRun();
  }
}

function startRun(body) {
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls = [];
  run = { controller: new AbortController(), started: performance.now(), timer: null, done: false, tiles: [] };
  $("images").replaceChildren();
  $("scales").replaceChildren();
  $("scales-title").hidden = true;
  for (let i = 0; i < (body.n ?? 1); i++) run.tiles.push(addTile(i));
  if (window.matchMedia("(max-width: 799px)").matches) $("result").scrollIntoView({ block: "start" });
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("result").setAttribute("aria-busy", "true");
  setStatus("Sending…");
}

function endRun() {
  clearInterval(run.timer);
  for (const placeholder of $("images").querySelectorAll(".placeholder")) placeholder.closest(".tile").remove();
  run = null;
  $("generate").disabled = false;
  $("cancel").disabled = true;
  $("result").removeAttribute("aria-busy");
}

function cancel() {
  if (run) run.controller.abort();
}

function authHeader() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// Server-sent events over fetch (EventSource cannot POST): blocks of "event:" and "data:" lines.
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event: name, data: JSON.parse(data.join("\n")) };
    }
  }
}

function onQueued(data) {                  // sent on admission, then again whenever the queue moves
  clearInterval(run.timer);
  const ahead = data.images_ahead;
  const where = ahead === null || ahead === undefined ? "Starting"
    : ahead === 0 ? "Queued: next in line" : `Queued: ${ahead} image${ahead === 1 ? "" : "s"} ahead of yours`;
  const tick = () => setStatus(`${where} · waiting ${seconds(performance.now() - run.started)}`);
  tick();
  run.timer = setInterval(tick, 250);
}

function onPreview(data) {
  clearInterval(run.timer);
  const step = `scale ${data.scale_index + 1} of ${data.num_scales}`;
  setStatus(`Generating: ${step} · ${data.elapsed.toFixed(2)} s`);
  data.images.forEach((b64, i) => {
    if (run.tiles[i]) showInTile(run.tiles[i], imageUrl(b64), `Preview of image ${i + 1}, ${step}`);
  });
  addScale(data.images[0], `${data.scale_index + 1}/${data.num_scales} · ${data.elapsed.toFixed(2)} s`, step);
}

async function onCompleted(data, body, kind) {
  run.done = true;
  clearInterval(run.timer);
  const total = seconds(performance.now() - run.started);
  const seeds = data.images.map((image) => image.seed);
  const finals = data.images.map((image, i) => {
    const tile = run.tiles[i] ?? addTile(i);
    const url = imageUrl(image.b64);
    addDownload(tile, url, image.seed, data.output_format);
    const what = body.prompt ? `for “${body.prompt}”` : "varied from the input image";
    return showInTile(tile, url, `Image ${i + 1} ${what}, seed ${image.seed}`);
  });
  addScale(data.images[0].b64, `${data.num_scales}/${data.num_scales} · ${total} · final`, "final image");
  $("seed").dataset.used = seeds[0];
  $("seed-used").textContent = `Seed used: ${seeds.join(", ")}`;
  setStatus(`Done in ${total}: ${data.images.length} image${data.images.length === 1 ? "" : "s"} of ` +
            `${data.width}×${data.height}, ${data.num_scales} scales, seed ${seeds.join(", ")}.`);
  await finals[0].decode().catch(() => null);
  addHistory({ id: data.id, at: new Date().toISOString(), model: data.model ?? body.model, prompt: body.prompt,
               negative_prompt: body.negative_prompt ?? "", aspect_ratio: body.aspect_ratio ?? null,
               pn: body.pn ?? null, cfg: body.cfg ?? null, tau: body.tau ?? null, n: body.n ?? 1, seeds, kind,
               strength: body.strength ?? null,
               width: data.width, height: data.height, thumb: thumbnail(finals[0]) });
}

// ---- result area -------------------------------------------------------------------------------

function addTile(i) {
  const figure = document.createElement("figure");
  figure.className = "tile";
  const placeholder = document.createElement("div");
  placeholder.className = "placeholder";
  placeholder.textContent = `Image ${i + 1}: waiting`;
  const caption = document.createElement("figcaption");
  figure.append(placeholder, caption);
  $("images").append(figure);
  return figure;
}

function showInTile(figure, url, alt) {
  let img = figure.querySelector("img");
  if (!img) {
    img = document.createElement("img");
    figure.querySelector(".placeholder").replaceWith(img);
  }
  img.src = url;
  img.alt = alt;
  return img;
}

function addDownload(figure, url, seed, format) {
  const link = document.createElement("a");
  link.href = url;
  link.download = `infinity-seed${seed}.${format === "jpeg" ? "jpg" : format}`;
  link.textContent = `Download (seed ${seed})`;
  figure.querySelector("figcaption").replaceChildren(link);
}

function addScale(b64, caption, alt) {
  const item = document.createElement("li");
  const img = document.createElement("img");
  img.src = imageUrl(b64);
  img.alt = alt;
  const text = document.createElement("span");
  text.textContent = caption;
  item.append(img, text);
  $("scales").append(item);
  $("scales-title").hidden = false;
}

function imageUrl(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  objectUrls.push(url);
  return url;
}

function setStatus(text) {
  $("status").textContent = text;
}

function showApiError(status, error, retryAfter) {
  const retry = retryAfter ? `Retry in ${retryAfter} s.` : "";
  const hint = status === 401 ? "Enter the server's key under “API key”." : retry;
  showError(`${TITLES[status] ?? "Error"} (${status})`, `${error.message ?? "unknown error"}. ${hint}`.trim(),
            error.param);
  if (status === 401) {
    $("key-box").open = true;
    $("api-key").setAttribute("aria-invalid", "true");
    $("api-key").focus();
  }
}

function showError(title, message, param) {
  const box = $("error");
  const strong = document.createElement("strong");
  strong.textContent = title;
  box.replaceChildren(strong, document.createTextNode(` ${message}`));
  box.hidden = false;
  const field = param && $(FIELDS[param]);
  if (field) {
    field.setAttribute("aria-invalid", "true");
    (field.querySelector("input") ?? field).focus();
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}

// ---- history (this browser only) -------------------------------------------------------------------

function thumbnail(img) {
  const scale = THUMB_PX / Math.max(img.naturalWidth, img.naturalHeight, 1);
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = scale < 1;      // small images stay crisp when enlarged
  context.drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/png");
}

function loadHistory() {
  try {
    const items = JSON.parse(safeGet(localStorage, HISTORY_KEY) ?? "[]");
    return Array.isArray(items) ? items.filter((e) => typeof e?.prompt === "string" && Array.isArray(e.seeds)) : [];
  } catch {
    return [];
  }
}

function saveHistory(items) {
  // Thumbnails are small, but storage is finite: drop the oldest until it fits.
  for (let keep = items.length; keep >= 0; keep--) {
    if (safeSet(localStorage, HISTORY_KEY, JSON.stringify(items.slice(0, keep)))) return;
  }
}

function addHistory(entry) {
  saveHistory([entry, ...loadHistory()].slice(0, HISTORY_MAX));
  renderHistory();
}

function renderHistory() {
  const items = loadHistory();
  $("history-empty").hidden = items.length > 0;
  $("history").replaceChildren(...items.map(historyItem));
}

function historyItem(entry) {
  const item = document.createElement("li");
  const img = document.createElement("img");
  img.src = typeof entry.thumb === "string" && entry.thumb.startsWith("data:image/") ? entry.thumb : "";
  img.alt = "";
  const text = document.createElement("div");
  const prompt = document.createElement("p");
  prompt.className = "prompt";
  prompt.textContent = entry.prompt || "(no prompt)";
  const details = document.createElement("p");
  details.className = "muted";
  const input = entry.kind && `${entry.kind} of an image, strength ${entry.strength}`;
  details.textContent = [entry.model, input, `seed ${entry.seeds.join(", ")}`, entry.aspect_ratio, entry.pn,
    entry.cfg !== null && `cfg ${entry.cfg}`, entry.tau !== null && `tau ${entry.tau}`,
    `${entry.width}×${entry.height}`, entry.negative_prompt && `not “${entry.negative_prompt}”`,
    new Date(entry.at).toLocaleString()].filter(Boolean).join(" · ");
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "secondary";
  reuse.textContent = "Reuse";
  reuse.setAttribute("aria-label", `Reuse the settings of “${entry.prompt}”, seed ${entry.seeds[0]}`);
  reuse.addEventListener("click", () => reuseEntry(entry));
  text.append(prompt, details, reuse);
  item.append(img, text);
  return item;
}

function reuseEntry(entry) {
  if (entry.model && entry.model !== model?.name && models.some((m) => m.name === entry.model)) {
    $("model").value = entry.model;
    safeSet(localStorage, MODEL_KEY, entry.model);
    applyModel();
  }
  $("prompt").value = entry.prompt;
  $("negative-prompt").value = entry.negative_prompt;
  if (entry.cfg !== null) $("cfg").value = entry.cfg;
  if (entry.tau !== null) $("tau").value = entry.tau;
  $("n").value = entry.n;
  $("random-seed").checked = false;
  $("seed").value = entry.seeds[0];
  syncSeed();
  const radio = [...document.querySelectorAll('input[name="aspect"]')].find((r) => r.value === entry.aspect_ratio);
  if (radio) radio.checked = true;
  if ([...$("pn").options].some((o) => o.value === entry.pn)) $("pn").value = entry.pn;
  if (config) updateSizes();
  $("prompt").focus();
}

function safeGet(storage, key) {
  try { return storage.getItem(key); } catch { return null; }
}

function safeSet(storage, key, value) {
  try {
    if (value === null) storage.removeItem(key);
    else storage.setItem(key, value);
    return true;
  } catch {
    return false;
  }
}

boot();
