// MedZoo's page: the same HTTP API as every client (GET /models, POST /explain), no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tasks: {}, file: null, cam: null, bitmap: null, needsKey: false };
// viridis at 0, 0.25, 0.5, 0.75 and 1, as the service's overlay PNG (serving/explanations.py)
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModels() {
  const response = await fetch("/models");
  const body = await response.json();
  const select = $("task");
  select.replaceChildren();
  for (const task of body.tasks) {
    state.tasks[task.task] = task;
    const option = document.createElement("option");
    option.value = task.task;
    option.textContent = `${task.task} (${task.class_names.length} classes, ${task.model.architecture} v${task.model.version})`;
    select.append(option);
  }
  if (!body.tasks.length) showError("This service has no models deployed yet.");
  updateCoverage();
}

function updateCoverage() {
  const task = state.tasks[$("task").value];
  const select = $("coverage");
  select.replaceChildren();
  const levels = task ? task.coverage_levels : [];
  for (const level of levels) {
    const option = document.createElement("option");
    option.value = level.toFixed(2);
    option.textContent = `${Math.round(level * 100)}%`;
    select.append(option);
  }
  select.disabled = !levels.length;
}

function chooseFile(file) {
  state.file = file || null;
  $("drop-text").textContent = file ? `Chosen: ${file.name}` : "Drop an image here, or choose one";
}

async function submit(event) {
  event.preventDefault();
  showError("");
  if (!state.file) {
    showError("Choose an image first.");
    return;
  }
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("task", $("task").value);
  if (!$("coverage").disabled) form.append("coverage", $("coverage").value);
  $("submit").disabled = true;
  try {
    const response = await fetch("/explain", { method: "POST", body: form, headers: headers() });
    const body = await response.json().catch(() => ({ error: `the service answered ${response.status}` }));
    if (response.status === 401) $("key-field").hidden = false;
    if (!response.ok) {
      showError(body.error || `the service answered ${response.status}`);
      $("result").hidden = true;
      return;
    }
    await show(body);
  } catch (err) {
    showError(`The service could not be reached: ${err.message}`);
  } finally {
    $("submit").disabled = false;
  }
}

async function show(body) {
  const answer = body.prediction;
  $("label").textContent = answer.label;
  $("confidence").textContent = `(probability ${(answer.confidence * 100).toFixed(1)}%)`;
  $("set").textContent = answer.prediction_set
    ? `Plausible at ${Math.round(answer.coverage * 100)}% coverage: ${answer.prediction_set.join(", ")}`
    : "This model was exported without prediction sets.";
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(answer.probabilities).slice(0, 5)) {
    const item = document.createElement("li");
    item.dataset.name = name;
    item.dataset.probability = p;
    if (answer.prediction_set && answer.prediction_set.includes(name)) item.classList.add("in-set");
    item.innerHTML = '<span class="name"></span><span class="bar"><span></span></span><span class="value"></span>';
    item.querySelector(".name").textContent = name;
    item.querySelector(".bar span").style.width = `${(p * 100).toFixed(1)}%`;
    item.querySelector(".value").textContent = `${(p * 100).toFixed(1)}%`;
    bars.append(item);
  }
  const model = answer.model;
  const task = state.tasks[answer.task];
  $("model").innerHTML = "";
  $("model").append(`${model.registered_model} version ${model.version} (${model.architecture}). `);
  if (task && task.card) {
    const link = document.createElement("a");
    link.href = task.card;
    link.textContent = "Model card";
    $("model").append(link);
  }
  state.cam = body.cam;
  $("explained").textContent = body.cam ? `map of: ${body.explained_class}` : body.note;
  try {
    state.bitmap = await createImageBitmap(state.file);
  } catch (err) {  // the service decodes formats some browsers cannot (TIFF): show the map alone
    state.bitmap = null;
    $("explained").textContent += " (this browser cannot display the image itself)";
  }
  $("result").hidden = false;
  draw();
}

function draw() {
  const picture = $("picture").getContext("2d");
  picture.imageSmoothingEnabled = false;
  picture.clearRect(0, 0, 224, 224);
  if (state.bitmap) picture.drawImage(state.bitmap, 0, 0, 224, 224);
  const heat = $("heat").getContext("2d");
  heat.clearRect(0, 0, 224, 224);
  const cam = state.cam;
  if (!cam) return;
  const rows = cam.length, cols = cam[0].length;
  const pixels = heat.createImageData(cols, rows);
  const opacity = $("opacity").value / 100;
  cam.forEach((row, y) => row.forEach((level, x) => {
    const position = level * (RAMP.length - 1);
    const low = Math.min(Math.floor(position), RAMP.length - 2);
    const t = position - low;
    const i = 4 * (y * cols + x);
    for (let c = 0; c < 3; c++) pixels.data[i + c] = RAMP[low][c] + (RAMP[low + 1][c] - RAMP[low][c]) * t;
    pixels.data[i + 3] = 255 * opacity * level;
  }));
  const small = new OffscreenCanvas(cols, rows);
  small.getContext("2d").putImageData(pixels, 0, 0);
  heat.imageSmoothingEnabled = true;
  heat.drawImage(small, 0, 0, 224, 224);
  $("heat").dataset.drawn = "true";
}

const drop = $("drop");
["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
  e.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  chooseFile(e.dataTransfer.files[0]);
});
$("image").addEventListener("change", (e) => chooseFile(e.target.files[0]));
$("task").addEventListener("change", updateCoverage);
$("opacity").addEventListener("input", draw);
$("request").addEventListener("submit", submit);
loadModels().catch((err) => showError(`The model list could not be loaded: ${err.message}`));
