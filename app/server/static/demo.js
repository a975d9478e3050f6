// The web demo: sample, complete and score images through the server's public API, nothing else.
//
// Streams are POST requests (EventSource cannot POST), so they are read with fetch and a body reader and
// split into Server-Sent Events here: `row` events ({row, pixels: n x C x W}), then `done` (the JSON body)
// or `error` ({error: {type, message}}). Images live in 28x28 (the model's size) canvases, enlarged by CSS
// with `image-rendering: pixelated`, so what is on the canvas is exactly the model's pixels.

const LN2 = Math.log(2);
const HEAT_MAX_BITS = 8; // the top of the heat map's scale: a blind guess among 256 levels

const state = {
  models: [],
  model: null, // the /models entry in use
  examples: [], // examples.json entries, each with its decoded pixels
};

// --- small helpers -------------------------------------------------------------------------------------

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function formatSeconds(seconds) {
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

function formatPercent(p) {
  return p >= 0.995 ? ">99%" : p < 0.01 ? "<1%" : `${Math.round(100 * p)}%`;
}

function mean(values) {
  return values.reduce((a, b) => a + b, 0) / values.length;
}

function showError(where, message) {
  const box = where.querySelector(".error") ?? where;
  box.textContent = message;
  box.hidden = false;
}

function clearError(where) {
  const box = where.querySelector(".error") ?? where;
  box.hidden = true;
  box.textContent = "";
}

// --- the API -------------------------------------------------------------------------------------------

class ApiError extends Error {}

// The server's own words for a failed response: {"error": {"message"}}, else the HTTP status.
async function errorFrom(response) {
  let message = `the server answered ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
  } catch {
    // not JSON (a gateway's error page, say): the status line is all there is
  }
  return new ApiError(message);
}

// The API key, when the server asks for one (PIXELCNN_API_KEY): typed into the page, kept in this tab's
// sessionStorage only (gone when the tab closes, never sent anywhere but this server), sent as a bearer token.
const API_KEY_ITEM = "pixelcnn-api-key";

function apiKey() {
  return sessionStorage.getItem(API_KEY_ITEM) ?? "";
}

function setUpApiKey() {
  const input = document.getElementById("api-key");
  input.value = apiKey();
  input.addEventListener("input", () => {
    const key = input.value.trim();
    if (key) sessionStorage.setItem(API_KEY_ITEM, key);
    else sessionStorage.removeItem(API_KEY_ITEM);
  });
}

async function call(path, init = {}) {
  const key = apiKey();
  const headers = new Headers(init.headers);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`could not reach the server (${error.message})`);
  }
  if (response.status === 401) {
    const error = await errorFrom(response);
    throw new ApiError(`${error.message} (enter the server's API key at the top of the page)`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

// Server-Sent Events from a fetch response, as {event, data} with data parsed from JSON.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event = text;
          else if (field === "data") data.push(text);
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // a consumer that stops early hangs up; after the end it is a no-op
  }
}

// --- pixels --------------------------------------------------------------------------------------------

function pixelCanvas(width, height, label) {
  const canvas = element("canvas", { class: "pixels", width, height, role: "img", "aria-label": label });
  canvas.getContext("2d").imageSmoothingEnabled = false;
  return canvas;
}

// One row of one image: values (C x W) into row `y` of the canvas.
function drawRow(canvas, y, channels) {
  const width = channels[0].length;
  const row = new ImageData(width, 1);
  for (let x = 0; x < width; x++) {
    const gray = channels.length === 1;
    row.data[4 * x] = channels[0][x];
    row.data[4 * x + 1] = gray ? channels[0][x] : channels[1][x];
    row.data[4 * x + 2] = gray ? channels[0][x] : channels[2][x];
    row.data[4 * x + 3] = 255;
  }
  canvas.getContext("2d").putImageData(row, 0, y);
}

// A gray image (H x W array of 0..255) onto a canvas of its size.
function drawGray(canvas, gray) {
  const height = gray.length;
  for (let y = 0; y < height; y++) drawRow(canvas, y, [gray[y]]);
}

// Image file -> H x W gray levels as the server computes them for a grayscale model (ITU-R 601-2 luma).
async function decodeGray(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  const { data } = context.getImageData(0, 0, bitmap.width, bitmap.height);
  const gray = [];
  for (let y = 0; y < bitmap.height; y++) {
    const row = new Array(bitmap.width);
    for (let x = 0; x < bitmap.width; x++) {
      const i = 4 * (y * bitmap.width + x);
      row[x] = Math.floor((data[i] * 19595 + data[i + 1] * 38470 + data[i + 2] * 7471 + 0x8000) / 65536);
    }
    gray.push(row);
  }
  return gray;
}

async function grayPng(gray) {
  const canvas = new OffscreenCanvas(gray[0].length, gray.length);
  const image = new ImageData(gray[0].length, gray.length);
  gray.flat().forEach((value, i) => image.data.set([value, value, value, 255], 4 * i));
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas.convertToBlob({ type: "image/png" });
}

// --- models --------------------------------------------------------------------------------------------

function modelShape() {
  const [channels, height, width] = state.model.shape;
  return { channels, height, width };
}

function fillClassSelects() {
  for (const select of document.querySelectorAll("[data-class-select]")) {
    const previous = select.value;
    select.replaceChildren();
    if (!state.model.conditional) {
      select.append(element("option", { value: "", text: "— (this model has no classes)" }));
      select.disabled = true;
      continue;
    }
    select.disabled = false;
    // In Complete, no class means the server infers it from the kept rows (p(class | kept rows)).
    const inferred = select.closest("#complete-form") !== null;
    select.append(element("option", { value: "", text: inferred ? "From the kept rows" : "Any (drawn per image)" }));
    for (const cls of state.model.classes) select.append(element("option", { value: cls.name, text: cls.name }));
    if ([...select.options].some((option) => option.value === previous)) select.value = previous;
  }
}

function describeModel(model) {
  const bits = model.metrics?.test_bits_per_dim;
  const [c, h, w] = model.shape;
  const parts = [`${model.arch === "gated" ? "Gated PixelCNN" : "PixelCNN"}`, `${w}×${h}${c === 3 ? " colour" : ""}`];
  if (model.metrics?.dataset) parts.push(`trained on ${model.metrics.dataset}`);
  if (typeof bits === "number") parts.push(`${bits.toFixed(3)} bits/dim on its test set`);
  const summary = parts.join(" · ");
  return model.note ? `${summary}. ${model.note}` : summary;
}

function selectModel(name) {
  state.model = state.models.find((model) => model.name === name);
  document.getElementById("model-info").textContent = describeModel(state.model);
  fillClassSelects();
  editor.resize();
  renderExamples();
}

async function loadModels() {
  const select = document.getElementById("model");
  try {
    state.models = await (await call("/models")).json();
  } catch (error) {
    document.getElementById("model-info").textContent = "No model";
    showError(document.getElementById("page-error"), `Could not load the models: ${error.message}`);
    return;
  }
  if (!state.models.length) {
    showError(document.getElementById("page-error"), "The server has no model loaded.");
    return;
  }
  for (const model of state.models) {
    const text = model.baseline ? `${model.name} (baseline, not for use)` : model.name;
    select.append(element("option", { value: model.name, text }));
  }
  select.value = (state.models.find((model) => model.default) ?? state.models[0]).name;
  select.addEventListener("change", () => selectModel(select.value));
  selectModel(select.value);
}

// --- tabs ----------------------------------------------------------------------------------------------

const VIEWS = ["sample", "complete", "likelihood"];

function showView(name, focus = false) {
  const view = VIEWS.includes(name) ? name : VIEWS[0];
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const selected = tab.dataset.view === view;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    if (selected && focus) tab.focus();
  }
  for (const other of VIEWS) document.getElementById(`view-${other}`).hidden = other !== view;
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  for (const tab of tabs) {
    tab.addEventListener("click", () => {
      history.replaceState(null, "", `#${tab.dataset.view}`);
      showView(tab.dataset.view);
    });
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step && event.key !== "Home" && event.key !== "End") return;
      event.preventDefault();
      const index = tabs.indexOf(tab);
      const next = event.key === "Home" ? 0 : event.key === "End" ? tabs.length - 1
        : (index + step + tabs.length) % tabs.length;
      history.replaceState(null, "", `#${tabs[next].dataset.view}`);
      showView(tabs[next].dataset.view, true);
    });
  }
  window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
  showView(location.hash.slice(1));
}

