"""The --json report: written as the run goes (a partial file beside --json), read back by
--from-json, printed as the table. No torch here: --from-json needs none."""
from __future__ import annotations

import contextlib
import io
import json
import statistics
from pathlib import Path

from ..limits import InputError

TABLE_KEYS = ("device", "dtype", "size", "steps", "components", "end_to_end", "accuracy")


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))


def partial_path(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.json")


def save_partial(path: Path | None, report: dict) -> None:
    """What is measured so far, beside --json (never over it), so that a run stopped by a time limit keeps it."""
    if path is not None:
        write_json(partial_path(path), {**report, "partial": True})


def load_report(path: Path) -> dict:
    """A --json run as main() built it (JSON made the batch-size keys strings), or InputError
    naming --from-json for a file that is missing, not JSON, or not a bench.py report."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError("from_json", "{from_json} {0}: cannot read it as JSON ({1})", str(path),
                         getattr(e, "strerror", None) or e) from None
    if not isinstance(report, dict) or not ("cold_start" in report or "tasks" in report
                                            or all(k in report for k in TABLE_KEYS)):
        what = "a --cfg-parallel run" if isinstance(report, dict) and report.get("mode") == "cfg_parallel" else \
            "not a bench.py report"
        raise InputError("from_json", "{from_json} {0}: {1} (it reprints what bench.py --json wrote, or a "
                         "--cold-start-only run)", str(path), what)
    by_batch = [report.get("components", {}), report.get("end_to_end", {})]
    if isinstance(report.get("isolated"), dict):
        by_batch += [res["end_to_end"] for res in report["isolated"].values()]
    for paths in report.get("tasks", {}).values():
        by_batch += [d for res in paths.values() for d in (res.get("runs", {}), res.get("caption_decoder_ms", {}))]
    for d in by_batch:
        for k in [k for k in d if k.isdigit()]:
            d[int(k)] = d.pop(k)
    return report


def reprint(path: Path, chart_path: Path | None = None) -> int:
    """--from-json: the saved run's table (and its chart), measuring nothing."""
    report = load_report(path)
    if "dtype" not in report:   # a --cold-start-only run
        text = rendered(path, print_cold_start, report.get("cold_start"))
        print(text, end="")
        return 0
    if report.get("mode") == "tasks":
        if chart_path is not None:
            raise InputError("chart", "{chart}: a --tasks run has no chart (its table is all it prints)")
        print(rendered(path, print_tasks_report, report), end="")
        return 0
    print(rendered(path, print_table, report), end="")
    if chart_path is not None:
        from .chart import chart
        chart(report, chart_path)
    return 0


def rendered(path: Path, fn, *args) -> str:
    """fn's printed text, or InputError naming --from-json if the report lacks what fn reads."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            fn(*args)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise InputError("from_json", "{from_json} {0}: not a complete bench.py report ({1}: {2})", str(path),
                         type(e).__name__, e) from None
    return out.getvalue()


# -- the table ----------------------------------------------------------------------------------

def print_table(report: dict) -> None:
    dt = report["dtype"]
    print(f"\n## {report['device']} — random v1-shape weights, {report['size']}x{report['size']}, {report['steps']} steps "
          f"(medians, ms; speed-up vs fp32)")
    print_components(report["components"], dt)
    print_end_to_end(report["end_to_end"], dt)
    print_isolated(report.get("isolated", {}), dt)
    print_accuracy(report["accuracy"], dt)
    print_profiles(report, dt)
    print_fp8_scales(report.get("fp8_scales"))
    if "copy_GBps" in report:
        print(f"device copy bandwidth {report['copy_GBps']:.0f} GB/s")
    print_cold_start(report.get("cold_start"))


def print_components(components: dict, dt: str) -> None:
    print(f"{'component':<26}{'B':>3}{'fp32':>10}{dt:>10}{'speed-up':>10}")
    for B, r in components.items():
        for name in ("text_encoder", "uvit_cfg", "decoder"):
            a, b = r[f"{name}_fp32_ms"], r[f"{name}_{dt}_ms"]
            print(f"{name:<26}{B:>3}{a:>10.2f}{b:>10.2f}{a / b:>9.1f}x")
        for key, label in ((f"uvit_cfg_{dt}_unfused_ms", f"uvit_cfg ({dt}, unfused)"), ("uvit_cfg_fp8_ms", "uvit_cfg (fp8)")):
            if key in r:
                print(f"{label:<26}{B:>3}{'':>10}{r[key]:>10.2f}")
        if f"uvit_cfg_{dt}_compiled_ms" in r:
            print(f"{'uvit_cfg (compiled)':<26}{B:>3}{'':>10}{r[f'uvit_cfg_{dt}_compiled_ms']:>10.2f}"
                  f"   compile {r['compile_s']:.0f} s")


def print_end_to_end(e2e: dict, dt: str) -> None:
    print(f"\n{'end to end (ms)':<16}{'B':>3}{'fp32':>9}{dt:>9}{'fp8':>9}{dt + ' img/s':>11}{'fp8 img/s':>10}")
    nan = float("nan")
    for B, r in e2e.items():
        print(f"{'in this process':<16}{B:>3}{r.get('fp32_ms', nan):>9.0f}{r[f'{dt}_ms']:>9.1f}{r.get('fp8_ms', nan):>9.1f}"
              f"{r[f'{dt}_img_per_s']:>11.2f}{r.get('fp8_img_per_s', nan):>10.2f}")
        if f"{dt}_compiled_ms" in r:
            print(f"{'  compiled':<16}{B:>3}{'':>9}{r[f'{dt}_compiled_ms']:>9.1f}")
        if f"diffusers_inproc_{dt}_ms" in r:
            print(f"{'  diffusers':<16}{B:>3}  {r[f'diffusers_inproc_{dt}_ms']:.0f} ms in this process")


def print_isolated(iso: dict, dt: str) -> None:
    if not iso:
        return
    print("\nend to end, each path alone in a fresh process (ms per batch; peak = that path's own peak allocated MiB)")
    ours = iso.get(f"ours-{dt}", {}).get("end_to_end", {})
    for mode, res in iso.items():
        extra = f"   first call {res['end_to_end'][next(iter(res['end_to_end']))]['first_call_s']:.0f} s" \
            if mode == "diffusers-compiled" else ""
        cells = []
        for B, e in res["end_to_end"].items():
            vs = f", {e['ms'] / ours[B]['ms']:.1f}x ours" if mode.startswith("diffusers") and B in ours else ""
            cells.append(f"B={B} {e['ms']:.1f} ({e['img_per_s']:.2f} img/s, peak {e['peak_MiB']:.0f}{vs})")
        print(f"  {mode:<20}" + "; ".join(cells) + extra)


def print_accuracy(accuracy: dict, dt: str) -> None:
    print(f"\naccuracy of {dt} vs fp32 (abs: max/mean/median; rel: max/mean/median; rel L2)")
    for name, e in accuracy.items():
        if "abs" in e:
            a, r_ = e["abs"], e["rel"]
            print(f"  {name:<20} abs {a['max']:.2e}/{a['mean']:.2e}/{a['median']:.2e}  "
                  f"rel {r_['max']:.2e}/{r_['mean']:.2e}/{r_['median']:.2e}  L2 {e['rel_l2']:.2e}")
        else:
            print(f"  {name:<20} max {e['max']} levels, mean {e['mean']:.3f} levels")


def print_profiles(report: dict, dt: str) -> None:
    for key, label in (("profile_uvit", dt), ("profile_uvit_fp8", "fp8")):
        if key in report:
            p = report[key]
            print(f"\n{label} UViT call, B=1 (eager kernel time {p['total_ms']:.2f} ms): " +
                  ", ".join(f"{k} {v['ms']:.2f} ms ({100 * v['share']:.0f}%)" for k, v in p.items() if isinstance(v, dict)))


def print_fp8_scales(sc: dict | None) -> None:
    if sc is None:
        return
    for kind in ("qkv", "proj", "fc1", "fc2", "skip_linear"):
        rows = [v for k, v in sc.items() if k.endswith(kind)]
        if rows:
            print(f"fp8 {kind:<12} weight scale {min(r['w_scale_min'] for r in rows):.2e}.."
                  f"{max(r['w_scale_max'] for r in rows):.2e} (median of medians "
                  f"{statistics.median(r['w_scale_median'] for r in rows):.2e}), "
                  f"activation amax {min(r['act_amax'] for r in rows):.1f}..{max(r['act_amax'] for r in rows):.1f}")


def print_cold_start(cold: dict | None) -> None:
    if not cold:
        return
    print(f"\ncold start: process start -> first PNG on disk ({cold['size']}x{cold['size']}, {cold['steps']} steps, "
          f"page cache warm)")
    for who in ("ours", "diffusers"):
        for i, r in enumerate(cold.get(who, [])):
            parts = ", ".join(f"{k[:-2]} {r[k]:.2f}" for k in ("imports_s", "load_s", "encode_s", "capture_s", "sample_s",
                                                               "decode_s") if k in r)
            print(f"  {who:<10} run {i + 1}: {r['to_png_s']:.2f} s" + (f"  ({parts})" if parts else ""))


# -- the tasks table (bench.py --tasks) ------------------------------------------------------------

SPLIT = (("encode_s", "encode"), ("sample_s", "sample"), ("caption_s", "caption"), ("decode_s", "decode"),
         ("save_s", "save"))


def print_tasks_report(report: dict) -> None:
    where = "each (path, task) alone in a fresh process" if report["isolated"] else "all in this process"
    side = report["size"]
    print(f"\n## tasks — {report['device']}, random {report['preset']}-shape weights, {side}x{side}, "
          f"{report['steps']} steps, guidance {report['guidance']:g}")
    print(f"ours {report['dtype']} (the Python API) against diffusers' UniDiffuserPipeline in the same mode, {where}; "
          f"a call is input file -> outputs on disk; seconds, medians of the timed calls")
    if report["device"] == "cpu":
        print("(CPU: a smoke test of the code paths; its times mean nothing)")
    print(f"{'task':<7}{'B':>3}{'ours s':>9}" + "".join(f"{label:>9}" for _, label in SPLIT)
          + f"{'diffusers s':>13}{'speed-up':>10}")
    for task, paths in report["tasks"].items():
        print_task_rows(task, paths.get("ours"), paths.get("diffusers"))
    for task, paths in report["tasks"].items():
        alone = (paths.get("ours") or {}).get("caption_decoder_ms")
        if alone:
            tokens, how = next(iter(alone.values()))["tokens"], "eager" if report["device"] == "cpu" else "CUDA graph"
            print(f"caption decoder alone (GPT-2, beam 5, {tokens} tokens, no early stop, {report['dtype']}, {how}; "
                  f"ms, median): "
                  + "; ".join(f"B={B} {r['ms']:.1f}" for B, r in alone.items()))


def print_task_rows(task: str, ours: dict | None, peer: dict | None) -> None:
    """One row per batch size either path ran; a path that failed or did not run shows "-"."""
    batches = dict.fromkeys([*(ours or {}).get("runs", {}), *(peer or {}).get("runs", {})])
    for B in batches:
        o = (ours or {}).get("runs", {}).get(B)
        d = (peer or {}).get("runs", {}).get(B)
        cells = [f"{o['s']:>9.3f}" if o else f"{'-':>9}"]
        for key, _ in SPLIT:
            v = o["stages_s"].get(key) if o else None
            cells.append(f"{v:>9.3f}" if v is not None else f"{'-':>9}")
        cells.append(f"{d['s']:>13.3f}" if d else f"{'-':>13}")
        cells.append(f"{d['s'] / o['s']:>9.1f}x" if o and d else f"{'-':>10}")
        print(f"{task:<7}{B:>3}" + "".join(cells))
