"""Every task of tasks.py on the CPU with tiny random weights.

Faithfulness: each solver run of each task against thu-ml's `sample_multi_v1.py` restated here
(its t2i_nnet, i2t_nnet, joint_nnet, i_nnet and t_nnet: separate conditional and unconditional
UViT calls, timesteps 0 / t / N, cond + scale * (cond - uncond), the output it keeps; sample_fn;
how i2t2i and t2i2t chain two runs), on our UViT in fp32 and our solver (sampler.py, pinned to
DPM-Solver in test_sampler.py), fed the noise our pipeline draws, re-derived here from the seeds;
the input images' crop and encoding as the original's. A changed entry of MODES must fail it.

Then the Python API per task (outputs, sizes, seeds, determinism, inputs, save() and its sidecars),
input images of every kind, and a model folder converted before the image and caption networks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import child_env, copy_without_task_networks, input_images
from PIL import Image

from models.image_encoder import preprocess
from unidiffuser import UniDiffuser, sampler
from unidiffuser.images import center_crop, read_image
from unidiffuser.pipeline import Result
from unidiffuser.tasks import IMG, MODES, TASKS, TEXT
from unidiffuser.weights import folders, loading

ROOT = Path(__file__).resolve().parents[1]
N = 1000            # the original's N = len(betas)
DATA_TYPE = 1       # sample_unidiffuser_v1.py's config.data_type
H, W = 32, 48       # not square: a latent transposed anywhere would not fit
STEPS = 4           # DPM-Solver 'fast' with 4 evaluations: an order-3 step, then an order-1 step
SEEDS = [11, 2**40 + 3]
RTOL = 1e-5

# Which streams each of the original's solver runs moves (sample_fn's _x_init: combine_joint(z,
# clip_img, text), combine(z, clip_img), or the text alone), and the chain of runs of each --mode.
STATE = {"t2i": (IMG,), "i": (IMG,), "i2t": (TEXT,), "t": (TEXT,), "joint": (IMG, TEXT)}
CHAIN = {"t2i": ("t2i",), "i2t": ("i2t",), "joint": ("joint",), "i": ("i",), "t": ("t",),
         "i2t2i": ("i2t", "t2i"), "t2i2t": ("t2i", "i2t")}
# Our pipeline's stand-ins for the original's per-evaluation randn calls: the draws of the row
# groups (0 = the conditional rows, then each distinct unconditional group in MODES order) fed
# noise, in draw order, as (group, stream). The original draws inside each call:
#   t2i   text_N for the unconditional call            -> (1, text)
#   i2t   z_N, clip_img_N for the unconditional call    -> (1, img)
#   joint text_noise (the image's uncond call)         -> (1, text)
#         z_noise, clip_img_noise (the text's uncond)   -> (2, img)
#   i     the text fed beside the image                 -> (0, text)
#   t     z and clip_img fed beside the text            -> (0, img)
DRAWS = {"t2i": [(1, TEXT)], "i2t": [(1, IMG)], "joint": [(1, TEXT), (2, IMG)], "i": [(0, TEXT)], "t": [(0, IMG)]}


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=child_env(), cwd=cwd)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Random tiny weights stored in fp32: the pipeline's networks and the reference's are the same numbers."""
    out = tmp_path_factory.mktemp("tasks") / "model"
    r = cli("convert_weights.py", "--random", "tiny", "--dtype", "fp32", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def pipe(model):
    return UniDiffuser.load(model, device="cpu")


@pytest.fixture(scope="module")
def nets(model):
    """Fresh fp32 copies of the networks the reference runs, not the pipeline's objects."""
    cfg, manifest = folders.read_manifest(model)
    return cfg, loading.load_networks(model, cfg, manifest, "cpu", torch.float32,
                                      names=("uvit", "vae_encoder", "image_encoder"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return input_images(tmp_path_factory.mktemp("images"))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_matches(name: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ref).all() and ref.abs().max() > 0, f"{name}: degenerate reference"
    err = rel_err(ours, ref)
    assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


# -- the reference ----------------------------------------------------------------------------

class Original:
    """sample_multi_v1.py's model functions and sample_fn, restated on our UViT and solver. One
    UViT call per row group (the original's separate cond and uncond calls), data type 1, the
    condition clean at timestep 0 and noise at timestep N; `draws(k)` gives the noise the
    original would draw inside evaluation k (our pipeline's draws, see DRAWS)."""

    def __init__(self, uvit, shapes, scale: float, steps: int):
        self.uvit, self.scale, self.steps = uvit, scale, steps
        self.z_shape, (_, self.clip_dim), self.text_shape = shapes.z, shapes.clip_img, shapes.text

    def nnet(self, z, clip_img, text, t_img, t_text):
        return self.uvit(z, clip_img, text, t_img, t_text, torch.full(t_img.shape, DATA_TYPE, dtype=torch.long))

    def split(self, x):                 # [B, C*H*W + D] -> z [B, C, H, W], clip_img [B, 1, D]
        z, clip_img = x.split([int(np.prod(self.z_shape)), self.clip_dim], dim=1)
        return z.reshape(-1, *self.z_shape), clip_img.reshape(-1, 1, self.clip_dim)

    @staticmethod
    def combine(*parts):
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    def split_joint(self, x):
        img, text = x.split([x.shape[1] - int(np.prod(self.text_shape)), int(np.prod(self.text_shape))], dim=1)
        return (*self.split(img), text.reshape(-1, *self.text_shape))

    def guide(self, out, out_uncond):
        return out + self.scale * (out - out_uncond)

    def t2i_nnet(self, x, t, draws, text):
        z, clip_img = self.split(x)
        zeros = torch.zeros_like(t)
        z_out, clip_img_out, _ = self.nnet(z, clip_img, text, t, zeros)
        out = self.combine(z_out, clip_img_out)
        if self.scale == 0:
            return out
        text_n, = draws[(1, TEXT)]              # 'true_uncond': the prompt replaced by noise at time N
        z_unc, clip_img_unc, _ = self.nnet(z, clip_img, text_n, t, torch.full_like(t, N))
        return self.guide(out, self.combine(z_unc, clip_img_unc))

    def i2t_nnet(self, x, t, draws, z, clip_img):
        zeros = torch.zeros_like(t)
        _, _, text_out = self.nnet(z, clip_img, x, zeros, t)
        if self.scale == 0:
            return text_out
        z_n, clip_img_n = draws[(1, IMG)]
        _, _, text_unc = self.nnet(z_n, clip_img_n, x, torch.full_like(t, N), t)
        return self.guide(text_out, text_unc)

    def joint_nnet(self, x, t, draws):
        z, clip_img, text = self.split_joint(x)
        z_out, clip_img_out, text_out = self.nnet(z, clip_img, text, t, t)
        out = self.combine(z_out, clip_img_out, text_out)
        if self.scale == 0:
            return out
        text_noise, = draws[(1, TEXT)]
        z_noise, clip_img_noise = draws[(2, IMG)]
        _, _, text_unc = self.nnet(z_noise, clip_img_noise, text, torch.full_like(t, N), t)
        z_unc, clip_img_unc, _ = self.nnet(z, clip_img, text_noise, t, torch.full_like(t, N))
        return self.guide(out, self.combine(z_unc, clip_img_unc, text_unc))

    def i_nnet(self, x, t, draws):
        z, clip_img = self.split(x)
        text, = draws[(0, TEXT)]
        z_out, clip_img_out, _ = self.nnet(z, clip_img, text, t, torch.full_like(t, N))
        return self.combine(z_out, clip_img_out)

    def t_nnet(self, x, t, draws):
        z, clip_img = draws[(0, IMG)]
        _, _, text_out = self.nnet(z, clip_img, x, torch.full_like(t, N), t)
        return text_out

    def sample_fn(self, mode: str, x_init, noise, **condition):
        """One solver run from x_init (the original's [B, 77, D] for the text-only modes); returns
        what the original's sample_fn returns: (z, clip_img, text), (z, clip_img) or text."""
        if STATE[mode] == (TEXT,):
            x_init = x_init.reshape(-1, *self.text_shape)
        nnet = getattr(self, f"{mode}_nnet")
        B = x_init.shape[0]

        def model_fn(x, k, t_continuous):
            # The solver's continuous time, scaled as model_fn's `t = t_continuous * N` (the float
            # rounding of this line is the solver's business, so it is computed as ours does).
            t = torch.full((B,), t_continuous * N)
            return nnet(x, t, {key: tuple(v[k] for v in vs) for key, vs in noise.items()}, **condition)

        x = sampler.sample(model_fn, x_init, sampler.plan(self.steps))
        if mode == "joint":
            return self.split_joint(x)
        return self.split(x) if mode in ("t2i", "i") else x


def original_crop(img: Image.Image, width: int, height: int) -> np.ndarray:
    """utils.center_crop(width, height, np.array(img)): the centred square of side min(h, w) cut by
    slicing [(h - s) // 2 : (h + s) // 2], then PIL Lanczos to width x height, uint8."""
    a = np.array(img).astype(np.uint8)
    h, w = a.shape[:2]
    s = min(h, w)
    a = a[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2]
    return np.array(Image.fromarray(a, "RGB").resize((width, height), Image.LANCZOS)).astype(np.uint8)


def original_image_condition(nets, crops, vae_noise):
    """prepare_contexts' image features and z_img = autoencoder.sample(moments): the VAE on
    crop / 127.5 - 1 (computed in float64, then float32, as numpy does there) with the given noise,
    CLIP on its own preprocessing of the crop."""
    vae, clip = nets["vae_encoder"], nets["image_encoder"]
    x = torch.from_numpy(np.stack([(c / 127.5 - 1.0).astype(np.float32) for c in crops])).permute(0, 3, 1, 2)
    z = vae.sample(vae.moments(x), vae_noise)
    clip_img = clip(preprocess([Image.fromarray(c) for c in crops]))[:, None]
    return z, clip_img


def expected_draws(task: str, seeds, shapes):
    """What our pipeline must draw, per sample from torch.Generator().manual_seed(seed): the VAE's
    noise of an input image first, then per solver run the state's streams (z, clip_img; text)
    and each DRAWS entry's streams as [steps, ...]. Returns the VAE noise [B, ...] (or None) and per
    run (x_init [B, D], {key: tensors [steps, B, ...]})."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    vae = None
    if TASKS[task].input == "image":
        vae = torch.stack([torch.randn(shapes.z, generator=g) for g in gens])
    runs = []
    for mode in CHAIN[task]:
        xs, noise = [], {key: [] for key in DRAWS[mode]}
        for g in gens:
            xs.append(torch.cat([torch.randn(shape, generator=g).flatten() for s in STATE[mode]
                                 for shape in shapes.of(s)]))
            for key in DRAWS[mode]:
                noise[key].append([torch.randn(STEPS, *shape, generator=g) for shape in shapes.of(key[1])])
        runs.append((torch.stack(xs), {key: tuple(torch.stack(p, dim=1) for p in zip(*per))
                                       for key, per in noise.items()}))
    return vae, runs


def run_recorded(pipe, task, inputs, seeds, scale):
    """Our pipeline on the task through the API, recording the crops it was given, the first run's
    condition, and per solver run its initial state, per-evaluation noise and final state. The
    outputs are not decoded (the decoders have their own tests; captions would cost seconds)."""
    p, rec = pipe.pipeline, {"runs": []}
    encode, initial_noise, sample = p.encode, p.initial_noise, p.sample

    def recording_encode(req, gens):
        rec["crops"], rec["given"] = req.images, encode(req, gens)
        return rec["given"]

    def recording_noise(mode, gens, steps, shapes):
        x, noise = initial_noise(mode, gens, steps, shapes)
        rec["runs"].append({"x0": x.clone(), "noise": noise})
        return x, noise

    def recording_sample(name, x, *args, **kwargs):
        out = sample(name, x, *args, **kwargs)
        rec["runs"][-1].update(mode=name, x=out.clone())
        return out

    with pytest.MonkeyPatch.context() as m:
        m.setattr(p, "encode", recording_encode)
        m.setattr(p, "initial_noise", recording_noise)
        m.setattr(p, "sample", recording_sample)
        m.setattr(p, "decode", lambda task, state, x, scale, timings: Result(None, timings))
        n = len(seeds) if TASKS[task].input is None else 1
        pipe.generate(task, inputs, seeds=seeds, n=n, batch=len(seeds), steps=STEPS, scale=scale, height=H, width=W)
    f = p.cfg.vae_decoder.downsample
    rec["shapes"] = p.shapes(H // f, W // f)
    return rec


def check_task(pipe, nets, images, task: str, scale: float = 7.0) -> None:
    """Our pipeline's runs of `task` equal the original's, from the same noise."""
    kind = TASKS[task].input
    photos = [images["big.png"], images["small.png"]]
    inputs = {"prompt": ["a red cube", "an elephant under the sea"], "image": photos, None: None}[kind]
    rec = run_recorded(pipe, task, inputs, SEEDS, scale)
    shapes = rec["shapes"]
    assert [r["mode"] for r in rec["runs"]] == list(CHAIN[task])

    vae_noise, draws = expected_draws(task, SEEDS, shapes)
    for i, ((x0, noise), run) in enumerate(zip(draws, rec["runs"])):   # the same noise, bit for bit
        assert torch.equal(run["x0"], x0), f"run {i}: initial state"
        assert list(run["noise"]) == list(noise), f"run {i}: noise inputs {list(run['noise'])}"
        for key in noise:
            assert all(torch.equal(a, b) for a, b in zip(run["noise"][key], noise[key])), f"run {i}: noise {key}"

    _, networks = nets
    ref = Original(networks["uvit"], shapes, scale, STEPS)
    if kind == "image":
        # Image.open(f).convert('RGB'), utils.center_crop, then the VAE and CLIP features
        crops = [original_crop(Image.open(f).convert("RGB"), W, H) for f in photos]
        assert all(np.array_equal(np.array(ours), c) for ours, c in zip(rec["crops"], crops)), "crop"
        z_img, clip_imgs = original_image_condition(networks, crops, vae_noise)
        assert_matches("image condition z", rec["given"][IMG][0], z_img)
        assert_matches("image condition clip_img", rec["given"][IMG][1], clip_imgs)
    else:
        # The prompts' text latents (CLIP text tower + encode_prefix) are pinned in test_oracles.py.
        contexts_low_dim = rec["given"][TEXT][0] if kind == "prompt" else None

    # The original's --mode branches
    (x1, n1), second = draws[0], (draws[1] if len(draws) > 1 else None)
    if task == "t2i":
        outs = [ref.sample_fn("t2i", x1, n1, text=contexts_low_dim)]
    elif task == "i":
        outs = [ref.sample_fn("i", x1, n1)]
    elif task == "joint":
        outs = [ref.sample_fn("joint", x1, n1)]
    elif task == "i2t":
        outs = [ref.sample_fn("i2t", x1, n1, z=z_img, clip_img=clip_imgs)]
    elif task == "t":
        outs = [ref.sample_fn("t", x1, n1)]
    elif task == "i2t2i":
        _text = ref.sample_fn("i2t", x1, n1, z=z_img, clip_img=clip_imgs)
        outs = [_text, ref.sample_fn("t2i", *second, text=_text)]
    elif task == "t2i2t":
        _z, _clip_img = ref.sample_fn("t2i", x1, n1, text=contexts_low_dim)
        outs = [(_z, _clip_img), ref.sample_fn("i2t", *second, z=_z, clip_img=_clip_img)]
    assert len(outs) == len(rec["runs"])
    for i, (out, run) in enumerate(zip(outs, rec["runs"])):
        flat = ref.combine(*(out if isinstance(out, tuple) else (out,)))
        # A chain's second run starts from the first one's result, rounding and all (ours batches
        # the cond and uncond rows in one UViT call, the original makes one call each), and guidance
        # amplifies that: measured up to 6e-6 there, 2e-6 in a first run; a changed MODES entry, 1e-2.
        assert_matches(f"{task} run {i} ({run['mode']}) final state", run["x"], flat, RTOL if i == 0 else 3 * RTOL)


@pytest.mark.parametrize("task, scale", [*((t, 7.0) for t in TASKS), ("t2i", 0.0), ("joint", 0.0), ("i2t", 3.0)])
def test_every_task_follows_the_original(pipe, nets, images, task, scale):
    check_task(pipe, nets, images, task, scale)


def changed(mode: str, rows: str, **fields):
    """MODES[mode] with one row group's fields replaced: rows "cond" or "uncond" (every uncond entry)."""
    m = MODES[mode]
    if rows == "cond":
        return dataclasses.replace(m, cond=dataclasses.replace(m.cond, **fields))
    return dataclasses.replace(m, uncond=tuple((s, dataclasses.replace(r, **fields)) for s, r in m.uncond))


@pytest.mark.parametrize("task, mode, rows, fields", [
    ("t2i", "t2i", "uncond", {"t_text": "0"}),     # the noise fed as if it were a clean prompt
    ("t2i", "t2i", "cond", {"t_text": "t"}),       # the prompt noised with the image
    ("i2t", "i2t", "cond", {"t_img": "t"}),
    ("joint", "joint", "cond", {"t_text": "N"}),
    ("i", "i", "cond", {"t_text": "0"}),
    ("t", "t", "cond", {"t_img": "0"}),
    ("i2t2i", "t2i", "uncond", {"t_text": "0"}),   # only the chain's second run changed
])
def test_a_changed_mode_fails_the_comparison(pipe, nets, images, monkeypatch, task, mode, rows, fields):
    """The comparison bites: one timestep of one row group of MODES changed, ours no longer
    follows the original (the noise drawn stays the same)."""
    monkeypatch.setitem(MODES, mode, changed(mode, rows, **fields))
    with pytest.raises(AssertionError, match="final state: relative error"):
        check_task(pipe, nets, images, task)


def test_images_convert_and_crop_as_the_original(images):
    """read_image is Image.open().convert('RGB') (an animation's first frame, 16-bit, palette, RGBA
    and CMYK converted by PIL), center_crop the original's utils.center_crop, at any resolution."""
    for name in ("big.png", "small.png", "anim.gif", "grey16.png", "palette.png", "rgba.png", "cmyk.jpg"):
        ours = read_image(images[name])
        theirs = Image.open(images[name]).convert("RGB")
        assert ours.image.mode == "RGB" and np.array_equal(np.array(ours.image), np.array(theirs)), name
        assert ours.name == name and ours.sha256 == hashlib.sha256(images[name].read_bytes()).hexdigest()
        for width, height in ((32, 32), (48, 32), (32, 80)):
            assert np.array_equal(np.array(center_crop(ours.image, width, height)),
                                  original_crop(theirs, width, height)), (name, width, height)
    assert np.array_equal(np.array(read_image(images["anim.gif"]).image),
                          np.array(Image.open(images["first_frame.png"])))


@pytest.mark.parametrize("name, why", [
    ("missing.png", "file not found"), ("folder", "not a file"), ("not_image.png", "not an image PIL can read"),
    ("truncated.png", "not a readable image"), ("truncated.jpg", "not a readable image"),
    ("bomb.png", "too many pixels"), ("huge_bomb.png", "too many pixels"),
])
def test_bad_images_are_one_clear_value_error(pipe, images, monkeypatch, name, why):
    path = images.get(name) or images["big.png"].parent / name
    if name == "folder":
        path.mkdir(exist_ok=True)
    monkeypatch.setattr(pipe.pipeline, "encode", lambda *a: pytest.fail("the pipeline ran"))
    with pytest.raises(ValueError, match=f"image {path}: {why}"):
        pipe.caption(path)
    with pytest.raises(ValueError, match=f"image {path}: {why}"):
        pipe.vary([images["big.png"], path])


# -- the API per task -------------------------------------------------------------------------

PROMPTS = ["a red cube", "an elephant under the sea"]
STEMS = {   # each sample's file name: the input (prompt slug, image file's stem), the task but t2i's, the seed
    "t2i": ["a-red-cube_seed21", "an-elephant-under-the-sea_seed22"],
    "i2t": ["big_i2t_seed21", "small_i2t_seed22"],
    "joint": ["joint_seed21", "joint_seed22"],
    "i": ["i_seed21", "i_seed22"],
    "t": ["t_seed21", "t_seed22"],
    "i2t2i": ["big_i2t2i_seed21", "small_i2t2i_seed22"],
    "t2i2t": ["a-red-cube_t2i2t_seed21", "an-elephant-under-the-sea_t2i2t_seed22"],
}


def strict_json(path: Path):
    def no_constant(name):
        raise ValueError(f"{path}: non-strict JSON constant {name}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("task", TASKS)
def test_api_task_outputs_seeds_and_files(pipe, images, tmp_path, task):
    t = TASKS[task]
    photos = [images["big.png"], images["small.png"]]
    inputs = {"prompt": PROMPTS, "image": photos, None: None}[t.input]
    n = 2 if t.input is None else 1
    common = dict(steps=2, height=32, width=32)
    out = pipe.generate(task, inputs, seed=21, n=n, batch=2, **common)

    assert out.task == task and out.seeds == [21, 22]
    makes_images, makes_texts = "image" in t.outputs, "text" in t.outputs
    assert len(out.images) == (2 if makes_images else 0) and len(out.texts) == (2 if makes_texts else 0)
    for img in out.images:
        assert isinstance(img, Image.Image) and img.size == (32, 32) and img.mode == "RGB"
    if makes_images:
        assert not np.array_equal(np.array(out.images[0]), np.array(out.images[1]))
    assert all(isinstance(s, str) for s in out.texts)
    records = {"prompt": PROMPTS, None: [None, None], "image": [
        {"name": "big.png", "sha256": sha256(photos[0]), "size": [71, 50]},
        {"name": "small.png", "sha256": sha256(photos[1]), "size": [20, 24], "upscaled": True}]}[t.input]
    assert out.inputs == records
    assert out.prompts == (PROMPTS if t.input == "prompt" else [None, None])
    stages = {"encode_s", "sample_s"} | ({"decode_s"} if makes_images else set()) | ({"caption_s"} if makes_texts else set())
    assert stages | {"total_s"} == set(out.timings)

    # The second sample alone, by its seed: the same outputs as in the batch of two. The image
    # encoders' convolutions round differently at another batch size (~5e-7), which guidance
    # amplifies (x7 per run, random weights): an image made from an image may be 1 level off.
    alone = pipe.generate(task, None if inputs is None else inputs[1], seed=22, **common)
    assert alone.seeds == [22] and alone.inputs == records[1:]
    if makes_images:
        diff = np.abs(np.array(alone.images[0], dtype=int) - np.array(out.images[1], dtype=int))
        assert diff.max() <= (1 if t.input == "image" else 0), diff.max()
    assert alone.texts == out.texts[1:]

    paths = out.save(tmp_path)
    suffixes = [{"image": ".png", "text": ".txt"}[o] for o in t.outputs]
    assert [p.name for p in paths] == [stem + sfx for stem in STEMS[task] for sfx in suffixes]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [stem + sfx for stem in STEMS[task] for sfx in suffixes + [".json"]])
    for i, stem in enumerate(STEMS[task]):
        side = strict_json(tmp_path / f"{stem}.json")
        assert side["task"] == task and side["seed"] == 21 + i
        assert {"prompt", "image"} & set(side) == ({t.input} if t.input else set())
        if t.input:
            assert side[t.input] == records[i]
        assert side["steps"] == 2 and side["scale"] == 7.0 and side["height"] == 32 and side["width"] == 32
        assert side["batch"] == 2 and side["backend"] == "torch" and side["dtype"] == "fp32"
        assert side["device"] == "cpu" and side["random_weights"] is True and side["weights_dtype"] == "fp32"
        assert set(side["time_per_stage_s"]) == stages
        if makes_images:
            png = tmp_path / f"{stem}.png"
            assert side["png_sha256"] == sha256(png)
            assert np.array_equal(np.array(Image.open(png)), np.array(out.images[i]))
        else:
            assert "png_sha256" not in side
        if makes_texts:
            txt = tmp_path / f"{stem}.txt"
            assert side["text"] == out.texts[i] and side["txt_sha256"] == sha256(txt)
            assert txt.read_text(encoding="utf-8") == out.texts[i] + "\n"
        else:
            assert "text" not in side and "txt_sha256" not in side

    # Nothing is replaced without overwrite, not even the files of the other sample.
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="not replaced without --overwrite"):
        out.save(tmp_path)
    with pytest.raises(FileExistsError):
        alone.save(tmp_path)
    assert snapshot(tmp_path) == before
    assert [p.name for p in alone.save(tmp_path, overwrite=True)] == [STEMS[task][1] + sfx for sfx in suffixes]
    after = snapshot(tmp_path)
    assert all(after[k] == v for k, v in before.items() if k.startswith(STEMS[task][0] + "."))   # the first sample's
    side = strict_json(tmp_path / f"{STEMS[task][1]}.json")
    assert side["batch"] == 1 and side["seed"] == 22
    if makes_images:
        assert side["png_sha256"] == sha256(tmp_path / f"{STEMS[task][1]}.png")
        assert np.array_equal(np.array(Image.open(tmp_path / f"{STEMS[task][1]}.png")), np.array(alone.images[0]))


def test_api_image_inputs_of_every_kind(pipe, images):
    """A PIL image is read as its RGB pixels (named "image"); an animation is its first frame; the
    converted kinds run, and a smaller image is upscaled (the record says so)."""
    common = dict(seed=3, steps=1, height=32, width=32)
    gif = pipe.vary(images["anim.gif"], **common)
    first = pipe.vary(images["first_frame.png"], **common)
    pil = pipe.vary(Image.open(images["first_frame.png"]), **common)
    assert np.array_equal(np.array(gif.images[0]), np.array(first.images[0]))
    assert np.array_equal(np.array(pil.images[0]), np.array(first.images[0]))
    rgb = Image.open(images["first_frame.png"]).convert("RGB")
    assert pil.inputs == [{"name": "image", "sha256": hashlib.sha256(rgb.tobytes()).hexdigest(), "size": [36, 40]}]
    kinds = ["grey16.png", "palette.png", "rgba.png", "cmyk.jpg", "small.png"]
    out = pipe.vary([images[k] for k in kinds], batch=len(kinds), **common)
    assert len(out.images) == len(kinds) and [r["name"] for r in out.inputs] == kinds
    assert [r.get("upscaled", False) for r in out.inputs] == [False] * 4 + [True]
    assert pipe.vary(images["big.png"], seed=3, steps=1, height=64, width=64).inputs[0]["upscaled"] is True


@pytest.mark.parametrize("task, inputs, error, message", [
    ("joint", "a prompt", ValueError, "inputs: this task takes no input, got 'a prompt'"),
    ("t", ["x"], ValueError, "inputs: this task takes no input"),
    ("t2i", Image.new("RGB", (8, 8)), TypeError, "prompt must be a string or a non-empty list of strings"),
    ("t2i2t", None, TypeError, "prompt must be a string"),
    ("i2t", None, TypeError, "image must be a file path or a PIL image, got NoneType"),
    ("i2t2i", [], TypeError, "image must be an image or a non-empty list"),
    ("i2t", 5, TypeError, "image must be a file path or a PIL image, got int"),
    ("nope", None, ValueError, "task must be one of t2i, i2t, joint, i, t, i2t2i, t2i2t, got 'nope'"),
])
def test_api_wrong_inputs_for_the_task(pipe, monkeypatch, task, inputs, error, message):
    """A wrong input is refused before any work; a wrong type is a TypeError that is also a ValueError."""
    monkeypatch.setattr(pipe.pipeline, "encode", lambda *a: pytest.fail("the pipeline ran"))
    with pytest.raises(error, match=message) as e:
        pipe.generate(task, inputs, steps=1, height=32, width=32)
    assert isinstance(e.value, ValueError)


def test_api_trtllm_backend_runs_text_to_image_only(pipe, images, monkeypatch):
    monkeypatch.setattr(pipe, "backend", "trtllm")
    monkeypatch.setattr(pipe.pipeline, "encode", lambda *a: pytest.fail("the pipeline ran"))
    with pytest.raises(ValueError, match="backend trtllm runs text-to-image only.*task i2t needs backend torch"):
        pipe.caption(images["big.png"])


# -- a model folder converted before the image and caption networks ---------------------------

@pytest.fixture(scope="module")
def old_model(model, tmp_path_factory):
    return copy_without_task_networks(model, tmp_path_factory.mktemp("old") / "model")


@pytest.fixture(scope="module")
def old_pipe(old_model):
    return UniDiffuser.load(old_model, device="cpu")


def test_old_model_folder_runs_t2i(old_pipe):
    out = old_pipe("a red cube", seed=1, steps=1, height=32, width=32)
    assert len(out.images) == 1 and out.images[0].size == (32, 32)


@pytest.mark.parametrize("task, missing", [("i2t", "vae_encoder"), ("i2t2i", "vae_encoder"), ("t", "caption_decoder"),
                                           ("joint", "caption_decoder"), ("t2i2t", "caption_decoder")])
def test_old_model_folder_names_what_to_rerun(old_pipe, images, monkeypatch, task, missing):
    """Another task than text-to-image says, before any work, which network is missing and what
    to re-run (a task that captions only at the end must not sample first)."""
    p = old_pipe.pipeline
    monkeypatch.setattr(p, "encode", lambda *a: pytest.fail("encoded before refusing"))
    monkeypatch.setattr(p, "sample", lambda *a, **k: pytest.fail("sampled before refusing"))
    inputs = {"prompt": "a red cube", "image": images["big.png"], None: None}[TASKS[task].input]
    with pytest.raises(ValueError, match=f"has no {missing}.safetensors.*re-run convert_weights.py") as e:
        old_pipe.generate(task, inputs, steps=1, height=32, width=32)
    assert "\n" not in str(e.value)
