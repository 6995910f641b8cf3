"""What a user waits for: process start -> first PNG on disk, page cache warm (each folder is read
once before timing). Ours: `run.py` on a converted folder. diffusers: from_pretrained of a folder
written with save_pretrained (the same random weights' shapes), then its first image."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import ROOT

COLD_PROMPT = "an elephant under the sea"
RUNS = 3

DIFFUSERS_COLD = """
import sys, torch
from diffusers import UniDiffuserPipeline
folder, device, dtype, steps, size, out = sys.argv[1:7]
pipe = UniDiffuserPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype), text_tokenizer=None).to(device)
pipe.set_progress_bar_config(disable=True)
pipe.set_text_to_image_mode()
image = pipe(prompt=sys.argv[7], num_inference_steps=int(steps), guidance_scale=7.0, height=int(size), width=int(size),
             generator=torch.Generator(device).manual_seed(1234)).images[0]
image.save(out)
"""


def cold_start(args, cfg) -> dict:
    """In --cold-start-dir (kept, reused), else in a temporary folder removed afterwards."""
    if args.cold_start_dir is not None:      # its model folders are kept; the runs' files are not
        args.cold_start_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="runs-", dir=args.cold_start_dir) as scratch:
            return _cold_start(args, cfg, args.cold_start_dir, Path(scratch))
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as work:
        return _cold_start(args, cfg, Path(work), Path(work))


def _cold_start(args, cfg, work: Path, scratch: Path) -> dict:
    """Model folders in work (reused when there), everything else in scratch (the caller's)."""
    model = ours_folder(args.preset, work, scratch)
    report = {"prompt": COLD_PROMPT, "steps": args.steps, "size": args.size, "device": args.device, "ours": [],
              "diffusers": []}
    warm_cache(model)
    report["ours"] = [ours_run(args, model, scratch / f"out-ours-{run}", run) for run in range(RUNS)]
    if args.no_diffusers:
        return report
    try:
        torch_dtype = {"fp16": "float16", "bf16": "bfloat16"}[args.dtype] if args.device != "cpu" else "float32"
        folder = diffusers_folder(cfg, args.preset, torch_dtype, work)
        warm_cache(folder)
        script = scratch / "diffusers_cold.py"
        script.write_text(DIFFUSERS_COLD)
        for run in range(RUNS):
            out = scratch / f"out-diffusers-{run}"
            cmd = [sys.executable, str(script), str(folder), args.device, torch_dtype, str(args.steps), str(args.size),
                   str(out / "image.png"), COLD_PROMPT]
            png, done, _ = first_png(cmd, out)
            report["diffusers"].append({"to_png_s": png, "to_exit_s": done})
            print(f"cold start, diffusers run {run + 1}: first PNG at {png:.2f} s", flush=True)
    except (ImportError, RuntimeError, OSError) as e:   # the peer failing must not lose our numbers
        print(f"cold start, diffusers not measured: {type(e).__name__}: {e}", flush=True)
    return report


def ours_folder(preset: str, work: Path, scratch: Path) -> Path:
    """A converted random model folder of the preset in work, written once (convert_weights.py --random)."""
    model = work / f"model-{preset}"
    if not (model / "manifest.json").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), "--random", preset, "--src",
                        str(scratch / f"src-{preset}"), "--out", str(model)], check=True, cwd=ROOT)
        print(f"cold start: wrote {model} in {time.perf_counter() - t:.0f} s", flush=True)
    return model


def diffusers_folder(cfg, preset: str, torch_dtype: str, work: Path) -> Path:
    """diffusers' pipeline saved with save_pretrained in work, written once."""
    import torch

    from .peers import diffusers_pipeline
    folder = work / f"diffusers-{preset}-{torch_dtype}"
    if not (folder / "model_index.json").is_file():
        pipe = diffusers_pipeline(cfg, "cpu", getattr(torch, torch_dtype))
        # GPT-2's tied lm_head/wte cannot be saved as safetensors; the tiny decoder is unused
        head = pipe.text_decoder.transformer.lm_head
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        pipe.save_pretrained(str(folder))
    return folder


def ours_run(args, model: Path, out: Path, run: int) -> dict:
    """One run.py process: seconds to its first PNG and to its exit, with its own split."""
    ours_dtype = args.dtype if args.device != "cpu" else "fp32"
    cmd = [sys.executable, str(ROOT / "run.py"), "--model-dir", str(model), "--prompt", COLD_PROMPT, "--out", str(out),
           "--device", args.device, "--dtype", ours_dtype, "--steps", str(args.steps),
           "--height", str(args.size), "--width", str(args.size)]
    png, done, log = first_png(cmd, out)
    r = {"to_png_s": png, "to_exit_s": done}
    m = re.search(r"loaded in ([\d.]+) s \(imports ([\d.]+) s\)", log)
    if m:
        r["load_s"], r["imports_s"] = float(m.group(1)), float(m.group(2))
    sidecar = next(out.glob("*.json"), None)
    if sidecar is not None:
        r.update(json.loads(sidecar.read_text())["time_per_stage_s"])
    print(f"cold start, ours run {run + 1}: first PNG at {png:.2f} s ("
          + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k != "to_png_s") + ")", flush=True)
    return r


def warm_cache(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def first_png(cmd, out: Path) -> tuple[float, float, str]:
    """Seconds from before Popen to the first PNG in out, and to the process's exit."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    png = None
    while png is None and proc.poll() is None:
        png = next((time.perf_counter() - t0 for f in out.glob("*.png") if not f.name.startswith(".")), None)
        time.sleep(0.005)
    log = proc.communicate()[0]
    done = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed ({proc.returncode}):\n{log[-2000:]}")
    if png is None:
        png = next((done for f in out.glob("*.png")), None)
    return png, done, log