// --- streamed generation (sample and complete) ---------------------------------------------------------

// The request fields a generation form holds: empty fields are left out, so the server's defaults apply
// and its validation (with its messages) is the only one.
function generationFields(form) {
  const fields = {};
  for (const [key, value] of new FormData(form)) {
    if (String(value).trim() !== "") fields[key] = String(value).trim();
  }
  return fields;
}

// A number when the text is one, else the text as typed (the server then says what it expected).
function asNumber(text) {
  const value = Number(text);
  return text !== "" && Number.isFinite(value) ? value : text;
}

class GenerationView {
  constructor(section, form) {
    this.section = section;
    this.form = form;
    this.gallery = section.querySelector("[data-gallery]");
    this.stats = section.querySelector(".stats");
    this.start = form.querySelector("[data-start]");
    this.stop = form.querySelector("[data-stop]");
    this.controller = null;
    this.stop.addEventListener("click", () => this.controller?.abort());
  }

  setRunning(running) {
    this.start.disabled = running;
    this.stop.disabled = !running;
    document.getElementById("model").disabled = running; // the canvases have the running model's shape
    this.stats.setAttribute("aria-busy", String(running)); // screen readers: the numbers once, at the end
    this.section.dataset.state = running ? "running" : "idle";
  }

  showStats(entries) {
    this.stats.replaceChildren();
    for (const [term, value, extra] of entries) {
      const dd = element("dd", {}, value);
      if (extra) dd.append(" ", extra);
      this.stats.append(element("div", { class: "stat" }, element("dt", { text: term }), dd));
    }
  }

