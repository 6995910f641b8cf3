// The page: one task at a time. Text to image POSTs /v1/images/generations; captioning and image
// variation POST the chosen image file as multipart/form-data (/v1/images/captions,
// /v1/images/variations); the other tasks POST /v1/generations with "task". Each request carries
// a request id of our own (X-Request-Id), and while it runs the page polls GET /v1/requests/{id}
// for the queue position and the steps done.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form"), button = $("generate"), errorBox = $("error");
let authRequired = false, maxUpload = 16 << 20;
let endpoints = { t2i: "/v1/images/generations" };    // the served tasks (GET /health)

// What each task reads and makes (unidiffuser/tasks.py).
const TASKS = {
  t2i: { input: "prompt", about: "text to image", guided: true },
  i2t: { input: "image", about: "image to text", guided: true },
  i2t2i: { input: "image", about: "image variation", guided: true },
  t2i2t: { input: "prompt", about: "text variation", guided: true },
  joint: { input: null, about: "an image and its caption", guided: true },
  i: { input: null, about: "an image, unconditionally", guided: false },
  t: { input: null, about: "a text, unconditionally", guided: false },
};

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function requestId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "page-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

function task() { return $("task").value; }

function showTask() {
  const t = TASKS[task()];
  $("task-name").textContent = t.about;
  $("prompt-row").hidden = t.input !== "prompt";
  $("image-row").hidden = t.input !== "image";
  $("scale").disabled = !t.guided;
  $("scale-row").title = t.guided ? "" : "this task has no guidance: the scale changes nothing";
}

async function checkServer() {
  const status = $("server");
  try {
    const r = await fetch("/health", { cache: "no-store" });
    const h = await r.json();
    if (r.ok) {
      status.textContent = `ready · ${h.model} · ${h.default_size}×${h.default_size} native`;
      status.className = "status ok";
      if (!checkServer.done) {
        checkServer.done = true;
        $("width").value = $("height").value = h.default_size;
        $("width").max = $("height").max = h.max_side;
        $("n").max = h.max_n;
        maxUpload = h.max_upload_bytes || maxUpload;
        endpoints = h.tasks || endpoints;
        for (const opt of $("task").options) {
          opt.disabled = !(opt.value in endpoints);
          if (opt.disabled) opt.textContent += " (not on this server)";
        }
        if (!(task() in endpoints)) $("task").value = Object.keys(endpoints)[0];
        showTask();
        authRequired = h.auth_required;
        $("key-row").hidden = !authRequired;
        $("key").value = sessionStorage.getItem("unidiffuser-key") || "";
      }
      return;
    }
    status.textContent = `${h.status}: ${h.reason}`;
    status.className = "status bad";
  } catch (e) {
    status.textContent = "server unreachable";
    status.className = "status bad";
  }
  setTimeout(checkServer, 2000);
}

function setProgress(text, done, total) {
  $("progress").hidden = false;
  $("progress-text").textContent = text;
  const bar = $("bar");
  if (total) { bar.max = total; bar.value = done; } else { bar.removeAttribute("value"); }
}

async function poll(id, state) {
  while (!state.finished) {
    try {
      const r = await fetch(`/v1/requests/${id}`, { headers: headers(), cache: "no-store" });
      if (r.ok && !state.finished) {
        const p = await r.json();
        if (p.status === "queued") {
          const ahead = p.queue_position;
          setProgress(ahead ? `queued: ${ahead} request${ahead > 1 ? "s" : ""} ahead` : "queued: next", 0, 0);
        } else if (p.status === "running") {
          setProgress(`step ${p.steps_done} / ${p.steps_total}`, p.steps_done, p.steps_total);
        } else {
          setProgress("finishing…", 1, 1);
        }
      }
    } catch (e) { /* the POST reports what matters */ }
    await new Promise((res) => setTimeout(res, 250));
  }
}

// run.py's file names (unidiffuser/files.py output_stem): PROMPT-SLUG_seedN for t2i,
// PHOTO_i2t_seedN for an image's task, joint_seedN for a task without input.
function slug(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 48).replace(/-+$/, "");
}

function stem(taskName, source, seed) {
  let name = "";
  if (source && source.prompt !== undefined) name = slug(source.prompt) || "prompt";
  else if (source && source.file !== undefined) name = slug(source.file.replace(/\.[^.]*$/, "")) || "image";
  return [name, taskName === "t2i" ? "" : taskName, `seed${seed}`].filter(Boolean).join("_");
}

function download(blob, name, text) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.textContent = text;
  return a;
}

