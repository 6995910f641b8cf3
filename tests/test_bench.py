"""bench.py: its argument checks (one line naming the flag, exit 2, before torch is imported),
the documented CPU smoke test, the reprint of the run of record, the cold start on the CPU, and
the parts of unidiffuser/bench/ that the GPU run relies on but a CPU run would not reach."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import child_env

from models.config import PRESETS
from unidiffuser import networks, pipeline
from unidiffuser.backends.torch_backend import TorchBackend, make_fast, set_decoder_fusions, set_uvit_fusions
from unidiffuser.bench import accuracy, components, fusions, nets, peers, task_runs, timing
from unidiffuser.bench.args import parse_args
from unidiffuser.bench.child import run_child
from unidiffuser.bench.cold_start import RUNS
from unidiffuser.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "tiny", "--device", "cpu", "--batch-sizes", "1", "--repeats", "1", "--steps", "3"]   # its --help's
TASKS_SMOKE = ["--tasks", "--preset", "tiny", "--device", "cpu", "--batch-sizes", "1", "--repeats", "1", "--steps", "2"]


def bench(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=child_env(), timeout=timeout)


# -- the run of record, reprinted --------------------------------------------------------------

RUN_OF_RECORD = """
## NVIDIA H200 — random v1-shape weights, 512x512, 50 steps (medians, ms; speed-up vs fp32)
component                   B      fp32      fp16  speed-up
text_encoder                1      5.01      0.70      7.2x
uvit_cfg                    1    122.01      9.18     13.3x
decoder                     1     98.48      7.65     12.9x
uvit_cfg (fp16, unfused)    1                9.65
uvit_cfg (fp8)              1                7.52
text_encoder                8      5.01      0.84      5.9x
uvit_cfg                    8    817.22     67.29     12.1x
decoder                     8    687.55     57.06     12.0x
uvit_cfg (fp16, unfused)    8               70.45
uvit_cfg (fp8)              8               50.59

end to end (ms)   B     fp32     fp16      fp8 fp16 img/s fp8 img/s
in this process   1      nan    479.6    395.0       2.09      2.53
in this process   8      nan   3489.3   2606.7       2.29      3.07