  // Cards with one canvas each; `prefill(canvas)` draws what is known before the first row arrives, and
  // a completion's cards mark where the kept rows end.
  makeCards(count, prefill, firstRow) {
    const { width, height } = modelShape();
    this.cards = [];
    this.gallery.replaceChildren();
    for (let i = 0; i < count; i++) {
      const canvas = pixelCanvas(width, height, `image ${i + 1}`);
      prefill(canvas);
      const cursor = element("div", { class: "cursor", "aria-hidden": "true" });
      const caption = element("figcaption", {}, element("span", { class: "caption-title", text: "…" }),
        element("span", { class: "caption-value" }));
      const frame = element("div", { class: "frame" }, canvas, cursor);
      if (firstRow > 0) {
        const kept = element("div", { class: "kept-line", title: `the top ${firstRow} rows are the image's own` });
        kept.style.top = `${(firstRow / height) * 100}%`;
        frame.append(kept);
      }
      const card = element("figure", { class: "card" }, frame, caption);
      this.gallery.append(card);
      this.cards.push({ canvas, cursor, caption, card });
    }
  }

  moveCursors(row) {
    const { height } = modelShape();
    for (const { cursor } of this.cards) {
      cursor.hidden = row === null;
      if (row !== null) cursor.style.top = `${((row + 1) / height) * 100}%`;
    }
  }

