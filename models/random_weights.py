"""Deterministic random weights with healthy activations, for tests and for random stand-ins of
the original checkpoints (no download needed).

The rule is the one `unidiffuser/checkpoints.py` uses for the text-to-image networks, so every
network of the project draws alike: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1),
biases and norm shifts ~ N(0, 0.1), [1, ...] tables (class / position tokens) ~ N(0, 0.02).
It is repeated here rather than imported because models/ must not depend on unidiffuser/.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def randomize_(module: nn.Module, generator: torch.Generator,
               fan_in_first: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """Fill every parameter of `module` in place (tied parameters once). `fan_in_first(name)`
    marks matrices stored [in, out] (GPT-2's Conv1D), whose fan-in is dim 0, not the rest."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, device=generator.device)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.shape[0] == 1:
                p.copy_(0.02 * noise)
            else:
                fan_in = p.shape[0] if fan_in_first(name) else p[0].numel()
                p.copy_(noise / fan_in ** 0.5)
    return module
