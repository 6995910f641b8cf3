"""The image server (serve.py, unidiffuser/server/) on the CPU with the tiny preset, started as a
subprocess on a free port: the official openai client, outputs equal to run.py's for every task
(images, texts), dynamic batching under 32 concurrent requests through a queue of 8 and of image
uploads, errors in OpenAI's shape for every kind of bad request and upload, disconnects and
timeouts, the API key, SIGTERM draining, the web page in a real browser (headless Chromium), and
the benchmark script.

The server and run.py run torch on one thread (OMP_NUM_THREADS=1): the tiny networks are
thousands of small operations (the caption decoder's beam search most), and two threads waiting
for each other at every one took 40 times longer on a 2-core machine (conftest.one_thread)."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from conftest import child_env, copy_without_task_networks, input_images
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs fastapi (requirements.txt)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (requirements.txt)")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client (requirements-dev.txt)")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
SMALL = {"size": "64x64", "num_inference_steps": 2}
ALL_TASKS = ["t2i", "i2t", "joint", "i", "t", "i2t2i", "t2i2t"]


def env() -> dict:
    return child_env(OMP_NUM_THREADS="1")


# ---- a server in a subprocess -----------------------------------------------------------------
class Server:
    def __init__(self, model: Path, log: Path, *args, ready=True, headers=None):
        self.log_path, self.headers = log, headers or {}
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model-dir", str(model), "--port", "0",
                                      "--device", "cpu", *map(str, args)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env(), cwd=ROOT)
        self.url = self._wait(ready)
        self.port = urlsplit(self.url).port

    def text(self) -> str:
        return self.log_path.read_text()

    def _wait(self, ready: bool, timeout=120) -> str:
        end, url = time.monotonic() + timeout, None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve.py exited {self.proc.returncode}:\n{self.text()}")
            m = url or re.search(r"serving on (http://\S+)", self.text())
            url = url or (m and m[1])
            if url and not ready:
                return url
            if url:
                status, _, _ = call(url, "GET", "/health")
                if status == 200:
                    return url
            time.sleep(0.1)
        raise AssertionError(f"serve.py not ready in {timeout} s:\n{self.text()}")

    def call(self, method, path, body=None, headers=None, timeout=120):
        return call(self.url, method, path, body, headers, timeout)

    def post_form(self, path, image=None, fields=None, headers=None, files=None, timeout=120):
        """A multipart request (requests): image is (filename, bytes) or a Path."""
        if isinstance(image, Path):
            image = (image.name, image.read_bytes())
        files = {**({"image": image} if image is not None else {}), **(files or {})}
        return requests.post(self.url + path, files=files or None, data={k: str(v) for k, v in (fields or {}).items()},
                             headers={**self.headers, **(headers or {})}, timeout=timeout)

    def client(self, api_key="unused", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def steps_for(self, seconds: float) -> int:
        """Sampling steps that keep the model busy about `seconds` at 128x128, measured now (on a
        loaded machine the model runs slower, and the long requests the tests need scale with it)."""
        def timed(steps):
            t = time.monotonic()
            status, _, _ = self.call("POST", "/v1/images/generations",
                                     {"prompt": "calibrate", "size": "128x128", "num_inference_steps": steps},
                                     self.headers)
            assert status == 200
            return time.monotonic() - t

        if not getattr(self, "_calibrated", False):
            timed(2)                        # the first call at a size pays one-time costs
            self._calibrated = True
        short, long = timed(2), timed(22)
        step_s = max((long - short) / 20, long / 100, 0.001)
        return min(1000, max(20, round(seconds / step_s)))

    def metric(self, line_prefix: str, headers=None) -> float:
        status, _, raw = self.call("GET", "/metrics", headers=headers)
        assert status == 200
        for line in raw.decode().splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()


def call(url, method, path, body=None, headers=None, timeout=120):
    """(status, headers, raw body): the plain HTTP, for what no client would send."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except OSError:
        return None, {}, b""
    finally:
        conn.close()


def error_of(raw: bytes) -> dict:
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


class Blocker:
    """A long request (another batch key) running in a thread: while it runs, what arrives waits."""

    def __init__(self, server: Server, rid: str, seconds: float = 2.0):
        self.server, self.rid, self.headers = server, rid, {**server.headers, "X-Request-Id": rid}
        self.result, self.steps = None, server.steps_for(seconds)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.wait_for("running")

    def _run(self):
        self.result = self.server.call("POST", "/v1/images/generations",
                                       {"prompt": "blocker", "size": "128x128", "num_inference_steps": self.steps,
                                        "seed": 1},
                                       self.headers)

    def progress(self):
        status, _, raw = self.server.call("GET", f"/v1/requests/{self.rid}", headers=self.headers)
        return json.loads(raw) if status == 200 else None

    def wait_for(self, state: str, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            p = self.progress()
            if p and p["status"] == state and (state != "running" or p["steps_done"] > 0):
                return p
            time.sleep(0.05)
        raise AssertionError(f"request {self.rid} never {state}")

    def running(self) -> bool:
        return self.thread.is_alive()

    def join(self):
        self.thread.join(120)
        assert self.result is not None and self.result[0] == 200, self.result
        return json.loads(self.result[2])


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-server")
    r = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), "--random", "tiny", "--src", str(base / "src"),
                        "--out", str(base / "model")], capture_output=True, text=True, env=child_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return base / "model"


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = Server(model, tmp_path_factory.mktemp("server") / "server.log",
               "--max-batch", 4, "--max-queue", 8, "--batch-wait-ms", 50, "--request-timeout-s", 120,
               "--max-upload-mib", 1)
    yield s
    assert s.stop() == 0, s.text()