  // POST the request, draw its rows as they arrive, then report the `done` body (or the error).
  async run({ path, body, headers, firstRow, count, prefill }) {
    clearError(this.section);
    this.setRunning(true);
    const { height } = modelShape();
    const rowsToDraw = height - firstRow;
    const started = performance.now();
    let firstRowAt = null;
    let rows = 0;
    let seed = null;
    this.controller = new AbortController();
    const progress = () => {
      const elapsed = (performance.now() - started) / 1000;
      return [
        ["Seed", seed === null ? "…" : String(seed)],
        ["First row", firstRowAt === null ? "…" : formatSeconds(firstRowAt)],
        ["Rows", `${rows} / ${rowsToDraw}`],
        ["Speed", rows ? `${(rows / elapsed).toFixed(1)} rows/s` : "…"],
      ];
    };
    this.showStats(progress());
    try {
      const response = await call(path, { method: "POST", body, headers, signal: this.controller.signal });
      seed = response.headers.get("X-Seed");
      this.makeCards(count, prefill, firstRow); // once the server has accepted the request
      this.moveCursors(firstRow - 1);
      let result = null;
      for await (const { event, data } of serverSentEvents(response)) {
        if (event === "row") {
          if (firstRowAt === null) firstRowAt = (performance.now() - started) / 1000;
          data.pixels.forEach((channels, i) => drawRow(this.cards[i].canvas, data.row, channels));
          rows += 1;
          this.moveCursors(data.row);
          this.showStats(progress());
        } else if (event === "done") {
          result = data;
        } else if (event === "error") {
          throw new ApiError(data.error?.message ?? "the server reported an error during the stream");
        }
      }
      if (result === null) throw new ApiError("the stream ended before the result arrived (connection lost?)");
      this.finish(result, (performance.now() - started) / 1000, firstRowAt, rows);
    } catch (error) {
      if (error.name === "AbortError") {
        this.showStats([...progress(), ["Stopped", `after ${rows} of ${rowsToDraw} rows`]]);
        this.section.dataset.outcome = "stopped";
      } else {
        showError(this.section, error.message);
        this.section.dataset.outcome = "error";
      }
    } finally {
      if (this.cards) this.moveCursors(null);
      this.controller = null;
      this.setRunning(false);
    }
  }

  finish(result, total, firstRowAt, rows) {
    result.images.forEach((image, i) => {
      const { caption } = this.cards[i];
      caption.querySelector(".caption-title").textContent = image.label_name ?? `image ${i + 1}`;
      caption.querySelector(".caption-value").textContent = `${result.bits_per_dim[i].toFixed(2)} bits/dim`;
      caption.querySelector(".caption-belief")?.remove();
      if (image.class_probabilities) {
        // A completion without a class: the server drew it from p(class | kept rows); say what it saw.
        const [name, p] = Object.entries(image.class_probabilities).sort((a, b) => b[1] - a[1])[0];
        caption.append(element("span", { class: "caption-belief", text: `looks like ${name} (${formatPercent(p)})` }));
      }
    });
    const replay = element("button", { type: "button", class: "link", text: "replay" });
    replay.addEventListener("click", () => {
      this.form.elements.seed.value = String(result.seed);
      this.form.requestSubmit();
    });
    this.showStats([
      ["Seed", String(result.seed), replay],
      ["First row", formatSeconds(firstRowAt ?? total)],
      ["Speed", `${(rows / total).toFixed(1)} rows/s`],
      ["Total", formatSeconds(total)],
      ["Bits/dim", `${mean(result.bits_per_dim).toFixed(3)}${result.images.length > 1 ? " (mean)" : ""}`],
    ]);
    this.section.dataset.outcome = "done";
  }
}

function setUpSample() {
  const section = document.getElementById("view-sample");
  const form = document.getElementById("sample-form");
  const view = new GenerationView(section, form);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!state.model || view.controller) return;
    const fields = generationFields(form);
    const body = { model: state.model.name, stream: true };
    // Numbers go as numbers when they are numbers, else as typed, for the server to name what is wrong.
    for (const key of ["n", "temperature", "seed"]) {
      if (key in fields) body[key] = asNumber(fields[key]);
    }
    if (fields.label) body.label = fields.label;
    view.run({
      path: "/sample",
      body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      firstRow: 0,
      count: body.n ?? 1,
      prefill: () => {},
    });
  });
}

// --- the drawing editor (complete) ---------------------------------------------------------------------

