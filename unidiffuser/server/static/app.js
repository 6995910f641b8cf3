// The page: POST /v1/images/generations with a request id of our own (X-Request-Id), and while
// it runs, poll GET /v1/requests/{id} for the queue position and the steps done.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form"), button = $("generate"), errorBox = $("error");
let authRequired = false;

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
          setProgress("encoding…", 1, 1);
        }
      }
    } catch (e) { /* the POST reports what matters */ }
    await new Promise((res) => setTimeout(res, 250));
  }
}

function slug(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 60) || "image";
}

function addImage(item, settings, prompt) {
  const fig = document.createElement("figure");
  fig.className = "result";
  fig.dataset.seed = item.seed;
  fig.dataset.width = settings.width;
  fig.dataset.height = settings.height;
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + item.b64_json;
  img.alt = `${prompt} (seed ${item.seed})`;
  img.width = settings.width;
  img.height = settings.height;
  const bytes = Uint8Array.from(atob(item.b64_json), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  const cap = document.createElement("figcaption");
  const p = document.createElement("div");
  p.className = "prompt";
  p.textContent = prompt;
  const meta = document.createElement("div");
  meta.textContent = `seed ${item.seed} · ${settings.width}×${settings.height} · ${settings.num_inference_steps} steps · ` +
    `scale ${settings.guidance_scale} · `;
  const a = document.createElement("a");
  a.href = url;
  a.download = `${slug(prompt)}_seed${item.seed}.png`;
  a.textContent = "download";
  meta.appendChild(a);
  cap.append(p, meta);
  fig.append(img, cap);
  $("gallery").prepend(fig);
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  const prompt = $("prompt").value.trim();
  if (!prompt) { showError("Type a prompt first."); return; }
  if (authRequired) sessionStorage.setItem("unidiffuser-key", $("key").value.trim());
  const body = {
    prompt,
    n: Number($("n").value),
    size: `${Number($("width").value)}x${Number($("height").value)}`,
    num_inference_steps: Number($("steps").value),
    guidance_scale: Number($("scale").value),
    response_format: "b64_json",
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const id = requestId(), state = { finished: false };
  button.disabled = true;
  setProgress("sending…", 0, 0);
  poll(id, state);
  try {
    const r = await fetch("/v1/images/generations", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", "X-Request-Id": id }),
      body: JSON.stringify(body),
    });
    const out = await r.json().catch(() => ({}));
    state.finished = true;
    if (!r.ok) {
      const e = out.error || {};
      showError(`${r.status}: ${e.message || r.statusText}${e.param ? ` (${e.param})` : ""}`);
    } else {
      for (const item of [...out.data].reverse()) addImage(item, out.settings, prompt);   // first image first
    }
  } catch (e) {
    state.finished = true;
    showError(`the server did not answer: ${e}`);
  } finally {
    button.disabled = false;
    $("progress").hidden = true;
  }
});

checkServer();