@pytest.fixture(scope="module")
def keyed(model, tmp_path_factory):
    """With --api-key and a short --request-timeout-s."""
    s = Server(model, tmp_path_factory.mktemp("keyed") / "server.log", "--api-key", KEY, "--request-timeout-s", 1,
               headers={"Authorization": f"Bearer {KEY}"})
    yield s
    assert s.stop() == 0, s.text()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return input_images(tmp_path_factory.mktemp("input-images"))


@pytest.fixture(scope="module")
def pipe(model):
    from unidiffuser import UniDiffuser
    return UniDiffuser.load(model, device="cpu")


# ---- the command ------------------------------------------------------------------------------
def serve(*args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "serve.py"), *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=120, **kw)


@pytest.mark.parametrize("args, names", [
    (["--port", "70000"], ["--port", "0..65535"]),
    (["--port", "x"], ["--port", "invalid int"]),
    (["--max-batch", "0"], ["--max-batch", "1..4096"]),
    (["--batch-wait-ms", "-1"], ["--batch-wait-ms"]),
    (["--batch-wait-ms", "nan"], ["--batch-wait-ms"]),
    (["--max-queue", "0"], ["--max-queue"]),
    (["--request-timeout-s", "0"], ["--request-timeout-s"]),
    (["--max-side", "100"], ["--max-side", "multiple of 16"]),
    (["--device", "mps"], ["--device", "'mps'"]),
    (["--dtype", "int4"], ["--dtype", "invalid choice"]),
    (["--dtype", "fp8", "--device", "cpu"], ["--dtype fp8", "CUDA"]),
    (["--host", "0.0.0.0"], ["--host 0.0.0.0", "--api-key"]),
    (["--host", "example.org"], ["--host example.org", "--api-key"]),
    (["--api-key", "has space"], ["--api-key"]),
    (["--model-dir", "/nonexistent/model"], ["--model-dir", "not found"]),
    (["--tasks", "t2i,edit"], ["--tasks", "'t2i,edit'"]),
    (["--tasks", "t2i,t2i"], ["--tasks"]),
    (["--max-upload-mib", "0"], ["--max-upload-mib"]),
])
def test_argument_errors_are_one_line_exit_2(model, args, names):
    argv = ["--model-dir", model, *args] if "--model-dir" not in args else args
    r = serve(*argv)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_argument_errors_come_before_torch(model):
    code = ("import runpy, sys\nsys.argv = ['serve.py', '--model-dir', sys.argv[1], '--host', '0.0.0.0']\n"
            "try:\n    runpy.run_path('serve.py', run_name='__main__')\n"
            "except SystemExit as e:\n    print('torch' in sys.modules, e.code)\n")
    r = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, env=child_env(), cwd=ROOT)
    assert r.stdout.split() == ["False", "2"], (r.stdout, r.stderr)