const editor = {
  canvas: null,
  pixels: [], // H x W gray levels: the image to complete
  knownRows: 14,
  tool: "draw",

  init() {
    this.canvas = document.getElementById("editor");
    this.line = document.getElementById("known-line");
    this.mask = document.querySelector(".editor-mask");
    this.setUpDrawing();
    this.setUpLine();
    for (const button of document.querySelectorAll("[data-tool]")) {
      button.addEventListener("click", () => {
        this.tool = button.dataset.tool;
        for (const other of document.querySelectorAll("[data-tool]")) {
          other.setAttribute("aria-pressed", String(other === button));
        }
      });
    }
    document.querySelector("[data-clear]").addEventListener("click", () => this.load(this.blank()));
  },

  blank() {
    const { height, width } = modelShape();
    return Array.from({ length: height }, () => new Array(width).fill(0));
  },

  // A model of another size needs a new, blank canvas; one of the same size keeps the drawing.
  resize() {
    const { height, width } = modelShape();
    if (this.pixels.length === height && this.pixels[0].length === width) return;
    this.canvas.width = width;
    this.canvas.height = height;
    this.line.setAttribute("aria-valuemax", String(height - 1));
    this.load(this.blank());
    this.setKnownRows(Math.floor(height / 2));
  },

  load(pixels) {
    this.pixels = pixels.map((row) => [...row]);
    drawGray(this.canvas, this.pixels);
  },

  setKnownRows(rows) {
    const { height } = modelShape();
    this.knownRows = Math.max(0, Math.min(height - 1, rows));
    const top = `${(this.knownRows / height) * 100}%`;
    this.line.style.top = top;
    this.mask.style.top = top;
    this.line.setAttribute("aria-valuenow", String(this.knownRows));
    this.line.setAttribute("aria-valuetext", `${this.knownRows} rows kept`);
    document.querySelector("[data-known-rows]").textContent = String(this.knownRows);
  },

  pixelAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    const { height, width } = modelShape();
    return [Math.floor(((event.clientX - rect.left) / rect.width) * width),
      Math.floor(((event.clientY - rect.top) / rect.height) * height)];
  },

  // A soft round brush: full ink at the centre, half at the four neighbours (like the pen strokes of
  // the training images); the eraser clears the same shape.
  paint(x, y) {
    const { height, width } = modelShape();
    for (const [dx, dy, ink] of [[0, 0, 255], [1, 0, 128], [-1, 0, 128], [0, 1, 128], [0, -1, 128]]) {
      const [px, py] = [x + dx, y + dy];
      if (px < 0 || py < 0 || px >= width || py >= height) continue;
      this.pixels[py][px] = this.tool === "erase" ? 0 : Math.max(this.pixels[py][px], ink);
      drawRow(this.canvas, py, [this.pixels[py]]);
    }
  },

  setUpDrawing() {
    let last = null;
    this.canvas.addEventListener("pointerdown", (event) => {
      this.canvas.setPointerCapture(event.pointerId);
      last = this.pixelAt(event);
      this.paint(...last);
    });
    this.canvas.addEventListener("pointermove", (event) => {
      if (last === null) return;
      const [x, y] = this.pixelAt(event);
      const steps = Math.max(Math.abs(x - last[0]), Math.abs(y - last[1]), 1);
      for (let s = 1; s <= steps; s++) {
        this.paint(Math.round(last[0] + ((x - last[0]) * s) / steps), Math.round(last[1] + ((y - last[1]) * s) / steps));
      }
      last = [x, y];
    });
    const end = () => { last = null; };
    this.canvas.addEventListener("pointerup", end);
    this.canvas.addEventListener("pointercancel", end);
  },

  setUpLine() {
    let dragging = false;
    const follow = (event) => {
      const rect = this.canvas.getBoundingClientRect();
      this.setKnownRows(Math.round(((event.clientY - rect.top) / rect.height) * modelShape().height));
    };
    this.line.addEventListener("pointerdown", (event) => {
      dragging = true;
      this.line.setPointerCapture(event.pointerId);
      this.line.focus();
      event.preventDefault();
    });
    this.line.addEventListener("pointermove", (event) => { if (dragging) follow(event); });
    this.line.addEventListener("pointerup", () => { dragging = false; });
    this.line.addEventListener("pointercancel", () => { dragging = false; });
    this.line.addEventListener("keydown", (event) => {
      const { height } = modelShape();
      const moves = { ArrowUp: -1, ArrowDown: 1, ArrowLeft: -1, ArrowRight: 1, PageUp: -4, PageDown: 4 };
      let rows = null;
      if (event.key in moves) rows = this.knownRows + moves[event.key];
      else if (event.key === "Home") rows = 0;
      else if (event.key === "End") rows = height - 1;
      if (rows === null) return;
      event.preventDefault();
      this.setKnownRows(rows);
    });
  },
};

