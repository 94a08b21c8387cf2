// The medlens serve page: upload a study, stream the answer, show the images the model saw and any boxes.
// Plain modern JavaScript, no build step, no external resources. Every request is relative to the page,
// so the page also works behind a reverse proxy that serves medlens under a sub-path.
"use strict";

const KEY_STORE = "medlens.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  picked: [], // [{name: "series/IM1.dcm", file: File}]
  tasks: {}, // name -> task description from GET /v1/tasks
  images: [],
  boxes: [],
  current: 0,
  controller: null,
};

// ------------------------------------------------------------------ auth and requests

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${body.error} (${body.type || "error"}, HTTP ${response.status})`;
    if (body && body.detail) return `${JSON.stringify(body.detail)} (HTTP ${response.status})`;
  } catch (_) {
    // not JSON
  }
  return `HTTP ${response.status} ${response.statusText}`;
}

async function getJSON(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) {
    const error = new Error(await errorText(response));
    error.status = response.status;
    throw error;
  }
  return response.json();
}

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.dataset.kind = kind || "info";
}

// ------------------------------------------------------------------ files

function describePicked() {
  const n = state.picked.length;
  if (!n) {
    $("picked").textContent = "No files chosen.";
    return;
  }
  const inputs = groupInputs();
  const size = state.picked.reduce((sum, p) => sum + p.file.size, 0);
  const names = inputs.map((i) => i.label).slice(0, 4).join(", ");
  const more = inputs.length > 4 ? ` and ${inputs.length - 4} more` : "";
  $("picked").textContent =
    `${n} file${n === 1 ? "" : "s"} (${(size / 1048576).toFixed(1)} MB): ${names}${more}.`;
}

function addFiles(list) {
  const seen = new Set(state.picked.map((p) => p.name));
  for (const { name, file } of list) {
    if (!seen.has(name)) {
      state.picked.push({ name, file });
      seen.add(name);
    }
  }
  describePicked();
}

function fromInput(input) {
  return Array.from(input.files, (file) => ({ name: file.webkitRelativePath || file.name, file }));
}

function readEntry(entry) {
  // a dropped file or folder (FileSystemEntry) -> [{name, file}], folders read recursively
  if (entry.isFile) {
    return new Promise((resolve, reject) =>
      entry.file((file) => resolve([{ name: entry.fullPath.replace(/^\/+/, ""), file }]), reject),
    );
  }
  const reader = entry.createReader();
  const all = [];
  return new Promise((resolve, reject) => {
    const more = () =>
      reader.readEntries(async (entries) => {
        if (!entries.length) {
          const nested = await Promise.all(all.map(readEntry));
          resolve(nested.flat());
          return;
        }
        all.push(...entries);
        more();
      }, reject);
    more();
  });
}

async function onDrop(event) {
  event.preventDefault();
  $("drop").classList.remove("over");
  const items = Array.from(event.dataTransfer.items || []);
  const entries = items.map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  try {
    if (entries.length) {
      addFiles((await Promise.all(entries.map(readEntry))).flat());
    } else {
      addFiles(Array.from(event.dataTransfer.files, (file) => ({ name: file.name, file })));
    }
    setStatus(`${state.picked.length} file(s) ready.`);
  } catch (error) {
    setStatus(`Could not read the dropped files: ${error}`, "error");
  }
}

function groupInputs() {
  // one input for most tasks; for tasks taking several (compare), each top-level file or folder is one
  const task = state.tasks[$("task").value];
  const several = task && task.min_inputs > 1;
  if (!several) {
    const tops = new Set(state.picked.map((p) => topName(p.name)));
    const label = tops.size === 1 ? [...tops][0] : "one study";
    return [{ label, files: state.picked.map((p) => p.name) }];
  }
  const groups = new Map();
  for (const p of state.picked) {
    const top = topName(p.name);
    if (!groups.has(top)) groups.set(top, []);
    groups.get(top).push(p.name);
  }
  return Array.from(groups, ([label, files]) => ({ label, files }));
}

function topName(name) {
  return name.includes("/") ? `${name.split("/")[0]}/` : name;
}

// ------------------------------------------------------------------ tasks

async function loadTasks() {
  try {
    const body = await getJSON("v1/tasks");
    const select = $("task");
    const chosen = select.value;
    select.replaceChildren();
    for (const task of body.tasks) {
      state.tasks[task.name] = task;
      const option = document.createElement("option");
      option.value = task.name;
      option.textContent = task.name;
      select.append(option);
    }
    if (state.tasks[chosen]) select.value = chosen;
    describeTask();
  } catch (error) {
    const hint = error.status === 401 ? " Enter the API key." : "";
    setStatus(`Could not load the task list: ${error.message}.${hint}`, "error");
  }
}

function describeTask() {
  const task = state.tasks[$("task").value];
  if (!task) return;
  const inputs = task.min_inputs === task.max_inputs ? `${task.min_inputs}` : `${task.min_inputs}–${task.max_inputs}`;
  const grouping = task.min_inputs > 1 ? " Each top-level file or folder you pick is one input." : "";
  $("task-help").textContent = `${task.description} Inputs: ${inputs}.${grouping}`;
  $("question").required = Boolean(task.needs_question);
  $("question-help").textContent = task.needs_question
    ? "Required for this task."
    : "Optional: this task has a default question.";
  describePicked();
}

// ------------------------------------------------------------------ asking (SSE over fetch)

async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (!data.length) continue;
      let parsed;
      try {
        parsed = JSON.parse(data.join("\n"));
      } catch (_) {
        parsed = { data: data.join("\n") };
      }
      yield [event, parsed];
    }
  }
}

function buildForm() {
  const form = new FormData();
  for (const p of state.picked) form.append("files", p.file, p.name);
  form.append("inputs", JSON.stringify(groupInputs().map((i) => ({ files: i.files }))));
  form.append("task", $("task").value);
  const question = $("question").value.trim();
  if (question) form.append("question", question);
  form.append("return_images", "true");
  const cap = Number.parseInt($("max-tokens").value, 10);
  if (cap > 0) form.append("options", JSON.stringify({ max_new_tokens: cap }));
  return form;
}

async function ask(event) {
  event.preventDefault();
  if (!state.picked.length) {
    setStatus("Choose files or a folder first.", "error");
    $("files").focus();
    return;
  }
  if ($("question").required && !$("question").value.trim()) {
    setStatus("This task needs a question.", "error");
    $("question").focus();
    return;
  }
  resetOutput();
  $("output").hidden = false;
  $("ask").disabled = true;
  $("stop").disabled = false;
  setStatus("Uploading…");
  state.controller = new AbortController();
  try {
    const response = await fetch("v1/analyze/stream", {
      method: "POST",
      body: buildForm(),
      headers: authHeaders(),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      setStatus(`Error: ${await errorText(response)}`, "error");
      if (response.status === 401) $("api-key").focus();
      return;
    }
    let finished = false;
    for await (const [name, data] of sseEvents(response)) {
      if (name === "stage") showStage(data);
      else if (name === "text") $("stream-text").textContent += data.delta || "";
      else if (name === "result") {
        showResult(data);
        finished = true;
      } else if (name === "error") {
        setStatus(`Error: ${data.error} (${data.type || "error"}${data.status ? `, HTTP ${data.status}` : ""})`, "error");
        finished = true;
      }
    }
    if (!finished) setStatus("The stream ended without a result.", "error");
  } catch (error) {
    setStatus(error.name === "AbortError" ? "Stopped." : `Error: ${error.message}`, "error");
  } finally {
    $("ask").disabled = false;
    $("stop").disabled = true;
    state.controller = null;
    loadJobs();
  }
}

function showStage(data) {
  const progress = $("progress");
  const total = Math.max(1, data.total || 0);
  progress.max = total;
  progress.value = Math.min(total, data.done || 0);
  const count = data.total ? ` ${data.done}/${data.total}` : "";
  setStatus(`${data.stage}${count}…`);
}

function resetOutput() {
  $("stream-text").textContent = "";
  $("answer").textContent = "";
  $("box-list").replaceChildren();
  $("warnings").replaceChildren();
  $("envelope").textContent = "";
  $("viewer").hidden = true;
  $("test-model").hidden = true;
  $("progress").value = 0;
  state.images = [];
  state.boxes = [];
}

function showResult(envelope) {
  const { images, ...rest } = envelope;
  state.images = images || [];
  state.boxes = (envelope.task === "localize" && envelope.payload && envelope.payload.boxes) || [];
  $("test-model").hidden = !envelope.untrained_test_model;
  const answer = envelope.final_answer || envelope.answer || "(no answer)";
  $("answer").textContent = answer;
  if (!$("stream-text").textContent) $("stream-text").textContent = envelope.answer || "";
  for (const box of state.boxes) {
    const item = document.createElement("li");
    const [y0, x0, y1, x1] = box.box_2d;
    const px = box.box_px ? ` — pixels x ${box.box_px[0]}–${box.box_px[2]}, y ${box.box_px[1]}–${box.box_px[3]}` : "";
    item.textContent = `${box.label || "box"}: box_2d [${y0}, ${x0}, ${y1}, ${x1}]${px}`;
    $("box-list").append(item);
  }
  const warnings = [...(envelope.warnings || [])];
  if (envelope.parse_error) warnings.unshift(`The output could not be parsed: ${envelope.parse_error}`);
  for (const text of warnings) {
    const item = document.createElement("li");
    item.textContent = text;
    $("warnings").append(item);
  }
  $("envelope").textContent = JSON.stringify(rest, null, 2);
  showImages();
  $("progress").value = $("progress").max;
  setStatus(`Done: ${envelope.task} answered by ${envelope.model}.`, "done");
}

// ------------------------------------------------------------------ the viewer

function showImages() {
  const n = state.images.length;
  $("viewer").hidden = n === 0;
  if (!n) return;
  const slider = $("slice");
  slider.max = String(n);
  $("slider-row").hidden = n < 2;
  const strip = $("strip");
  strip.replaceChildren();
  strip.hidden = n < 2 || n > 12;
  if (!strip.hidden) {
    state.images.forEach((image, index) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "thumb";
      button.setAttribute("aria-label", `Show ${image.label}`);
      const thumb = document.createElement("img");
      thumb.src = image.data_url;
      thumb.alt = "";
      button.append(thumb);
      button.addEventListener("click", () => showImage(index));
      strip.append(button);
    });
  }
  showImage(Math.floor((n - 1) / 2));
}

function showImage(index) {
  const n = state.images.length;
  if (!n) return;
  state.current = Math.max(0, Math.min(n - 1, index));
  const image = state.images[state.current];
  const img = $("image");
  img.src = image.data_url;
  img.alt = `${image.label}, ${image.width} by ${image.height} pixels, as sent to the model`;
  $("image-label").textContent = n > 1 ? `${image.label} (${state.current + 1} of ${n})` : image.label;
  $("slice").value = String(state.current + 1);
  $("slice").setAttribute("aria-valuetext", image.label);
  Array.from($("strip").children).forEach((button, i) =>
    button.setAttribute("aria-pressed", String(i === state.current)),
  );
  drawBoxes();
}

function drawBoxes() {
  // box_2d is [y0, x0, y1, x1] in 0..1000 of the padded square the model saw: the image shown here
  const svg = $("boxes");
  svg.replaceChildren();
  const palette = ["#e6194b", "#3cb44b", "#ffe119", "#0082c8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"];
  const ns = "http://www.w3.org/2000/svg";
  state.boxes.forEach((box, number) => {
    const [y0, x0, y1, x1] = box.box_2d;
    const colour = palette[number % palette.length];
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", x0);
    rect.setAttribute("y", y0);
    rect.setAttribute("width", Math.max(1, x1 - x0));
    rect.setAttribute("height", Math.max(1, y1 - y0));
    rect.setAttribute("stroke", colour);
    rect.setAttribute("class", "box");
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", x0 + 6);
    label.setAttribute("y", y0 + 30);
    label.setAttribute("fill", colour);
    label.setAttribute("class", "box-label");
    label.textContent = box.label || "";
    svg.append(rect, label);
  });
}

function onViewerKey(event) {
  const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1, PageDown: 10, PageUp: -10 }[event.key];
  if (event.key === "Home") showImage(0);
  else if (event.key === "End") showImage(state.images.length - 1);
  else if (step) showImage(state.current + step);
  else return;
  event.preventDefault();
}

// ------------------------------------------------------------------ jobs

async function loadJobs() {
  const body = $("jobs").tBodies[0];
  try {
    const { jobs } = await getJSON("v1/jobs");
    body.replaceChildren();
    for (const job of jobs) {
      const row = body.insertRow();
      const progress = job.progress && job.progress.total ? `${job.progress.stage} ${job.progress.done}/${job.progress.total}` : (job.progress && job.progress.stage) || "";
      for (const text of [job.id.slice(0, 12), job.task, job.status, progress, job.created || "", job.finished || ""]) {
        row.insertCell().textContent = text;
      }
      if (job.error) row.title = job.error.error;
    }
    $("jobs-status").textContent = jobs.length ? `${jobs.length} job(s).` : "No jobs yet (jobs are made with POST /v1/jobs).";
  } catch (error) {
    $("jobs-status").textContent = `Could not load the jobs: ${error.message}`;
  }
}

// ------------------------------------------------------------------ wiring

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, apiKey());
    loadTasks();
    loadJobs();
  });
  $("files").addEventListener("change", (e) => addFiles(fromInput(e.target)));
  $("folder").addEventListener("change", (e) => addFiles(fromInput(e.target)));
  $("clear-files").addEventListener("click", () => {
    state.picked = [];
    $("files").value = "";
    $("folder").value = "";
    describePicked();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", onDrop);
  drop.addEventListener("click", () => $("files").click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      $("files").click();
    }
  });
  $("task").addEventListener("change", describeTask);
  $("ask-form").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("slice").addEventListener("input", (e) => showImage(Number(e.target.value) - 1));
  $("figure").addEventListener("keydown", onViewerKey);
  $("refresh-jobs").addEventListener("click", loadJobs);
  checkReady();
  loadTasks();
  loadJobs();
}

async function checkReady() {
  // /ready needs no key: 503 while the server still loads its model
  try {
    const response = await fetch("ready");
    if (response.status === 503) setStatus("The server is still loading its model; Ask works once it is ready.");
  } catch (error) {
    setStatus(`The server does not answer: ${error.message}`, "error");
  }
}

document.addEventListener("DOMContentLoaded", init);
