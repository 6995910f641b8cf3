"""The networks of a converted model folder, read once, checked and placed on the device.

Each file is mapped once (or taken from prefetch.py, which run.py starts before torch is
imported); its sha256 is computed from those bytes in a thread (hashlib releases the GIL) while
the tensors are cast and moved, and the state dict must match the network built on the meta
device name for name and shape. Tensors come from safetensors' format read in place (no copy).
"""
from __future__ import annotations

import logging
import math
import mmap
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..limits import CheckpointError, JSONError, few, parse_json
from ..networks import NAMES, NETWORKS, build
from . import prefetch

log = logging.getLogger("unidiffuser")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000    # safetensors' own limit


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, hint: str = "",
                     derived: tuple[str, ...] = ()) -> None:
    """Strict: same names and shapes as the model (less the keys it derives itself, tied
    weights), or a CheckpointError that lists the differences."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in derived}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
                   for k in set(sd) & set(expected) if sd[k].shape != expected[k])

    problems = [f"missing keys: {few(missing, 6)}" if missing else "",
                f"unexpected keys: {few(unexpected, 6)}" if unexpected else "",
                f"wrong shapes: {few(wrong, 6)}" if wrong else ""]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{source}: does not match the {type(model).__name__} layout; "
                              + "; ".join(problems) + (f". {hint}" if hint else ""))


def load_network(model_dir: Path, name: str, cfg, manifest: dict, verify: bool = True
                 ) -> dict[str, torch.Tensor]:
    """One network's state dict from the converted folder, on the CPU as stored, checked against
    the manifest (sha256 of the bytes read unless verify=False, names, shapes)."""
    return _load_checked(Path(model_dir), name, manifest, verify, torch.device("cpu"), None)(build(name, cfg, "meta"))


def load_networks(model_dir: Path, cfg, manifest: dict, device: str | torch.device, dtype: torch.dtype,
                  names: Sequence[str] = NAMES) -> dict[str, nn.Module]:
    """The networks `names`, built without initialisation (on the meta device) and filled with the
    folder's tensors in dtype on device. Each file is read once; its sha256 is computed from those
    bytes in a thread (hashlib releases the GIL) while the tensors are cast and moved."""
    model_dir, device = Path(model_dir), torch.device(device)
    t0 = time.perf_counter()
    nets = {}
    # On the CPU the hash threads and torch's cast threads share few cores: casting on one thread
    # keeps torch's workers from spinning at barriers while a hash holds their core.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        # Largest file first: its hash takes longest and starts earliest.
        order = sorted(names, key=lambda n: -manifest["files"].get(NETWORKS[n].file, {}).get("bytes", 0))
        pending = [(name, _load_checked(model_dir, name, manifest, True, device, dtype)) for name in order]
        for name, finish in pending:
            nets[name] = build(name, cfg, device="meta")
            nets[name].load_state_dict(finish(nets[name]), assign=True)
    finally:
        torch.set_num_threads(threads)
    for name, net in nets.items():
        left = [k for k, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
        if left:   # a buffer outside the state dict that the module did not compute itself
            raise CheckpointError(f"{name}: not filled from {name}.safetensors: {', '.join(left[:6])}")
    size = sum(manifest["files"][NETWORKS[n].file].get("bytes", 0) for n in names) / 1e9
    log.info("loaded %s (%.2f GB, sha256 checked) in %.2f s", ", ".join(names), size, time.perf_counter() - t0)
    return {name: nets[name] for name in names}


def _load_checked(model_dir: Path, name: str, manifest: dict, verify: bool, device: torch.device,
                  dtype: torch.dtype | None) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """Map the file once (or take the mapping run.py started, see prefetch.py) and hash it in a
    thread; the tensors are cast and moved meanwhile. The returned function waits for the hash
    and returns the state dict, checked against the (meta) network it is for."""
    path = model_dir / NETWORKS[name].file
    entry = manifest["files"].get(path.name)
    if entry is None:
        raise CheckpointError(f"{model_dir}/manifest.json: no entry for {path.name}")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (listed in the manifest; re-run convert_weights.py)")
    started = prefetch.take(path)
    data, digest = started if started is not None else (map_file(path), None)
    if verify and digest is None:
        digest = prefetch.sha256_in_thread(data)
    if not verify:
        digest = None
    try:
        stored = tensors_from_bytes(data, str(path))
        check_dtypes(stored, entry.get("dtype") or manifest.get("dtype"), path)
        sd = _cast_all(stored, device, dtype)
    except CheckpointError:
        if digest is not None and digest.result() != entry["sha256"]:
            raise _sha_mismatch(path) from None
        raise

    def finish(net: nn.Module) -> dict[str, torch.Tensor]:
        if digest is not None and digest.result() != entry["sha256"]:
            raise _sha_mismatch(path)
        check_state_dict(net, sd, str(path), derived=NETWORKS[name].derived)
        return sd

    return finish


def check_dtypes(sd: dict[str, torch.Tensor], dtype: str | None, path: Path) -> None:
    """Every tensor in the dtype the manifest declares (convert_weights.py stores them all in it):
    a tensor in another float dtype, or an integer one where a weight belongs, is refused here."""
    want = DTYPES.get(dtype)
    if want is None:
        raise CheckpointError(f"{path}: manifest.json declares no stored dtype of fp32/fp16/bf16 for it "
                              "(re-run convert_weights.py)")
    wrong = [f"{k} ({SAFETENSORS_NAMES.get(t.dtype, t.dtype)})" for k, t in sd.items() if t.dtype != want]
    if wrong:
        raise CheckpointError(f"{path}: tensor {few(sorted(wrong), 3)} not stored as {dtype} "
                              f"({SAFETENSORS_NAMES[want]}), the dtype manifest.json declares; re-run convert_weights.py")


def _sha_mismatch(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: sha256 does not match manifest.json (file changed or corrupt; "
                           f"re-run convert_weights.py)")


def _cast_all(sd: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors in dtype on device. Tensors already in dtype on the CPU stay views of the
    mapped file; on an accelerator the cast runs there (the host may have few cores)."""
    def target(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    if device.type == "cpu":
        return {k: t.to(target(t)) for k, t in sd.items()}
    return {k: t.to(device).to(target(t)) for k, t in sd.items()}


def map_file(path: Path) -> mmap.mmap:
    try:
        mem = prefetch.map_file(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    prefetch.populate(mem)
    return mem


def tensors_from_bytes(data: bytearray, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in memory, as views of it (no copy): safetensors' own
    loaders open the file themselves, and here the hash and the tensors share one read. The format is
    an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
    the raw data; everything the header claims is checked against the buffer before a view is made."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{source}: not a readable safetensors file ({why})")

    if len(data) < 8:
        raise bad("shorter than its header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise bad("header length beyond the end of the file")
    if n > MAX_HEADER_BYTES:
        raise bad(f"header of {n} bytes, more than the {MAX_HEADER_BYTES} safetensors allows")
    try:
        header = parse_json(bytes(data[8:8 + n]), MAX_HEADER_BYTES, what="header")
    except JSONError as e:
        raise bad(str(e)) from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    start, size = 8 + n, len(data) - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if not isinstance(info["shape"], list) or not all(type(d) is int for d in info["shape"] + info["data_offsets"]):
                raise TypeError("shape and data_offsets must be lists of integers")
            shape = info["shape"]
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"entry {name!r} has a bad or unsupported dtype/shape/data_offsets ({e!r})") from None
        numel = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= size or end - begin != numel * dtype.itemsize:
            raise bad(f"entry {name!r}: shape {shape} {info['dtype']} does not fit data_offsets {[begin, end]}")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(data, dtype=dtype, count=numel, offset=start + begin).view(shape)
    return out


