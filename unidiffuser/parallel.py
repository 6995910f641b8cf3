"""The multi-GPU layout: which rank runs which rows of which images, under `torchrun`.

At batch 1 one UViT call is GEMM-bound on one GPU, but its conditional and unconditional rows are
independent until the guidance sum. So ranks are grouped into **CFG pairs**: the first rank of a
pair runs the conditional rows (prompt text, t_text = 0), the second the unconditional rows
(N(0, I) text, t_text = 1000) of the same images; after every model call the pair all-gathers the
two outputs (B x 16.9 K numbers at 512x512), and both ranks take the identical guided solver step.
Several pairs (and solo ranks) split the images data-parallel.

Policy, all decided here:
- pairs are formed from consecutive ranks of the same node, never across nodes (torchrun numbers a node's ranks
  consecutively, so with an even `--nproc-per-node` rank 2k is conditional, 2k+1 unconditional);
  a node with an odd number of ranks runs its last rank **solo**, without CFG parallelism; without
  guidance (`--scale 0`) there is nothing to split and every rank is solo;
- the images, in the order a single process generates them (prompt by prompt, sample by sample),
  are cut into contiguous chunks, one per pair or solo rank (pairs first, each in rank order), in
  proportion to its GPUs: a pair gets twice a solo rank's share, as it runs each image at about
  twice one GPU's speed; boundaries round to nearest, so a lone image goes to a pair;
- each chunk runs in batches of at most `--n-samples` images (the batch a single process uses);
- an image is written once, by the first rank of its pair (or its solo rank), under the name a
  single process gives it.

World size 1 (no torchrun) is the single process: no process group, no exchange.

Use (as run.py does; the Python API the same way):

    layout = parallel.init_from_env("cuda", cfg=scale != 0)     # once per process
    pipe = UniDiffuser.from_options(model_dir, options.resolve(str(layout.device)), cfg_pair=layout.cfg_pair)
    for batch in layout.batches(images, n_samples):              # both ranks of a pair: the same
        out = pipe(...batch...)
        if layout.writer: ...write the batch's images...
    layout.close()
"""
from __future__ import annotations

import datetime
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Hashable, Sequence, TypeVar

import torch
import torch.distributed as dist

from . import lifecycle
from .cli import Quiet

TIMEOUT_ENV = "UNIDIFFUSER_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0     # longer than any rank's model loading or graph capture skew

T = TypeVar("T")


def plan_units(nodes: Sequence[Hashable], cfg: bool = True) -> list[tuple[int, ...]]:
    """Group ranks (nodes[r] = the node of rank r) into CFG pairs (cond, uncond) of consecutive
    ranks on one node, and solo ranks (r,): a node's leftover rank, or every rank without CFG.
    Pairs first, then solo ranks, each by rank: the order in which they take images."""
    units: list[tuple[int, ...]] = []
    for node in dict.fromkeys(nodes):
        ranks = [r for r, n in enumerate(nodes) if n == node]
        step = 2 if cfg else 1
        units += [tuple(ranks[i:i + step]) for i in range(0, len(ranks), step)]
    return sorted(units, key=lambda u: (-len(u), u))