end to end, each path alone in a fresh process (ms per batch; peak = that path's own peak allocated MiB)
  ours-fp16           B=1 478.0 (2.09 img/s, peak 4395); B=8 3505.3 (2.28 img/s, peak 4927)
  ours-fp8            B=1 390.7 (2.56 img/s, peak 4395); B=8 2637.4 (3.03 img/s, peak 4395)
  diffusers           B=1 1529.2 (0.65 img/s, peak 2871, 3.2x ours)
  diffusers-compiled  B=1 827.6 (1.21 img/s, peak 2871, 1.7x ours)   first call 41 s

accuracy of fp16 vs fp32 (abs: max/mean/median; rel: max/mean/median; rel L2)
  text_encoder         abs 4.97e-03/1.10e-03/9.28e-04  rel 4.43e-01/5.76e-03/1.45e-03  L2 1.39e-03
  uvit                 abs 4.99e-03/1.05e-03/9.06e-04  rel 7.57e-01/4.60e-03/1.24e-03  L2 1.21e-03
  decoder              abs 5.44e-03/7.21e-04/5.90e-04  rel 1.13e+00/4.90e-03/1.48e-03  L2 1.51e-03
  uvit_fp8             abs 3.01e-01/6.11e-02/5.24e-02  rel 3.14e+01/2.73e-01/7.18e-02  L2 7.06e-02
  image_[-1,1]         abs 1.36e-02/1.86e-03/1.53e-03  rel 2.49e+00/1.24e-02/3.70e-03  L2 3.77e-03
  image_uint8_levels   max 2 levels, mean 0.208 levels
  image_fp8_[-1,1]     abs 8.23e-01/9.19e-02/7.58e-02  rel 1.10e+02/6.07e-01/1.84e-01  L2 1.86e-01
  image_fp8_uint8_levels max 83 levels, mean 10.318 levels

fp16 UViT call, B=1 (eager kernel time 8.48 ms): gemm 6.17 ms (73%), attention 1.63 ms (19%), layernorm 0.53 ms (6%), elementwise/other 0.15 ms (2%)

fp8 UViT call, B=1 (eager kernel time 7.31 ms): gemm 3.62 ms (50%), attention 1.60 ms (22%), layernorm 0.54 ms (7%), fp8 quantize 1.38 ms (19%), elementwise/other 0.17 ms (2%)
fp8 qkv          weight scale 1.53e-04..3.43e-04 (median of medians 2.00e-04), activation amax 3.8..6.8
fp8 proj         weight scale 1.51e-04..3.32e-04 (median of medians 2.00e-04), activation amax 2.0..4.0
fp8 fc1          weight scale 1.49e-04..3.62e-04 (median of medians 2.00e-04), activation amax 3.6..6.7
fp8 fc2          weight scale 8.78e-05..1.68e-04 (median of medians 1.10e-04), activation amax 3.7..6.1
fp8 skip_linear  weight scale 1.20e-04..2.23e-04 (median of medians 1.49e-04), activation amax 4.0..6.2
device copy bandwidth 3921 GB/s

cold start: process start -> first PNG on disk (512x512, 50 steps, page cache warm)
  ours       run 1: 7.40 s  (imports 3.46, load 2.86, encode 0.10, capture 0.24, sample 0.49, decode 0.17)
  ours       run 2: 5.36 s  (imports 3.39, load 1.08, encode 0.06, capture 0.17, sample 0.47, decode 0.14)
  diffusers  run 1: 15.73 s
  diffusers  run 2: 16.02 s
"""


# The chart needs matplotlib, a dev requirement only (not in the TensorRT-LLM image's pin set).
CHART = importlib.util.find_spec("matplotlib") is not None


def chart_args(path) -> list:
    return ["--chart", path] if CHART else []


def test_bench_reprints_the_run_of_record_identically(tmp_path):
    """--from-json docs/bench-h200.json prints the committed run's table exactly as the run did
    (and draws its chart where matplotlib is installed), without torch."""
    r = bench("--from-json", ROOT / "docs" / "bench-h200.json", *chart_args(tmp_path / "chart.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == RUN_OF_RECORD
    assert not CHART or (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cold_start_times_both_commands_on_cpu(tmp_path):
    """bench.py --cold-start-only: process start -> first PNG, ours (run.py) and diffusers
    (from_pretrained of a saved folder), each RUNS times, with our split; its folder is reused."""
    pytest.importorskip("diffusers", reason="diffusers (the benchmark peer) is not installed")
    out = tmp_path / "cold.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--preset", "tiny", "--device", "cpu", "--steps", "2",
                        "--size", "128", "--cold-start-only", "--cold-start-dir", tmp_path / "work", "--json", out],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cold = json.loads(out.read_text())["cold_start"]
    assert len(cold["ours"]) == RUNS and len(cold["diffusers"]) == RUNS
    for run in cold["ours"]:
        assert 0 < run["imports_s"] < run["to_png_s"] <= run["to_exit_s"] and run["load_s"] > 0
    assert all(run["to_png_s"] > 0 for run in cold["diffusers"])


def test_bench_redraws_the_run_of_record_from_its_json(tmp_path):
    """bench.py --from-json prints the README's run of record again (no GPU): the figures in its
    table are the JSON's, batch sizes and all (JSON made those keys strings)."""
    saved = ROOT / "docs" / "bench-h200.json"
    report = json.loads(saved.read_text())
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--from-json", saved], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    uvit_b8 = report["components"]["8"]["uvit_cfg_fp16_ms"]
    assert "uvit_cfg                    8" in r.stdout and f"{uvit_b8:.2f}" in r.stdout
    fp8_b8 = report["isolated"]["ours-fp8"]["end_to_end"]["8"]["ms"]
    assert f"B=8 {fp8_b8:.1f}" in r.stdout
    best = min(run["to_png_s"] for run in report["cold_start"]["ours"])
    assert f"{best:.2f} s" in r.stdout


def test_bench_reprints_a_cold_start_only_run(tmp_path):
    saved = tmp_path / "cold.json"
    saved.write_text(json.dumps({"argv": [], "cold_start": {
        "prompt": "x", "steps": 50, "size": 512, "device": "cuda",
        "ours": [{"to_png_s": 5.25, "imports_s": 3.0}], "diffusers": [{"to_png_s": 15.5}]}}))
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--from-json", saved], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ours       run 1: 5.25 s  (imports 3.00)" in r.stdout and "diffusers  run 1: 15.50 s" in r.stdout



# -- argument checks: one line naming the flag, exit 2, no torch -------------------------------

PROBE = ("import runpy, sys\n"
         "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
         "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
         "except SystemExit as e:\n    code = e.code\n"
         "print('CODE', code, 'TORCH', 'torch' in sys.modules, file=sys.stderr)\n")


def refused_early(*args):
    """bench.py's answer to args: exit code, its stderr lines (less the probe's), stdout."""
    r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "bench.py"), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, env=child_env(), timeout=120)
    lines = r.stderr.splitlines()
    assert lines and lines[-1] == "CODE 2 TORCH False", r.stderr
    return lines[:-1], r.stdout