function setUpComplete() {
  const section = document.getElementById("view-complete");
  const form = document.getElementById("complete-form");
  const view = new GenerationView(section, form);
  editor.init();

  document.getElementById("complete-example").addEventListener("change", (event) => {
    const example = state.examples.find((item) => item.file === event.target.value);
    if (example) useExample(example);
  });
  document.getElementById("complete-upload").addEventListener("change", async (event) => {
    const [file] = event.target.files;
    if (!file) return;
    clearError(section);
    const { height, width } = modelShape();
    try {
      const gray = await decodeGray(file);
      if (gray.length !== height || gray[0].length !== width) {
        throw new ApiError(`${file.name} is ${gray[0].length}x${gray.length} pixels; model '${state.model.name}' `
          + `takes ${width}x${height} images (nothing is resized: a stretched image is not the same image)`);
      }
      editor.load(gray);
    } catch (error) {
      showError(section, error instanceof ApiError ? error.message : `${file.name}: not an image this browser can read`);
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!state.model || view.controller) return;
    const fields = generationFields(form);
    const known = editor.pixels.map((row) => [...row]);
    const rows = editor.knownRows;
    const upload = new FormData();
    upload.append("image", await grayPng(known), "drawing.png");
    upload.append("model", state.model.name);
    upload.append("rows", String(rows));
    upload.append("stream", "true");
    for (const key of ["n", "temperature", "seed", "label"]) if (key in fields) upload.append(key, fields[key]);
    view.run({
      path: "/complete",
      body: upload,
      headers: { Accept: "text/event-stream" },
      firstRow: rows,
      count: Number(fields.n ?? 1),
      // The kept rows are the image's own; the rest starts black and fills in as rows arrive.
      prefill: (canvas) => drawGray(canvas, known.map((row, y) => (y < rows ? row : row.map(() => 0)))),
    });
  });
}

// --- likelihood ----------------------------------------------------------------------------------------

// The "hot" colour map of the server's heatmap_png: black, red, yellow, white as t goes 0 -> 1.
function hot(t) {
  const clamp = (v) => Math.max(0, Math.min(1, v));
  return [clamp(3 * t), clamp(3 * t - 1), clamp(3 * t - 2)].map((v) => Math.round(v * 255));
}

