"""The benchmark behind `bench.py` (its --help says what it measures), one concern per module:

    args         the command line and its checks (no torch: a bad flag answers at once)
    timing       CUDA-event / wall-clock medians, CUDA-graph replay, peak memory, the CPU smoke policy
    nets         the random networks, the fast-path copies, the tokenizer, the benchmark's requests
    fusions      the fast path with its fusions off, through the backend's own switches
    accuracy     error statistics, uint8 levels, the final image from the pipeline's own stages
    components   per network: text encoder, one CFG-batched UViT call, VAE decoder
    end_to_end   whole requests in this process (and diffusers in it, for diagnosis)
    profiling    the fp16/fp8 UViT call's kernel-time split, the fp8 scales
    peers        diffusers' UniDiffuserPipeline at the same shapes
    isolated     each path alone in a fresh `bench.py --isolated MODE` process
    task_calls   one call of a task per path, input file -> outputs on disk (ours: the Python API)
    task_runs    --tasks: every task, ours against diffusers, each (path, task) in a fresh process
    cold_start   process start -> first PNG, run.py and diffusers as subprocesses
    cfg_parallel one GPU against a CFG pair of two, under torchrun
    report       the --json report: writing, reading back (--from-json), the printed table
    chart        the PNG chart (matplotlib)
    main         the run, in order

`args`, `report` and `chart` import no torch, so that argument errors and --from-json need none.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the checkout: bench.py, run.py, convert_weights.py
PROMPT = "a photo of object number {} on a table"   # image i of a benchmark batch