def split(n: int, units: Sequence[tuple[int, ...]]) -> list[range]:
    """Contiguous chunks of range(n), one per unit, in proportion to its GPUs (rounded to nearest)."""
    total, done, bounds = sum(map(len, units)), 0, [0]
    for u in units:
        done += len(u)
        bounds.append((2 * n * done + total) // (2 * total))    # floor(n * done / total + 1/2)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class CfgPair:
    """This rank's half of a CFG pair: which rows it runs (`half`: 0 conditional, 1
    unconditional) and the exchange that gives both ranks all rows, conditional first."""

    def __init__(self, group, half: int, rank: int, partner: int):
        self.group, self.half, self.rank, self.partner = group, half, rank, partner

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """[rows, ...] of this rank -> [2 * rows, ...]: cond rows then uncond rows. One collective;
        graph-safe on NCCL (the pipeline captures it with the UViT call)."""
        full = out.new_empty((2 * out.shape[0], *out.shape[1:]))
        # torch >= 2.13 renames all_gather_into_tensor (same semantics; the old name warns)
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        try:
            all_gather(full, out.contiguous(), group=self.group)
        except RuntimeError as e:    # DistBackendError etc.: the partner died or timed out
            raise RuntimeError(f"rank {self.rank}: exchange with CFG partner rank {self.partner} failed "
                               f"(did it stop? its own error is above): {e}") from e
        return full


@dataclass
class Layout:
    """Where this process sits. The default is the single process."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world_size: int = 1
    rank: int = 0
    units: list[tuple[int, ...]] = field(default_factory=lambda: [(0,)])
    cfg_pair: CfgPair | None = None     # set when this rank is half of a CFG pair

    @property
    def unit(self) -> tuple[int, ...]:
        return next(u for u in self.units if self.rank in u)

    @property
    def writer(self) -> bool:
        """Whether this rank writes its unit's images (the cond rank of a pair, or a solo rank)."""
        return self.rank == self.unit[0]

    def share(self, n: int) -> range:
        """Indices, out of n images, that this rank's pair or solo rank generates."""
        return split(n, self.units)[self.units.index(self.unit)]

    def batches(self, items: Sequence[T], batch_size: int) -> list[list[T]]:
        """This rank's share of `items`, in order, in batches of at most batch_size. Both ranks of a
        pair get the same batches (they run them together)."""
        mine = [items[i] for i in self.share(len(items))]
        return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]

    @contextmanager
    def together(self):
        """A stretch of work (checks, loading) that every rank finishes or none goes past: at its
        end the ranks tell each other whether it failed. If one did, the first failing rank
        raises its own error (one line, cli.run) and every other rank raises `Quiet` (exit 2,
        nothing printed): no rank carries on into a collective its partner never reaches."""
        error = None
        try:
            yield
        except Exception as e:    # Stopped and KeyboardInterrupt are not errors to agree on
            error = e
        failed = [self.rank] if error is not None else []
        if self.world_size > 1:
            said: list = [None] * self.world_size
            dist.all_gather_object(said, None if error is None else type(error).__name__)
            failed = [r for r, e in enumerate(said) if e is not None]
            if failed:   # leave together: a gloo rank whose peer vanished mid-connection aborts (SIGABRT)
                if failed[0] == self.rank and isinstance(error, (ValueError, OSError)):
                    from .cli import say
                    say(error)      # before the others may exit: torchrun then stops every rank
                dist.barrier()
                if self.device.type != "cuda":
                    dist.destroy_process_group()
        if failed and failed[0] == self.rank:
            raise error
        if failed:
            raise Quiet(f"rank {failed[0]} failed") from error

    def describe(self) -> dict:
        """What the sidecar records."""
        return {"world_size": self.world_size, "rank": self.rank, "cfg_parallel": self.cfg_pair is not None}

    def close(self) -> None:
        """Leave the process group. With NCCL collectives captured in CUDA graphs,
        destroy_process_group blocked at the end of otherwise finished runs (2x H200, torch 2.11):
        on CUDA the group is left to the process's exit (the commands end with os._exit), which
        frees the communicators with everything else."""
        if self.world_size > 1 and dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                return
            dist.destroy_process_group()


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        t = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        t = float("nan")
    if not t > 0 or t == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return t


def init_from_env(device: str | torch.device, cfg: bool = True) -> Layout:
    """The layout from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). Under torchrun with
    more than one process, joins the process group (NCCL for CUDA tensors, gloo for the rest;
    collectives time out after UNIDIFFUSER_DIST_TIMEOUT_S, default 300 s) and gives each rank its
    device: `cuda` becomes cuda:LOCAL_RANK. cfg=False (guidance scale 0) makes every rank solo.
    Without torchrun: the single process on `device`."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Layout(device)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        raise ValueError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or not integers: start several "
                         "processes with torchrun (README, \"Several GPUs and nodes\")") from None
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; give --device cuda")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available here (use --device cpu)")
        if local_rank >= torch.cuda.device_count():
            e = ValueError(f"--device cuda: rank {rank} has LOCAL_RANK {local_rank} but this node has "
                           f"{torch.cuda.device_count()} CUDA device(s); give torchrun --nproc-per-node "
                           f"{torch.cuda.device_count()} or fewer")
            e.every_rank = True      # this rank's own error: printed though it is not the node's first (cli.speaks)
            raise e
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)      # NCCL and the pipeline's streams and graphs use the current device
        backend, pair_backend = "cpu:gloo,cuda:nccl", "nccl"
    elif device.type == "cpu":
        backend = pair_backend = "gloo"
    else:
        raise ValueError(f"--device {device}: expected cuda or cpu")
    timeout = datetime.timedelta(seconds=timeout_s())
    # When one rank fails, torchrun stops the others with SIGTERM: leave through Python, so that a
    # file being written is removed rather than left half-written (cli.run installs it already).
    lifecycle.install()
    dist.init_process_group(backend, timeout=timeout)
    # Which node each rank is on: torchrun's node rank, or the host name outside torchrun.
    nodes: list = [None] * world
    dist.all_gather_object(nodes, os.environ.get("GROUP_RANK") or socket.gethostname())
    units = plan_units(nodes, cfg)
    layout = Layout(device, world, rank, units)
    for u in units:     # every rank creates every group, in the same order (new_group is collective)
        if len(u) != 2:
            continue
        group = dist.new_group(list(u), timeout=timeout, backend=pair_backend)
        if rank in u:
            half = u.index(rank)
            layout.cfg_pair = CfgPair(group, half, rank, u[1 - half])
    if layout.cfg_pair is not None:
        # Warm-up: NCCL builds the pair's communicator here, never inside a CUDA graph capture.
        layout.cfg_pair.gather(torch.zeros(1, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return layout