// The heat map over a faint copy of the image: where the model was not surprised the image shows through.
function drawHeat(canvas, gray, bits) {
  const height = bits.length;
  const width = bits[0].length;
  const image = new ImageData(width, height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const t = Math.min(1, bits[y][x] / HEAT_MAX_BITS);
      const under = (gray ? gray[y][x] : 0) * 0.35 * (1 - t);
      const [r, g, b] = hot(t);
      image.data.set([Math.min(255, r + under), Math.min(255, g + under), Math.min(255, b + under), 255],
        4 * (y * width + x));
    }
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

function drawLegend() {
  const bar = document.getElementById("legend-bar");
  const image = new ImageData(bar.width, 1);
  for (let x = 0; x < bar.width; x++) image.data.set([...hot(x / (bar.width - 1)), 255], 4 * x);
  bar.getContext("2d").putImageData(image, 0, 0);
  const ticks = document.querySelector(".legend-ticks");
  ticks.replaceChildren();
  for (let bits = 0; bits <= HEAT_MAX_BITS; bits += 2) {
    ticks.append(element("span", { text: bits === HEAT_MAX_BITS ? `≥${bits}` : String(bits) }));
  }
}

// A test image into the editor. Its class is left to the server, which infers it from the kept rows and
// says what it saw ("looks like Ankle boot (98%)") under each completion.
function useExample(example) {
  editor.load(example.pixels);
}

function groupBadge(item) {
  return element("span", { class: item.in_distribution ? "badge" : "badge ood",
    text: item.in_distribution ? "clothing" : "not clothing", title: item.source });
}

function renderExamples() {
  const box = document.getElementById("examples");
  const select = document.getElementById("complete-example");
  box.replaceChildren();
  select.replaceChildren(element("option", { value: "", text: "Choose…" }));
  const { height, width } = modelShape();
  const usable = state.examples.filter((item) => item.pixels.length === height && item.pixels[0].length === width);
  if (!usable.length) {
    box.append(element("p", { class: "hint", text: `No example images of ${width}x${height}: upload your own.` }));
    select.disabled = true;
    return;
  }
  select.disabled = false;
  for (const item of usable) {
    const canvas = pixelCanvas(width, height, item.title);
    drawGray(canvas, item.pixels);
    const button = element("button", { type: "button", class: "example", "aria-pressed": "true", title: item.source,
      "aria-label": `${item.title} (${item.in_distribution ? "clothing" : "not clothing"})`, "data-file": item.file }, canvas, element("span", { class: "example-title", text: item.title }),
    groupBadge(item));
    button.addEventListener("click", () => {
      button.setAttribute("aria-pressed", String(button.getAttribute("aria-pressed") !== "true"));
    });
    box.append(button);
    select.append(element("option", { value: item.file, text: item.title, title: item.source }));
  }
  if (editor.pixels.every((row) => row.every((v) => v === 0))) {
    select.value = usable[0].file;
    useExample(usable[0]);
  }
}

async function loadExamples() {
  try {
    const list = await (await call("/static/examples/examples.json")).json();
    state.examples = await Promise.all(list.map(async (item) => {
      const blob = await (await call(`/static/examples/${item.file}`)).blob();
      return { ...item, blob, pixels: await decodeGray(blob) };
    }));
  } catch (error) {
    showError(document.getElementById("view-likelihood"), `Could not load the example images: ${error.message}`);
  }
}

async function score(items) {
  if (!state.model) return;
  const section = document.getElementById("view-likelihood");
  const scores = document.getElementById("scores");
  const summary = document.getElementById("likelihood-summary");
  clearError(section);
  if (!items.length) {
    showError(section, "Select at least one image to score.");
    return;
  }
  const form = new FormData();
  form.append("model", state.model.name);
  form.append("per_pixel", "true");
  for (const item of items) form.append("image", item.blob, item.name);
  const buttons = [document.getElementById("score-examples"), document.getElementById("likelihood-upload")];
  buttons.forEach((button) => { button.disabled = true; });
  section.dataset.state = "running";
  summary.replaceChildren(element("p", { class: "hint", text: `Scoring ${items.length} image${items.length > 1 ? "s" : ""}…` }));
  try {
    const body = await (await call("/likelihood", { method: "POST", body: form })).json();
    const shown = await Promise.all(items.map(async (item, i) => ({
      item, result: body.results[i], gray: item.pixels ?? await decodeGray(item.blob).catch(() => null),
    })));
    renderScores(scores, shown);
    summarise(summary, shown);
    document.getElementById("legend").hidden = false;
    section.dataset.outcome = "done";
  } catch (error) {
    summary.replaceChildren();
    showError(section, error.message);
    section.dataset.outcome = "error";
  } finally {
    buttons.forEach((button) => { button.disabled = false; });
    section.dataset.state = "idle";
  }
}

function renderScores(scores, shown) {
  const { height, width } = modelShape();
  scores.replaceChildren();
  for (const { item, result, gray } of shown) {
    const nats = Array.isArray(result.per_pixel_nll[0][0]) // C x H x W for colour: sum the channels
      ? result.per_pixel_nll[0].map((row, y) => row.map((_, x) => result.per_pixel_nll.reduce((s, c) => s + c[y][x], 0)))
      : result.per_pixel_nll;
    const bits = nats.map((row) => row.map((v) => v / LN2));
    const picture = pixelCanvas(width, height, item.title);
    if (gray) drawGray(picture, gray);
    const heat = pixelCanvas(width, height, `${item.title}: surprise per pixel`);
    drawHeat(heat, gray, bits);
    const head = element("div", { class: "score-head" }, element("span", { class: "score-title", text: item.title }));
    if (item.in_distribution !== undefined) head.append(groupBadge(item));
    const caption = element("figcaption", {}, head,
      element("p", { class: "score-value" }, element("strong", { text: result.bits_per_dim.toFixed(3) }), " bits/dim"));
    if (result.class_probabilities) {
      const [name, p] = Object.entries(result.class_probabilities).sort((a, b) => b[1] - a[1])[0];
      caption.append(element("p", { class: "hint", text: `Looks most like ${name} (${(100 * p).toFixed(1)}%)` }));
    } else if (result.label_name) {
      caption.append(element("p", { class: "hint", text: `Scored as ${result.label_name}` }));
    }
    caption.append(element("p", { class: "hint", text: `Most surprising pixel: ${Math.max(...bits.flat()).toFixed(1)} bits` }));
    scores.append(element("figure", { class: "score", "data-bits-per-dim": String(result.bits_per_dim) },
      element("div", { class: "pair" }, picture, heat), caption));
  }
}

// Bits/dim of every image, most likely first, as bars; and, when clothing and other images were scored
// together, how many of the others the model finds more likely than the average piece of clothing.
function summarise(summary, shown) {
  const ranked = [...shown].sort((a, b) => a.result.bits_per_dim - b.result.bits_per_dim);
  const top = Math.max(...ranked.map(({ result }) => result.bits_per_dim));
  const chart = element("ol", { class: "ranking", "aria-label": "Bits per dimension, most likely first" });
  for (const { item, result } of ranked) {
    const bar = element("span", { class: item.in_distribution === false ? "bar ood" : "bar" });
    bar.style.width = `${(100 * result.bits_per_dim) / top}%`;
    chart.append(element("li", {}, element("span", { class: "ranking-name", text: item.title }),
      element("span", { class: "ranking-track" }, bar),
      element("span", { class: "ranking-value", text: result.bits_per_dim.toFixed(2) })));
  }
  summary.replaceChildren(element("h2", { class: "panel-title", text: "Bits per dimension, most likely first" }), chart);
  const clothing = shown.filter(({ item }) => item.in_distribution === true).map(({ result }) => result.bits_per_dim);
  const others = shown.filter(({ item }) => item.in_distribution === false);
  if (clothing.length && others.length) {
    const average = mean(clothing);
    const likelier = others.filter(({ result }) => result.bits_per_dim < average).map(({ item }) => item.title);
    const verdict = likelier.length
      ? `${likelier.length} of the ${others.length} images that are not clothing (${likelier.join(", ")}) score better `
        + `than the average test image of clothing (${average.toFixed(2)} bits/dim): a likelihood model can find a `
        + "simple image likely although it never saw one like it (Nalisnick et al., 2019), so bits/dim alone is a poor "
        + "anomaly detector. The heat maps show where the surprise sits."
      : `Every image that is not clothing scores worse than the average test image of clothing (${average.toFixed(2)} bits/dim).`;
    summary.append(element("p", { class: "note", text: verdict }));
  }
}

function setUpLikelihood() {
  drawLegend();
  document.getElementById("score-examples").addEventListener("click", () => {
    const pressed = [...document.querySelectorAll("#examples .example[aria-pressed=true]")].map((b) => b.dataset.file);
    score(state.examples.filter((item) => pressed.includes(item.file)).map((item) => ({ ...item, name: item.file })));
  });
  document.getElementById("likelihood-upload").addEventListener("change", (event) => {
    const files = [...event.target.files];
    event.target.value = ""; // choosing the same files again scores them again
    if (files.length) score(files.map((file) => ({ title: file.name, name: file.name, blob: file })));
  });
}

// --- start ---------------------------------------------------------------------------------------------

setUpApiKey();
setUpTabs();
setUpSample();
setUpComplete();
setUpLikelihood();
await loadExamples();
await loadModels();
document.body.dataset.ready = "true";