def test_port_in_use_and_broken_model_exit_2(model, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = serve("--model-dir", model, "--port", taken.getsockname()[1], "--device", "cpu")
    assert r.returncode == 2 and "cannot listen there" in r.stderr and "--port" in r.stderr, r.stderr
    broken = shutil.copytree(model, tmp_path / "broken")
    (broken / "manifest.json").write_text("{")
    r = serve("--model-dir", broken, "--port", 0, "--device", "cpu")     # found while loading, after binding
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr


# ---- the API ----------------------------------------------------------------------------------
def test_health_models_metrics_and_page(server):
    status, _, raw = server.call("GET", "/health")
    health = json.loads(raw)
    assert status == 200 and health["status"] == "ok" and health["default_size"] == 128, health
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["unidiffuser"]
    assert models.data[0].model_extra["tasks"] == ALL_TASKS and models.data[0].model_extra["random_weights"] is True
    assert health["tasks"]["i2t2i"] == "/v1/images/variations" and health["tasks"]["joint"] == "/v1/generations"
    assert health["max_upload_bytes"] == 1 << 20
    status, headers, raw = server.call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = raw.decode()
    for name in ("unidiffuser_http_requests_total{", "unidiffuser_queue_depth ", "unidiffuser_batch_images_bucket{",
                 "unidiffuser_request_latency_seconds", "unidiffuser_images_generated_total"):
        assert name in text, name
    assert 'unidiffuser_http_requests_total{endpoint="/health",status="200"}' in text
    for path, kind in (("/", "text/html"), ("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        status, headers, raw = server.call("GET", path)
        assert status == 200 and kind in headers["content-type"], (path, headers)
    assert "//cdn" not in raw.decode() and "https://" not in server.call("GET", "/")[2].decode()   # works offline


def test_openai_client_gets_images_of_the_requested_size(server):
    client = server.client()
    r = client.images.generate(prompt="a red cube", n=2, size="96x64",
                               extra_body={"seed": 5, "num_inference_steps": 2, "guidance_scale": 3})
    assert len(r.data) == 2 and r.created > 0 and r.size == "96x64" and r.output_format == "png"
    assert [d.model_extra["seed"] for d in r.data] == [5, 6]
    for d in r.data:
        img = Image.open(io.BytesIO(base64.b64decode(d.b64_json)))
        assert img.format == "PNG" and img.size == (96, 64) and img.mode == "RGB"
    assert r.model_extra["settings"]["num_inference_steps"] == 2 and r.model_extra["settings"]["guidance_scale"] == 3
    # What the client sends with nothing but a prompt (and the model's name) is accepted: the
    # model's size, a fresh seed answered with the image.
    r = client.images.generate(model="unidiffuser", prompt="a blue sphere", extra_body={"num_inference_steps": 1})
    assert len(r.data) == 1 and decode(r.data[0].b64_json).size == (128, 128)
    assert isinstance(r.data[0].model_extra["seed"], int)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", response_format="url")
    assert e.value.status_code == 400 and e.value.body["param"] == "response_format"


def test_seed_gives_the_same_pixels_as_run_py(server, model, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--prompt", "a dog under the sea", "--n-samples", "2",
                        "--seed", "5", "--steps", "3", "--height", "48", "--width", "64", "--device", "cpu",
                        "--model-dir", str(model), "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = server.client().images.generate(prompt="a dog under the sea", n=2, size="64x48",
                                          extra_body={"seed": 5, "num_inference_steps": 3})
    for d, seed in zip(out.data, (5, 6)):
        written = Image.open(tmp_path / f"a-dog-under-the-sea_seed{seed}.png")
        assert d.model_extra["seed"] == seed
        assert np.array_equal(pixels(written), pixels(decode(d.b64_json))), seed


def run_py(model, out: Path, task: str, *args) -> Path:
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--task", task, *map(str, args), "--device", "cpu",
                        "--model-dir", str(model), "--out", str(out)], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return out


def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8").removesuffix("\n")


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")     # OpenAI retired its own endpoint
def test_variations_with_the_openai_client_equal_run_py(server, model, images, tmp_path):
    out = run_py(model, tmp_path, "i2t2i", "--image", images["big.png"], "--n-samples", 2, "--seed", 5, "--steps", 2,
                 "--height", 48, "--width", 64)
    with open(images["big.png"], "rb") as f:
        r = server.client().images.create_variation(image=f, n=2, size="64x48", response_format="b64_json",
                                                    extra_body={"seed": 5, "num_inference_steps": 2})
    assert r.size == "64x48" and r.output_format == "png" and [d.model_extra["seed"] for d in r.data] == [5, 6]
    settings = r.model_extra["settings"]
    assert settings["task"] == "i2t2i" and settings["guidance_scale"] == 7
    assert settings["image"] == {"name": "big.png", "size": [71, 50],
                                 "sha256": json.loads((out / "big_i2t2i_seed5.json").read_text())["image"]["sha256"]}
    for d, seed in zip(r.data, (5, 6)):
        assert np.array_equal(pixels(decode(d.b64_json)), pixels(Image.open(out / f"big_i2t2i_seed{seed}.png"))), seed
    with pytest.raises(openai.BadRequestError) as e:
        server.client().images.create_variation(image=("photo.png", images["not_image.png"].read_bytes()))
    assert e.value.body["param"] == "image" and "photo.png: not an image" in e.value.body["message"]


READABLE = ["big.png", "small.png", "anim.gif", "grey16.png", "palette.png", "rgba.png", "cmyk.jpg"]


def test_captions_of_every_image_kind_equal_run_py(server, model, images, tmp_path):
    out = run_py(model, tmp_path, "i2t", *[x for k in READABLE for x in ("--image", images[k])], "--seed", 3,
                 "--steps", 2, "--height", 64, "--width", 64)
    for i, k in enumerate(READABLE):       # run.py: image i, seed 3 + i, each a batch of its own
        r = server.post_form("/v1/images/captions", images[k], {"seed": 3 + i, **SMALL})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [set(d) for d in body["data"]] == [{"text", "seed"}] and "size" not in body, body
        assert body["data"][0]["text"] == text_of(out / f"{Path(k).stem}_i2t_seed{3 + i}.txt"), k
        assert body["settings"]["task"] == "i2t" and body["settings"]["image"]["name"] == k
    gif, frame = (server.post_form("/v1/images/captions", images[k], {"seed": 9, **SMALL}).json()["data"][0]["text"]
                  for k in ("anim.gif", "first_frame.png"))
    assert gif == frame                    # an animation's first frame, as the CLI reads it
    two = server.post_form("/v1/images/captions", images["big.png"], {"seed": 3, "n": 2, **SMALL}).json()
    assert [d["seed"] for d in two["data"]] == [3, 4] and all(d["text"] for d in two["data"])


@pytest.mark.parametrize("task", ["joint", "i", "t", "t2i2t"])
def test_generations_of_each_task_equal_run_py(server, model, tmp_path, task):
    from unidiffuser.tasks import TASKS
    outputs = TASKS[task].outputs
    prompt = ["--prompt", "a red cube"] if task == "t2i2t" else []
    out = run_py(model, tmp_path, task, *prompt, "--n-samples", 2, "--seed", 11, "--steps", 2, "--height", 48,
                 "--width", 64)
    body = {"task": task, "n": 2, "seed": 11, "num_inference_steps": 2, "size": "64x48",
            **({"prompt": "a red cube"} if prompt else {})}
    status, headers, raw = server.call("POST", "/v1/generations", body)
    assert status == 200, raw
    r = json.loads(raw)
    assert r["task"] == task and [d["seed"] for d in r["data"]] == [11, 12] and headers["x-request-id"]
    assert ("size" in r) == ("image" in outputs) and r["settings"]["guidance_scale"] == (None if task in "it" else 7)
    for d, seed in zip(r["data"], (11, 12)):
        stem = out / f"{'a-red-cube_' if prompt else ''}{task}_seed{seed}"
        assert ("b64_json" in d) == ("image" in outputs) and ("text" in d) == ("text" in outputs), d.keys()
        if "image" in outputs:
            assert np.array_equal(pixels(decode(d["b64_json"])), pixels(Image.open(stem.with_suffix(".png")))), seed
        if "text" in outputs:
            assert d["text"] == text_of(stem.with_suffix(".txt")), seed


@pytest.mark.parametrize("name, words", [
    ("not_image.png", "not an image PIL can read"),
    ("truncated.png", "not a readable image"),
    ("truncated.jpg", "not a readable image"),
    ("bomb.png", "too many pixels"),            # PIL warns: refused as the CLI refuses it
    ("huge_bomb.png", "too many pixels"),       # PIL raises
])
@pytest.mark.parametrize("path", ["/v1/images/captions", "/v1/images/variations"])
def test_bad_images_are_refused_naming_the_field(server, images, name, words, path):
    r = server.post_form(path, images[name], SMALL)
    err = error_of(r.content)
    assert r.status_code == 400 and err["param"] == "image" and err["code"] == "invalid_image", err
    assert f"image {name}: {words}" in err["message"], err


def chunked_upload(size: int):
    yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    for _ in range(size // 65536 + 1):
        yield b"\0" * 65536


@pytest.mark.parametrize("path, fields, files, status, param, code", [
    ("/v1/images/captions", {**SMALL}, [], 400, "image", "missing_image"),
    ("/v1/images/captions", {"image": "photo.png"}, [], 400, "image", None),            # a text field, not a file
    ("/v1/images/captions", {}, [("image", ("empty.png", b""))], 400, "image", None),
    ("/v1/images/variations", {}, [("image", "big.png"), ("image", "big.png")], 400, "image", None),
    ("/v1/images/variations", {}, [("image", "big.png"), ("mask", "big.png")], 400, "mask", "unknown_parameter"),
    ("/v1/images/variations", {}, [("image", ("big.png", b"\0" * (1 << 20)))], 413, None, "body_too_large"),
    ("/v1/images/variations", {}, "chunked", 413, None, "body_too_large"),               # no Content-Length
    ("/v1/images/variations", {"n": "2x"}, [("image", "big.png")], 400, "n", None),
    ("/v1/images/variations", {"n": 11}, [("image", "big.png")], 400, "n", None),
    ("/v1/images/variations", {"seed": -1}, [("image", "big.png")], 400, "seed", None),
    ("/v1/images/variations", {"num_inference_steps": 0}, [("image", "big.png")], 400, "num_inference_steps", None),
    ("/v1/images/variations", {"guidance_scale": "nan"}, [("image", "big.png")], 400, "guidance_scale", None),
    ("/v1/images/variations", {"size": "100x100"}, [("image", "big.png")], 400, "size", None),
    ("/v1/images/variations", {"response_format": "url"}, [("image", "big.png")], 400, "response_format",
     "unsupported_value"),
    ("/v1/images/variations", {"user": "u-1"}, [("image", "big.png")], 400, "user", "unsupported_parameter"),
    ("/v1/images/variations", {"model": "dall-e-2"}, [("image", "big.png")], 404, "model", "model_not_found"),
    ("/v1/images/captions", {"response_format": "b64_json"}, [("image", "big.png")], 400, "response_format",
     "unknown_parameter"),
    ("/v1/images/captions", {"prompt": "x"}, [("image", "big.png")], 400, "prompt", "unknown_parameter"),
])
def test_bad_uploads_get_the_error_object(server, images, path, fields, files, status, param, code):
    if files == "chunked":
        r = requests.post(server.url + path, data=chunked_upload(1 << 20),
                          headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=60)
    else:
        files = [(k, (v, images[v].read_bytes()) if isinstance(v, str) else v) for k, v in files]
        r = requests.post(server.url + path, files=files or None, data={k: str(v) for k, v in fields.items()},
                          timeout=60)
        if not files:       # requests sends a form without files url-encoded: make it multipart
            r = requests.post(server.url + path, files={k: (None, str(v)) for k, v in fields.items()}, timeout=60)
    err = error_of(r.content)
    assert r.status_code == status, (r.status_code, err)
    assert err["param"] == param, err
    if code:
        assert err["code"] == code, err


@pytest.mark.parametrize("body, param, code", [
    ({}, "task", "missing_task"),
    ({"task": "edit"}, "task", "invalid_value"),
    ({"task": 3}, "task", None),
    ({"task": "i2t"}, "task", "wrong_endpoint"),            # an image task: multipart, on its own endpoint
    ({"task": "i2t2i"}, "task", "wrong_endpoint"),
    ({"task": "t", "prompt": "x"}, "prompt", None),
    ({"task": "t2i2t"}, "prompt", "missing_prompt"),
    ({"task": "joint", "image": "x"}, "image", "unknown_parameter"),
    ({"task": "joint", "n": 0}, "n", None),
    ({"task": "joint", "size": "8192x64"}, "size", None),
    ({"task": "i", "guidance_scale": "high"}, "guidance_scale", None),
    ({"task": "joint", "response_format": "url"}, "response_format", "unsupported_value"),
    ({"task": "joint", "quality": "hd"}, "quality", "unsupported_parameter"),
])
def test_bad_task_requests_get_the_error_object(server, body, param, code):
    status, _, raw = server.call("POST", "/v1/generations", body)
    err = error_of(raw)
    assert status == 400 and err["param"] == param, (status, err)
    if code:
        assert err["code"] == code, err


def test_image_requests_merge_each_with_its_own_image_and_seeds(server, images):
    """While a long request runs, variations of three images (4 images: one call), two captions
    (one call) and two unconditional images at different scales (no guidance: one key) queue;
    each merged request gets what it gets alone."""
    blocker = Blocker(server, "blocker-uploads")
    reqs = [("var-0", "/v1/images/variations", "big.png", {"seed": 100}),
            ("var-1", "/v1/images/variations", "small.png", {"seed": 200, "n": 2}),
            ("var-2", "/v1/images/variations", "rgba.png", {"seed": 300}),
            ("cap-0", "/v1/images/captions", "big.png", {"seed": 400}),
            ("cap-1", "/v1/images/captions", "cmyk.jpg", {"seed": 500}),
            ("i-0", "/v1/generations", None, {"task": "i", "seed": 600, "guidance_scale": 3}),
            ("i-1", "/v1/generations", None, {"task": "i", "seed": 700, "guidance_scale": 9})]

    def send(req, headers=None):
        rid, path, image, fields = req
        if image is None:
            status, _, raw = server.call("POST", path, {**SMALL, **fields}, headers)
            return status, json.loads(raw)
        r = server.post_form(path, images[image], {**SMALL, **fields}, headers)
        return r.status_code, r.json()

    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = [pool.submit(send, r, {"X-Request-Id": r[0]}) for r in reqs]
        end = time.monotonic() + 30
        while server.call("GET", "/v1/requests/var-2")[0] != 200 and time.monotonic() < end:
            time.sleep(0.02)
        status, _, raw = server.call("GET", "/v1/requests/var-2")
        queued = json.loads(raw) if status == 200 else None
        merged = [f.result(timeout=120) for f in futures]
    blocker.join()
    if queued and queued["status"] == "queued":
        assert queued["steps_total"] == 2 * SMALL["num_inference_steps"]      # i2t2i: two solver runs
    for (rid, *_), (status, body) in zip(reqs, merged):
        assert status == 200, (rid, body)
    assert max(b["settings"]["batch_requests"] for _, b in merged[:3]) > 1, [b["settings"] for _, b in merged]
    assert max(b["settings"]["batch_requests"] for _, b in merged[5:]) == 2        # the scale does not split them
    for req, (_, got) in zip(reqs, merged):
        _, alone = send(req)
        assert [d["seed"] for d in got["data"]] == [d["seed"] for d in alone["data"]] == \
            [req[3]["seed"] + i for i in range(req[3].get("n", 1))]
        for g, a in zip(got["data"], alone["data"]):
            if "text" in a:
                assert g["text"] == a["text"], req[0]
            if "b64_json" in a:
                assert np.abs(pixels(decode(g["b64_json"])) - pixels(decode(a["b64_json"]))).max() <= 2, req[0]
    images_of = {(req[0], i): pixels(decode(d["b64_json"])) for req, (_, b) in zip(reqs, merged)
                 for i, d in enumerate(b["data"]) if "b64_json" in d}
    for k, img in images_of.items():     # each its own: not another request's image
        assert min(images_of, key=lambda j: np.abs(img - images_of[j]).mean()) == k


def test_a_folder_from_before_the_task_networks_serves_t2i_and_i_only(model, tmp_path, images):
    old = copy_without_task_networks(model, tmp_path / "old")
    r = serve("--model-dir", old, "--port", 0, "--device", "cpu", "--tasks", "t2i,i2t")
    assert r.returncode == 2 and "--tasks i2t" in r.stderr and "vae_encoder.safetensors" in r.stderr, r.stderr
    s = Server(old, tmp_path / "server.log")
    try:
        health = json.loads(s.call("GET", "/health")[2])
        assert health["tasks"] == {"t2i": "/v1/images/generations", "i": "/v1/generations"}   # no image or text networks
        r = s.post_form("/v1/images/variations", images["big.png"], SMALL)
        err = error_of(r.content)
        assert r.status_code == 404 and err["code"] == "task_not_available", err
        assert "not available on this server" in err["message"]
        status, _, raw = s.call("POST", "/v1/generations", {"task": "joint", **SMALL})
        assert status == 400 and error_of(raw)["code"] == "task_not_available"
        assert s.client().images.generate(prompt="still", extra_body=SMALL).data
        assert "not serving i2t" in s.text()
    finally:
        assert s.stop() == 0, s.text()


def test_32_concurrent_requests_through_a_queue_of_8(server, pipe):
    """While a long request runs, 32 arrive at once: 8 fit the queue, the rest get 429 with
    Retry-After; the 8 run merged (max 4 images a call), each with its own images."""
    prompts = ["a red cube", "a dog", "two birds", "a castle at night"]
    reqs = [(prompts[i % 4], 1 + i % 2, 1000 + 37 * i) for i in range(32)]     # (prompt, n, seed)
    client = server.client()
    blocker = Blocker(server, "blocker-concurrency")
    images_before = server.metric('unidiffuser_images_generated_total{task="t2i"}')

    def send(req):
        prompt, n, seed = req
        try:
            return req, client.images.generate(prompt=prompt, n=n, extra_body={**SMALL, "seed": seed})
        except openai.RateLimitError as e:
            return req, e

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(send, r) for r in reqs]
        while sum(f.done() for f in futures) < 24 and blocker.running():
            time.sleep(0.02)
        still_blocked = blocker.running()
        results = [f.result(timeout=180) for f in futures]
    blocker.join()
    accepted = [(req, r) for req, r in results if not isinstance(r, Exception)]
    rejected = [(req, r) for req, r in results if isinstance(r, Exception)]
    assert len(accepted) + len(rejected) == 32                                   # none lost
    assert len(accepted) >= 8 and rejected, (len(accepted), len(rejected))
    if still_blocked:                       # the queue stayed full the whole burst: exactly 8 in
        assert len(accepted) == 8, len(accepted)
    for _, e in rejected:
        assert e.status_code == 429 and int(e.response.headers["retry-after"]) >= 1
        assert e.body["code"] == "queue_full" and e.body["type"] == "rate_limit_error"
    assert max(r.model_extra["settings"]["batch_requests"] for _, r in accepted) > 1    # merged
    assert max(r.model_extra["settings"]["batch_images"] for _, r in accepted) <= 4     # --max-batch
    # Each got its own images: the seeds it asked for, and the pixels of that request made alone
    # (to the rounding of batched arithmetic: a batch of other rows changes float sums slightly).
    refs = {}
    for (prompt, n, seed), r in accepted:
        assert [d.model_extra["seed"] for d in r.data] == [seed + i for i in range(n)]
        alone = pipe(prompt, seed=seed, n=n, steps=2, height=64, width=64)
        for i, (d, img) in enumerate(zip(r.data, alone.images)):
            refs[(seed, i)] = (pixels(decode(d.b64_json)), pixels(img))
    for k, (got, ref) in refs.items():
        assert got.shape == (64, 64, 3)
        assert np.abs(got - ref).max() <= 2, k
        nearest = min(refs, key=lambda j: np.abs(got - refs[j][1]).mean())
        assert nearest == k, (k, nearest)
    assert server.call("GET", "/health")[0] == 200
    n_images = sum(n for (_, n, _), _ in accepted)
    assert server.metric('unidiffuser_images_generated_total{task="t2i"}') == images_before + n_images + 1
    assert server.metric("unidiffuser_queue_depth") == 0


def test_progress_says_queue_position_and_steps(server):
    blocker = Blocker(server, "blocker-progress", seconds=2)
    first = blocker.progress()
    assert first["status"] == "running" and first["steps_total"] == blocker.steps and first["queue_position"] is None
    waiting = threading.Thread(target=server.call, args=("POST", "/v1/images/generations", {"prompt": "next", **SMALL},
                                                         {"X-Request-Id": "waiting-1"}), daemon=True)
    waiting.start()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        status, _, raw = server.call("GET", "/v1/requests/waiting-1")
        if status == 200:
            break
    p = json.loads(raw)
    assert status == 200 and p["status"] == "queued" and p["queue_position"] == 0, p
    later = blocker.progress()
    assert later["steps_done"] >= first["steps_done"]
    blocker.join()
    waiting.join(60)
    assert server.call("GET", "/v1/requests/waiting-1")[0] == 404          # answered, forgotten


def test_client_gone_before_its_batch_starts_costs_nothing(server):
    blocker = Blocker(server, "blocker-disconnect")
    batches = server.metric("unidiffuser_batch_images_count")      # the blocker's call not yet among them
    dropped = server.metric('unidiffuser_requests_dropped_total{reason="disconnected"}')
    body = json.dumps({"prompt": "nobody waits for me", **SMALL}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"X-Request-Id: gone-1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    end = time.monotonic() + 10
    while server.call("GET", "/v1/requests/gone-1")[0] != 200 and time.monotonic() < end:
        time.sleep(0.02)
    sock.close()
    while server.call("GET", "/v1/requests/gone-1")[0] == 200 and time.monotonic() < end:
        time.sleep(0.05)
    assert blocker.running(), "the blocker ended first: the drop was not seen before the batch could start"
    blocker.join()
    time.sleep(0.2)
    assert server.metric('unidiffuser_requests_dropped_total{reason="disconnected"}') == dropped + 1
    assert server.metric("unidiffuser_batch_images_count") == batches + 1      # the blocker's call only


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    (b'{"prompt": "x", "guidance_scale": NaN}', 400, None, "invalid_json"),
    ({}, 400, "prompt", "missing_prompt"),
    ({"prompt": "   "}, 400, "prompt", None),
    ({"prompt": 7}, 400, "prompt", None),
    ({"prompt": "x" * 4001}, 400, "prompt", None),
    ({"prompt": "x", "n": 0}, 400, "n", None),
    ({"prompt": "x", "n": 11}, 400, "n", None),
    ({"prompt": "x", "n": "2"}, 400, "n", None),
    ({"prompt": "x", "n": 1.5}, 400, "n", None),
    ({"prompt": "x", "n": True}, 400, "n", None),
    ({"prompt": "x", "size": "100x100"}, 400, "size", None),
    ({"prompt": "x", "size": "8192x64"}, 400, "size", None),
    ({"prompt": "x", "size": "big"}, 400, "size", None),
    ({"prompt": "x", "size": [64, 64]}, 400, "size", None),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps", None),
    ({"prompt": "x", "num_inference_steps": 1001}, 400, "num_inference_steps", None),
    ({"prompt": "x", "num_inference_steps": "5"}, 400, "num_inference_steps", None),
    ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale", None),
    (b'{"prompt": "x", "guidance_scale": 1e999}', 400, "guidance_scale", None),     # inf
    ({"prompt": "x", "seed": -1}, 400, "seed", None),
    ({"prompt": "x", "seed": 2**64}, 400, "seed", None),
    ({"prompt": "x", "seed": 2**64 - 1, "n": 2}, 400, "seed", None),
    ({"prompt": "x", "seed": "1"}, 400, "seed", None),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format", "unsupported_value"),
    ({"prompt": "x", "output_format": "jpeg"}, 400, "output_format", "unsupported_value"),
    ({"prompt": "x", "quality": "hd"}, 400, "quality", "unsupported_parameter"),
    ({"prompt": "x", "style": "vivid"}, 400, "style", "unsupported_parameter"),
    ({"prompt": "x", "user": "u-1"}, 400, "user", "unsupported_parameter"),
    ({"prompt": "x", "model_dir": "/etc"}, 400, "model_dir", "unknown_parameter"),
    ({"prompt": "x", "model": "dall-e-3"}, 404, "model", "model_not_found"),
    ({"prompt": "x", "task": "joint"}, 400, "task", "wrong_endpoint"),
    ({"prompt": "x", "task": "i2t"}, 400, "task", "wrong_endpoint"),
    ({"prompt": "x", "task": "edit"}, 400, "task", "invalid_value"),
    (b'{"prompt": "' + b"x" * 70_000 + b'"}', 413, None, "body_too_large"),
])
def test_bad_requests_get_the_error_object(server, body, status, param, code):
    got, headers, raw = server.call("POST", "/v1/images/generations", body)
    err = error_of(raw)
    assert got == status, (got, err)
    assert err["param"] == param, err
    if code:
        assert err["code"] == code, err
    assert headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("method, path, headers, status, code", [
    ("POST", "/v1/images/variations", {}, 415, "unsupported_media_type"),     # multipart only
    ("POST", "/v1/images/captions", {}, 415, "unsupported_media_type"),
    ("POST", "/v1/images/captions", {"Content-Type": "multipart/form-data"}, 400, "invalid_multipart"),   # no boundary
    ("POST", "/v1/images/variations", {"Content-Type": "multipart/form-data; boundary=b", "Content-Length": "2000000"},
     413, "body_too_large"),
    ("POST", "/v1/generations", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("POST", "/v1/images/generations", {"Origin": "http://evil.example"}, 403, "cross_origin"),     # CSRF, no key
    ("POST", "/v1/images/captions", {"Origin": "null"}, 403, "cross_origin"),
    ("GET", "/v1/images/generations", {}, 405, None),
    ("GET", "/v1/nothing", {}, 404, "not_found"),
    ("GET", "/v1/models/dall-e-3", {}, 404, "model_not_found"),
    ("GET", "/v1/requests/unknown-id", {}, 404, "not_found"),
    ("GET", "/v1/requests/bad%20id!", {}, 422, "invalid_value"),         # FastAPI's own validation
    ("POST", "/v1/images/generations", {"X-Request-Id": "bad id!"}, 400, None),
    ("POST", "/v1/images/generations", {"Content-Length": "10000000"}, 413, "body_too_large"),
    ("POST", "/v1/images/generations", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),   # no CSRF
    ("GET", "/health", {"Host": "evil.example:8000"}, 400, "invalid_host"),                         # DNS rebinding
    ("POST", "/v1/images/generations", {"Host": "evil.example"}, 400, "invalid_host"),
])
def test_bad_routes_and_headers_get_the_error_object(server, method, path, headers, status, code):
    got, _, raw = server.call(method, path, b"{}" if method == "POST" else None, headers)
    err = error_of(raw)
    assert got == status, (got, err)
    if code:
        assert err["code"] == code, err


def test_server_survives_the_bad_requests(server, images):
    assert server.call("GET", "/health")[0] == 200
    r = server.client().images.generate(prompt="still here", extra_body={**SMALL, "seed": 3})
    assert decode(r.data[0].b64_json).size == (64, 64)
    r = server.post_form("/v1/images/captions", images["big.png"], {**SMALL, "seed": 3})
    assert r.status_code == 200 and r.json()["data"][0]["text"]
    assert server.metric('unidiffuser_http_requests_total{endpoint="/v1/images/generations",status="400"}') > 20
    assert server.metric('unidiffuser_http_requests_total{endpoint="/v1/images/variations",status="400"}') > 10
    assert server.metric('unidiffuser_texts_generated_total{task="i2t"}') > 0
    assert server.metric('unidiffuser_images_generated_total{task="i2t2i"}') > 0


# ---- API key and timeout ----------------------------------------------------------------------
def test_api_key_is_required(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        status, h, raw = keyed.call("POST", "/v1/images/generations", {"prompt": "x", **SMALL}, headers)
        assert status == 401 and error_of(raw)["type"] == "authentication_error" and h["www-authenticate"] == "Bearer"
    assert keyed.call("GET", "/metrics")[0] == 401 and keyed.call("GET", "/v1/models")[0] == 401
    assert keyed.call("GET", "/health")[0] == 200 and keyed.call("GET", "/")[0] == 200     # no data there
    assert json.loads(keyed.call("GET", "/health")[2])["auth_required"] is True
    with pytest.raises(openai.AuthenticationError):
        keyed.client(api_key="wrong").images.generate(prompt="x", extra_body=SMALL)
    r = keyed.client(api_key=KEY).images.generate(prompt="x", extra_body=SMALL)
    assert decode(r.data[0].b64_json).size == (64, 64)
    assert keyed.call("GET", "/metrics", headers=auth)[0] == 200
    assert keyed.call("GET", "/v1/models", headers={**auth, "Host": "gpu-box.example"})[0] == 200   # the key is the guard
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png, format="PNG")
    r = requests.post(keyed.url + "/v1/images/captions", files={"image": ("red.png", png.getvalue())}, data=SMALL)
    assert r.status_code == 401 and error_of(r.content)["code"] == "invalid_api_key"
    r = requests.post(keyed.url + "/v1/images/captions", files={"image": ("red.png", png.getvalue())}, data=SMALL,
                      headers={**auth, "Origin": "https://elsewhere.example"})      # with a key, any page may ask
    assert r.status_code == 200 and r.json()["data"][0]["text"]


def test_waiting_past_the_timeout_is_503(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    blocker = Blocker(keyed, "blocker-timeout", seconds=4)
    t0 = time.monotonic()
    status, _, raw = keyed.call("POST", "/v1/images/generations", {"prompt": "late", **SMALL}, auth)
    waited = time.monotonic() - t0
    assert status == 503 and error_of(raw)["code"] == "timeout", raw
    assert 0.9 <= waited < 10 and blocker.running()
    blocker.join()
    assert keyed.metric('unidiffuser_requests_dropped_total{reason="timeout"}', auth) == 1
    assert keyed.call("GET", "/health")[0] == 200


# ---- SIGTERM ----------------------------------------------------------------------------------
def test_sigterm_finishes_the_running_batch_and_exits_0(model, tmp_path):
    s = Server(model, tmp_path / "server.log", ready=False)
    try:
        # Listening at once, not ready until loaded and warm: 503 with the reason.
        status, headers, raw = s.call("GET", "/health")
        assert status == 503 and json.loads(raw)["status"] in ("loading", "warming"), raw
        status, headers, raw = s.call("POST", "/v1/images/generations", {"prompt": "early", **SMALL})
        assert status == 503 and error_of(raw)["code"] in ("loading", "warming") and headers["retry-after"] == "5"
        s.url = s._wait(ready=True)
        blocker = Blocker(s, "blocker-sigterm")
        queued = {}
        t = threading.Thread(target=lambda: queued.setdefault("r", s.call(
            "POST", "/v1/images/generations", {"prompt": "queued", **SMALL}, {"X-Request-Id": "queued-1"})), daemon=True)
        t.start()
        end = time.monotonic() + 10
        while s.call("GET", "/v1/requests/queued-1")[0] != 200 and time.monotonic() < end:
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        while json.loads(s.call("GET", "/health")[2] or b'{"status": "?"}').get("status") != "draining":
            assert time.monotonic() < end + 10, "never draining"
            time.sleep(0.02)
        status, _, raw = s.call("GET", "/health")
        assert status == 503 and json.loads(raw)["status"] == "draining"
        status, _, raw = s.call("POST", "/v1/images/generations", {"prompt": "too late", **SMALL})
        assert status == 503 and error_of(raw)["code"] == "draining"
        t.join(30)
        assert queued["r"][0] == 503 and error_of(queued["r"][2])["code"] == "draining"     # never started
        assert blocker.running()
        out = blocker.join()                                                             # answered whole
        assert decode(out["data"][0]["b64_json"]).size == (128, 128)
        assert s.proc.wait(60) == 0, s.text()
        assert "draining" in s.text() and "Traceback" not in s.text()
    finally:
        s.stop()


# ---- the web page in a real browser -----------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def test_web_page_in_headless_chromium(server, images, tmp_path):
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            pytest.skip(f"{binary} is missing: apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1000",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        wait.until(lambda d: "ready" in d.find_element(By.ID, "server").text)
        assert driver.find_element(By.ID, "width").get_attribute("value") == "128"        # the model's size
        driver.find_element(By.ID, "prompt").send_keys("an elephant under the sea")
        for field, value in (("steps", "4"), ("seed", "42"), ("n", "2"), ("scale", "6.5")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.execute_script("""window.seen = [];
            new MutationObserver(() => window.seen.push(document.getElementById('progress-text').textContent))
              .observe(document.getElementById('progress-text'), {childList: true, characterData: true, subtree: true});""")
        blocker = Blocker(server, "blocker-page", seconds=5)     # so the page's request waits and shows it
        driver.find_element(By.ID, "generate").click()
        figures = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "figure.result") if len(
            d.find_elements(By.CSS_SELECTOR, "figure.result")) == 2 else None)
        blocker.join()
        seen = driver.execute_script("return window.seen")
        assert any(t.startswith("queued") for t in seen), seen            # the progress it showed
        assert [f.get_attribute("data-seed") for f in figures] == ["42", "43"]
        for fig in figures:
            img = fig.find_element(By.TAG_NAME, "img")
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 128
            assert img.is_displayed()
            src = img.get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            assert decode(src.split(",", 1)[1]).size == (128, 128)
            link = fig.find_element(By.LINK_TEXT, "download")
            assert link.get_attribute("download").endswith(f"_seed{fig.get_attribute('data-seed')}.png")
            assert "seed" in fig.text and "128×128" in fig.text and "4 steps" in fig.text and "scale 6.5" in fig.text
        assert not driver.find_element(By.ID, "error").is_displayed()
        assert not driver.find_element(By.ID, "progress").is_displayed()          # done
        assert not driver.find_element(By.ID, "key-row").is_displayed()           # no --api-key

        # An image task: captioning an uploaded file; the text is shown as text, with a .txt download.
        assert not driver.find_element(By.ID, "image").is_displayed()
        Select(driver.find_element(By.ID, "task")).select_by_value("i2t")
        assert not driver.find_element(By.ID, "prompt").is_displayed()
        driver.find_element(By.ID, "generate").click()                    # no file yet: the page says so
        assert "image file" in wait.until(lambda d: d.find_element(By.ID, "error").text)
        driver.find_element(By.ID, "image").send_keys(str(images["big.png"]))
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        for field, value in (("steps", "2"), ("seed", "7"), ("n", "1")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        fig = wait.until(lambda d: (d.find_elements(By.CSS_SELECTOR, "figure.result[data-task=i2t]") or [None])[0])
        assert fig.get_attribute("data-seed") == "7" and not fig.find_elements(By.TAG_NAME, "img")
        expected = server.post_form("/v1/images/captions", images["big.png"],
                                    {"seed": 7, "num_inference_steps": 2, "guidance_scale": 6.5}).json()
        assert fig.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent") == expected["data"][0]["text"]
        assert "seed 7" in fig.text and "128×128" in fig.text and "2 steps" in fig.text and "big.png" in fig.text
        assert fig.find_element(By.LINK_TEXT, "download").get_attribute("download") == "big_i2t_seed7.txt"
        assert not driver.find_element(By.ID, "error").is_displayed()
        assert len(driver.find_elements(By.CSS_SELECTOR, "figure.result")) == 3
        shot = tmp_path / "server-page.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
        if os.environ.get("UNIDIFFUSER_SCREENSHOT"):        # to refresh docs/server-page.png
            shutil.copy(shot, os.environ["UNIDIFFUSER_SCREENSHOT"])
    finally:
        driver.quit()


# ---- the benchmark ----------------------------------------------------------------------------
def test_bench_runs_on_the_cpu_with_tiny_weights(model, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "unidiffuser.server.bench", "--model-dir", str(model), "--device", "cpu",
                        "--concurrency", "1", "2", "--requests", "4", "--warmup-rounds", "1", "--steps", "2",
                        "--size", "64", "--json", str(out)], capture_output=True, text=True, env=env(), cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "HTTP server (openai client)" in r.stdout and "Python API, serial" in r.stdout
    result = json.loads(out.read_text())
    assert [row["concurrency"] for row in result["server"]] == [1, 2] and result["server_exit"] == 0
    for row in result["server"] + [result["api_serial"]]:
        assert row["images_per_s"] > 0 and row["p50_s"] > 0 and row["p99_s"] >= row["p50_s"]
    assert all(row["seeds_ok"] for row in result["server"])
    assert result["server"][0]["max_pixel_diff_vs_api"] == 0      # batch 1 both ways: the same pixels