function addResult(item, settings, source) {
  const taskName = settings.task;
  const fig = document.createElement("figure");
  fig.className = "result" + (item.b64_json ? "" : " text-only");
  fig.dataset.seed = item.seed;
  fig.dataset.task = taskName;
  fig.dataset.width = settings.width;
  fig.dataset.height = settings.height;
  const name = stem(taskName, source, item.seed);
  const label = source.prompt !== undefined ? source.prompt : source.file !== undefined ? source.file : TASKS[taskName].about;
  const links = [];
  if (item.b64_json) {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + item.b64_json;
    img.alt = `${label} (seed ${item.seed})`;
    img.width = settings.width;
    img.height = settings.height;
    fig.append(img);
    const bytes = Uint8Array.from(atob(item.b64_json), (c) => c.charCodeAt(0));
    links.push(download(new Blob([bytes], { type: "image/png" }), `${name}.png`, "download"));
  }
  if (item.text !== undefined) {
    const text = document.createElement("p");
    text.className = "text";
    text.textContent = item.text;
    fig.append(text);
    links.push(download(new Blob([item.text + "\n"], { type: "text/plain;charset=utf-8" }), `${name}.txt`,
                        item.b64_json ? "download text" : "download"));
  }
  const cap = document.createElement("figcaption");
  const p = document.createElement("div");
  p.className = "prompt";
  p.textContent = source.prompt !== undefined || source.file !== undefined ? `${taskName} · ${label}` : label;
  const meta = document.createElement("div");
  const scale = settings.guidance_scale === null ? "" : `scale ${settings.guidance_scale} · `;
  meta.textContent = `seed ${item.seed} · ${settings.width}×${settings.height} · ${settings.num_inference_steps} steps · ` +
    scale;
  meta.append(...links);
  cap.append(p, meta);
  fig.append(cap);
  $("gallery").prepend(fig);
}

$("task").addEventListener("change", () => { showError(""); showTask(); });

$("image").addEventListener("change", () => {
  const file = $("image").files[0], preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !file;
  if (file) preview.src = URL.createObjectURL(file);
});

function buildRequest(taskName) {
  const settings = {
    n: Number($("n").value),
    size: `${Number($("width").value)}x${Number($("height").value)}`,
    num_inference_steps: Number($("steps").value),
  };
  if (TASKS[taskName].guided) settings.guidance_scale = Number($("scale").value);
  if ($("seed").value !== "") settings.seed = Number($("seed").value);
  const input = TASKS[taskName].input;
  if (input === "image") {
    const file = $("image").files[0];
    if (!file) throw new Error("Choose an image file first.");
    if (file.size > maxUpload) throw new Error(`The image is ${(file.size / 2 ** 20).toFixed(1)} MiB; this server ` +
                                               `accepts at most ${(maxUpload / 2 ** 20).toFixed(1)} MiB.`);
    const body = new FormData();
    body.append("image", file, file.name);
    for (const [k, v] of Object.entries(settings)) body.append(k, String(v));
    if (taskName === "i2t2i") body.append("response_format", "b64_json");
    return { body, source: { file: file.name }, json: false };        // the browser sets the boundary
  }
  const body = Object.assign({}, settings, { response_format: "b64_json" });
  const source = {};
  if (input === "prompt") {
    const prompt = $("prompt").value.trim();
    if (!prompt) throw new Error("Type a prompt first.");
    body.prompt = source.prompt = prompt;
  }
  if (endpoints[taskName] === "/v1/generations") body.task = taskName;
  return { body: JSON.stringify(body), source, json: true };
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  const taskName = task();
  let req;
  try {
    req = buildRequest(taskName);
  } catch (e) {
    showError(e.message);
    return;
  }
  if (authRequired) sessionStorage.setItem("unidiffuser-key", $("key").value.trim());
  const id = requestId(), state = { finished: false };
  button.disabled = true;
  setProgress("sending…", 0, 0);
  poll(id, state);
  try {
    const extra = { "X-Request-Id": id };
    if (req.json) extra["Content-Type"] = "application/json";
    const r = await fetch(endpoints[taskName], { method: "POST", headers: headers(extra), body: req.body });
    const out = await r.json().catch(() => ({}));
    state.finished = true;
    if (!r.ok) {
      const e = out.error || {};
      showError(`${r.status}: ${e.message || r.statusText}${e.param ? ` (${e.param})` : ""}`);
    } else {
      for (const item of [...out.data].reverse()) addResult(item, out.settings, req.source);   // first sample first
    }
  } catch (e) {
    state.finished = true;
    showError(`the server did not answer: ${e}`);
  } finally {
    button.disabled = false;
    $("progress").hidden = true;
  }
});

showTask();
checkServer();