def bad_reports(tmp_path) -> dict:
    files = {"not-json": "{ no", "a-list": "[1, 2]", "no-table": json.dumps({"argv": []}),
             "cfg-parallel": json.dumps({"mode": "cfg_parallel", "dtype": "float16", "end_to_end": {}}),
             "tasks-run": json.dumps({"mode": "tasks", "device": "cpu", "preset": "tiny", "dtype": "fp16", "size": 128,
                                      "steps": 2, "guidance": 7.0, "isolated": False, "tasks": {}}),
             "incomplete": json.dumps({"device": "x", "dtype": "fp16", "size": 512, "steps": 50, "accuracy": {},
                                       "components": {"1": {"text_encoder_fp32_ms": 1.0}}, "end_to_end": {}})}
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
    return files


@pytest.mark.parametrize("args, names", [
    (["--device", "cdua"], ["--device", "cpu, cuda or cuda:N", "cdua"]),
    (["--batch-sizes", "0"], ["--batch-sizes", "1..4096", "got 0"]),
    (["--batch-sizes", "1", "2", "1"], ["--batch-sizes", "twice", "1 2 1"]),
    (["--fp32-e2e-batches", "-1"], ["--fp32-e2e-batches", "got -1"]),
    (["--steps", "0"], ["--steps", "1..1000"]),
    (["--steps", "5000"], ["--steps", "got 5000"]),
    (["--size", "100"], ["--size", "multiple of 16", "100"]),
    (["--size", "0"], ["--size", "multiple of 16"]),
    (["--repeats", "0"], ["--repeats", "got 0"]),
    (["--isolated", "ours-fp16", "--device", "cpu"], ["--isolated", "--device cuda"]),
    (["--json", "{tmp}/no/such/folder/b.json"], ["--json", "does not exist", "not created"]),
    (["--chart", "{tmp}/no/such/folder/b.png"], ["--chart", "does not exist"]),
    (["--json", "{tmp}"], ["--json", "is a folder"]),
    (["--cold-start-dir", "{tmp}/not-json.json"], ["--cold-start-dir", "not a folder"]),
    (["--from-json", "{tmp}/missing.json"], ["--from-json", "missing.json", "cannot read"]),
    (["--from-json", "{tmp}/not-json.json"], ["--from-json", "cannot read it as JSON"]),
    (["--from-json", "{tmp}/a-list.json"], ["--from-json", "not a bench.py report"]),
    (["--from-json", "{tmp}/no-table.json"], ["--from-json", "not a bench.py report"]),
    (["--from-json", "{tmp}/cfg-parallel.json"], ["--from-json", "a --cfg-parallel run"]),
    (["--from-json", "{tmp}/incomplete.json"], ["--from-json", "not a complete bench.py report", "KeyError"]),
    (["--from-json", "docs/bench-h200.json", "--chart", "{tmp}/no/c.png"], ["--chart", "does not exist"]),
    (["--from-json", "{tmp}/tasks-run.json", "--chart", "{tmp}/c.png"], ["--chart", "--tasks run has no chart"]),
    (["--tasks", "t2x"], ["--tasks", "i2t2i", "t2x"]),
    (["--tasks", "i2t", "--fp8"], ["--tasks", "--fp8"]),
    (["--tasks", "--cold-start"], ["--tasks", "--cold-start"]),
    (["--isolated-task", "t"], ["--isolated-task", "--isolated ours-fp16 or diffusers"]),
])
def test_bench_refuses_bad_arguments_in_one_line_before_torch(tmp_path, args, names):
    if "--chart" in args and not CHART and "does not exist" not in names:
        pytest.skip("matplotlib is not installed here: --chart is refused for that first")
    bad_reports(tmp_path)
    lines, stdout = refused_early(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for name in names:
        assert name in lines[0], (name, lines)
    assert stdout == ""                        # nothing half-printed, nothing measured
    assert not (tmp_path / "no").exists()      # no folder created for --json / --chart


def test_bench_without_cuda_refuses_device_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = bench("--device", "cuda", "--preset", "tiny", "--json", tmp_path / "b.json")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --device cuda: no CUDA device"), r.stderr
    assert not list(tmp_path.iterdir())


# -- the CPU smoke test ------------------------------------------------------------------------

def test_bench_smoke_test_on_the_cpu_finishes_with_a_sane_report(tmp_path):
    """The smoke test of bench.py's --help: the tiny preset at its own size (128x128), the
    CUDA-only parts skipped, and saying so. How long it takes is measured, not asserted (a busy
    machine is slower): the README gives the figure."""
    r = bench(*SMOKE, "--json", tmp_path / "b.json", *chart_args(tmp_path / "b.png"), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "# CPU: a smoke test of the code paths, not a benchmark. Skipped (CUDA only)" in r.stdout
    report = json.loads((tmp_path / "b.json").read_text())
    assert (report["device"], report["preset"], report["dtype"], report["size"], report["steps"]) == \
        ("cpu", "tiny", "fp16", 128, 3)
    assert report["isolated"] == {} and "cold_start" not in report and "partial" not in report
    comp = report["components"]["1"]
    assert set(comp) == {f"{n}_{t}_ms" for n in ("text_encoder", "uvit_cfg", "decoder") for t in ("fp32", "fp16")}
    assert all(v > 0 for v in comp.values())
    e2e = report["end_to_end"]["1"]
    assert e2e["fp16_ms"] > 0 and e2e["fp32_ms"] > 0 and e2e["fp16_img_per_s"] > 0
    acc = report["accuracy"]
    assert set(acc) == {"text_encoder", "uvit", "decoder", "image_[-1,1]", "image_uint8_levels"}
    for name in ("text_encoder", "uvit", "decoder", "image_[-1,1]"):   # fp16 against fp32: close, not equal
        assert 0 < acc[name]["rel_l2"] < 0.05, (name, acc[name])
    assert acc["image_uint8_levels"]["max"] <= 32 and acc["image_uint8_levels"]["mean"] < 2
    assert not CHART or (tmp_path / "b.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"] + ["b.png"] * CHART   # the partial file is gone
    again = bench("--from-json", tmp_path / "b.json")
    assert again.returncode == 0 and "uvit_cfg                    1" in again.stdout, again.stderr


def test_bench_tasks_smoke_test_on_the_cpu_and_its_reprint(tmp_path):
    """bench.py --tasks on the CPU (its --help's smoke test): every task, ours with its stage split
    and diffusers in the same mode, saying its times mean nothing; then --from-json of its JSON
    reprints the same tasks table."""
    r = bench(*TASKS_SMOKE, "--json", tmp_path / "t.json", timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "# CPU: a smoke test of the code paths, not a benchmark: its times mean nothing" in r.stdout
    report = json.loads((tmp_path / "t.json").read_text())
    assert (report["mode"], report["device"], report["preset"], report["size"], report["steps"]) == \
        ("tasks", "cpu", "tiny", 128, 2)
    assert list(report["tasks"]) == list(TASKS) and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    have_peer = importlib.util.find_spec("diffusers") is not None
    for task, paths in report["tasks"].items():
        ours = paths["ours"]["runs"]["1"]
        stages = {"encode_s", "sample_s", "save_s"} | {"decode_s" for o in TASKS[task].outputs if o == "image"} \
            | {"caption_s" for o in TASKS[task].outputs if o == "text"}
        assert set(ours["stages_s"]) == stages and ours["s"] >= sum(ours["stages_s"].values()) > 0, (task, ours)
        assert ("diffusers" in paths) == have_peer and (not have_peer or paths["diffusers"]["runs"]["1"]["s"] > 0)
    alone = report["tasks"]["i2t"]["ours"]["caption_decoder_ms"]["1"]
    assert alone["ms"] > 0 and alone["tokens"] == 67
    assert "i2t2i    1" in r.stdout and "caption decoder alone" in r.stdout
    again = bench("--from-json", tmp_path / "t.json")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("\n## tasks — cpu") and r.stdout.endswith(again.stdout)


def test_bench_tasks_child_process_reports_its_json_line():
    """The GPU run's way: one (path, task) in a fresh `bench.py --isolated PATH --isolated-task TASK`
    process, its batch sizes those of its task (every task at the first, i2t and joint at each)."""
    args = parse_args(["--tasks", "t", "joint", "--preset", "tiny", "--device", "cpu", "--batch-sizes", "1", "2",
                       "--repeats", "1", "--steps", "2"])
    assert args.tasks == ["t", "joint"] and args.batch_sizes == [1, 2]
    assert task_runs.task_batches("t", args.batch_sizes) == [1] and task_runs.task_batches("joint", [1, 8]) == [1, 8]
    cmd = task_runs.child_command("ours-fp16", "t", args)
    res = run_child(cmd, "ours-fp16 t", timeout=300)
    assert res is not None and (res["path"], res["task"], res["device"]) == ("ours-fp16", "t", "cpu")
    assert list(res["runs"]) == ["1"] and res["runs"]["1"]["repeats"] == 1 and res["process_s"] > res["build_s"]
    assert parse_args(["--tasks"]).batch_sizes == [1, 8] and parse_args([]).batch_sizes == [1, 2, 4, 8]
    assert parse_args(["--tasks"]).tasks == list(TASKS)


@pytest.mark.parametrize("task", list(TASKS))
def test_diffusers_peer_draws_full_size_networks_where_its_task_runs_them(task):
    """v1 shapes for the networks a task runs in diffusers (image encoder: CLIP ViT-B/32 with a
    512 projection; text decoder: GPT-2 124M with <|EOS|>), tiny stand-ins for the others; drawn
    under a default-device context (meta here: shapes only), as on the GPU."""
    pytest.importorskip("diffusers", reason="diffusers (the benchmark peer) is not installed")
    with torch.device("meta"):
        nets_ = peers.networks(PRESETS["v1"], task)
    assert all(p.device.type == "meta" for n in nets_.values() for p in n.parameters())
    vision, gpt = nets_["image_encoder"].config, nets_["text_decoder"].transformer.config
    full_vision = (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size,
                   vision.image_size, vision.projection_dim) == (768, 12, 12, 32, 224, 512)
    full_gpt = (gpt.n_embd, gpt.n_layer, gpt.n_head, gpt.vocab_size) == (768, 12, 12, 50258)
    assert full_vision == (task in ("i2t", "i2t2i", "t2i2t")) and vision.projection_dim == 512
    assert full_gpt == (task in ("i2t", "joint", "t", "i2t2i", "t2i2t"))


def test_diffusers_peer_text_tokenizer_ends_captions_at_the_decoders_eos():
    pytest.importorskip("diffusers", reason="diffusers (the benchmark peer) is not installed")
    tok = peers.gpt2_tokenizer()
    assert tok.eos_token_id == PRESETS["v1"].caption_decoder.eos_token_id == 50257 and len(tok) == 50258


# -- what a CPU run would not reach ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_nets():
    return nets.random_networks(PRESETS["tiny"], torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_final_image_is_the_image_the_pipeline_writes(tiny_nets, dtype):
    """accuracy.final_image runs the pipeline's own stages instead of wrapping its decode: it must
    stay the image pipe(req) converts to uint8."""
    pipe = pipeline.Pipeline(TorchBackend(tiny_nets, torch.device("cpu"), dtype), PRESETS["tiny"], nets.make_tokenizer())
    req = pipeline.Request(["a red cube on a blue sphere", "a cat"], [42, 7], 3, 7.0, 32, 48)
    img = accuracy.final_image(pipe, req)
    assert img.dtype == torch.float32 and img.shape == (2, 3, 32, 48)
    assert torch.equal(pipeline.to_uint8(img), pipe(req).images)


def fusion_flags(uvit):
    from models import fused_norm
    from models.uvit import Mlp, SkipLinear
    return {(type(m).__name__, getattr(m, a)) for m in uvit.modules()
            for t, a in ((Mlp, "fused_gelu"), (fused_norm.LayerNorm, "fused"), (SkipLinear, "split")) if isinstance(m, t)}


def test_uvit_fusions_are_off_inside_and_on_after_even_on_error():
    uvit = networks.build("uvit", PRESETS["tiny"], torch.device("cpu"))
    set_uvit_fusions(uvit, True)
    on = fusion_flags(uvit)
    assert {v for _, v in on} == {True} and {k for k, _ in on} == {"Mlp", "LayerNorm", "SkipLinear"}
    with pytest.raises(RuntimeError):
        with fusions.uvit_fusions_off(uvit):
            assert {v for _, v in fusion_flags(uvit)} == {False}
            raise RuntimeError
    assert fusion_flags(uvit) == on


def test_decoder_without_fusions_is_a_copy_and_leaves_the_live_decoder_alone():
    """The live decoder's weights stay where its captured CUDA graphs read them."""
    from models.vae_decoder import GroupNorm
    dec = networks.build("vae_decoder", PRESETS["tiny"], torch.device("cpu")).eval()
    set_decoder_fusions(dec, True)
    ptrs = [p.data_ptr() for p in dec.parameters()]
    off = fusions.decoder_without_fusions(dec)
    assert [p.data_ptr() for p in dec.parameters()] == ptrs
    convs = [p for p in dec.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p.is_contiguous() for p in off.parameters())
    assert not any(m.fused for m in off.modules() if isinstance(m, GroupNorm))
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(off(z), dec(z))


def test_fast_path_component_variants_run(tiny_nets):
    """The fast path's extra component measurements (fusions off, flash attention, decoder
    without fusions) on the CPU, with the backend taken for a graph-safe one (graphs are a no-op
    here): every key is written and the fusions are on again afterwards."""
    cfg, cpu = PRESETS["tiny"], torch.device("cpu")
    be = TorchBackend(tiny_nets, cpu, torch.float32)
    be.graph_safe = True
    make_fast(be.uvit_net, be.vae_decoder)
    inp = components.Inputs.draw(1, cfg, 4, 4, nets.make_tokenizer(), torch.Generator().manual_seed(1), cpu)
    r = {}
    with torch.no_grad():
        out = components.measure_networks(r, "fp16", be, inp, torch.float32, timing.Clock(cpu, 1))()
    assert list(r) == [f"uvit_cfg_fp16_{k}_ms" for k in ("unfused", "flash_attention")] + \
        ["decoder_fp16_torch_groupnorm_ms", "text_encoder_fp16_ms", "uvit_cfg_fp16_ms", "decoder_fp16_ms"]
    assert {v for _, v in fusion_flags(be.uvit_net)} == {True}
    assert out["uvit"].shape == (2, 4 * 4 * 4 + cfg.uvit.clip_img_dim) and out["decoder"].shape == (1, 3, 32, 32)
