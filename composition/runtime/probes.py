"""CLoRA's attention probes and the gradient machinery of its latent updates (shared with LoRA-Composer refinement).

Probes. The CLoRA controller's attention hands ``q, k [B, H, L, D]`` of every Flux block to the pass's
:class:`ConceptProbe`, then calls downstream unchanged. The probe computes, for the blocks it reads, each row's
concept maps: the probability that image queries put on the concept's text tokens (explicit softmax over all keys,
``kernels.probes``), averaged over heads, tokens and blocks, at reduced resolution (image queries strided so the
grid's longer side is at most ``map_size``; the keys stay complete, so the probabilities are exact).

Gradients. ComfyUI runs nodes under ``torch.inference_mode()`` and its weights are inference tensors, which
autograd refuses to save. A gradient pass therefore runs inside :func:`gradient_scope`: ``inference_mode(False)``
+ ``enable_grad`` + :class:`InferenceTensorCopies`, a ``TorchFunctionMode`` (scoped to the pass, nothing global)
that hands each op a plain copy of any inference-tensor argument when another argument requires grad, + ComfyUI's
training mode (``training_mode.training_scope``: differentiable ops in Flux, restored after the pass). Copies of
weights live only inside a checkpointed block: :func:`checkpointed_blocks` wraps each block up to the last one
the loss reads in ``torch.utils.checkpoint`` (non-reentrant, so the probes' side outputs keep their graph) through
``patches_replace["dit"]`` entries (chained with existing ones) in the *per-call* transformer options, and raises
:class:`StopForward` after that last block: the rest of the model never runs. Gradients are taken with
``torch.autograd.grad`` w.r.t. the latent only, so no ``.grad`` ever lands on a model weight.
"""
from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ...kernels.probes import text_to_image_maps
from ..plan import parse_rule_blocks
from .training_mode import training_scope

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised after the last block a gradient pass reads; caught by the caller of the model."""


class InferenceTensorCopies(TorchFunctionMode):
    """Inside a gradient pass: replace inference-tensor arguments by plain copies when an op tracks gradients."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = _tensors_in(args) + _tensors_in(tuple(kwargs.values()))
        if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
                and any(t.is_inference() for t in tensors)):
            args, kwargs = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) and a.is_inference() else a,
                                    (args, kwargs))
        return func(*args, **kwargs)


def _tensors_in(values: tuple) -> list[torch.Tensor]:
    """Tensors among ``values`` and inside lists/tuples one level down (what torch ops take)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(t for t in v if isinstance(t, torch.Tensor))
    return out


@contextlib.contextmanager
def gradient_scope() -> Iterator[None]:
    """Gradients inside a ComfyUI node: leave inference mode, enable grad, copy inference tensors per op, and
    ComfyUI's training mode; wrap the forward and the backward."""
    with torch.inference_mode(False), torch.enable_grad(), InferenceTensorCopies(), training_scope():
        yield


def plain_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) copy of ``tensor``; call inside :func:`gradient_scope`."""
    return tensor.detach().clone()


def shifted_prediction(executor: Callable, x: torch.Tensor, updated: torch.Tensor, timestep: torch.Tensor,
                       model_options: dict, seed: Any, sigmas: Any, step: int) -> torch.Tensor:
    """The sampler's prediction (``PREDICT_NOISE`` ``executor``) at the updated latent z', shifted by
    ``(z' − z)·σ_next/(σ − σ_next)`` so the sampler's step from z lands where a first-order step from z' lands (exact
    for Euler / first-order samplers, an approximation for higher-order ones)."""
    sigma = float(timestep.flatten()[0])
    sigma_next = float(sigmas[step + 1]) if step + 1 < len(sigmas) else 0.0
    out = executor(updated, timestep, model_options, seed)
    if sigma - sigma_next <= 0:
        return out
    return out + (updated - x).to(out) * (sigma_next / (sigma - sigma_next))


@dataclass(frozen=True)
class ProbeBlocks:
    """Blocks whose maps are read: ``double``/``single`` index sets (None = every block of that type)."""

    double: frozenset[int] | None
    single: frozenset[int] | None

    def reads(self, block_type: str, index: int) -> bool:
        chosen = self.double if block_type == "double" else self.single if block_type == "single" else frozenset()
        return chosen is None or index in chosen

    def last(self, n_double: int, n_single: int) -> tuple[str, int]:
        """The last block read in forward order (doubles first, then singles)."""
        singles = range(n_single) if self.single is None else sorted(i for i in self.single if i < n_single)
        if len(singles):
            return "single", max(singles)
        doubles = range(n_double) if self.double is None else sorted(i for i in self.double if i < n_double)
        if not len(doubles):
            raise ValueError("map blocks: no block of this model is selected")
        return "double", max(doubles)


def parse_probe_blocks(text: str) -> ProbeBlocks:
    """``"all-double"`` (every double block), ``"all"``, or ``"d3-10 s0-5"`` items (0-based, inclusive)."""
    cleaned = text.strip().lower()
    if cleaned in ("", "all-double", "double"):
        return ProbeBlocks(None, frozenset())
    double, single = parse_rule_blocks(cleaned)
    return ProbeBlocks(double, single)


@dataclass(frozen=True)
class ProbeLayout:
    """One model call as the probe sees it: text length, token grid, the strided query grid and, per batch row,
    the concept -> absolute text positions to read (rows without concepts are skipped)."""

    text_length: int
    grid: tuple[int, int]
    stride: int
    rows: tuple[dict[int, tuple[int, ...]], ...]

    @property
    def query_grid(self) -> tuple[int, int]:
        return -(-self.grid[0] // self.stride), -(-self.grid[1] // self.stride)

    def query_index(self, device: torch.device) -> torch.Tensor:
        """Absolute positions ``[qh·qw]`` of the strided image queries in the joint ``[txt | img]`` sequence."""
        gh, gw = self.grid
        rows = torch.arange(0, gh, self.stride, device=device)
        cols = torch.arange(0, gw, self.stride, device=device)
        return (self.text_length + rows[:, None] * gw + cols[None, :]).flatten()


def probe_stride(grid: tuple[int, int], map_size: int) -> int:
    return max(1, -(-max(grid) // max(1, map_size)))


@dataclass
class ConceptProbe:
    """Accumulates concept maps ``[qh, qw]`` per (row, concept) over the blocks in ``blocks``.

    ``recording`` False: maps are computed (a checkpoint recomputation must repeat the same ops) but not kept."""

    layout: ProbeLayout
    blocks: ProbeBlocks
    track_grad: bool = False
    recording: bool = True
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def observe(self, q: torch.Tensor, k: torch.Tensor, block_type: str, block_index: int) -> None:
        layout = self.layout
        if not self.blocks.reads(block_type, block_index) or q.shape[2] <= layout.text_length:
            return
        rows = [r for r, concepts in enumerate(layout.rows) if concepts and r < q.shape[0]]
        if not rows:
            return
        columns = sorted({p for r in rows for ps in layout.rows[r].values() for p in ps})
        qh, qw = layout.query_grid
        index = torch.tensor(rows, device=q.device)
        with contextlib.nullcontext() if self.track_grad else torch.no_grad():
            maps = text_to_image_maps(q.index_select(0, index), k.index_select(0, index),
                                      torch.tensor(columns, device=q.device), layout.query_index(q.device), qh, qw)
            where = {p: i for i, p in enumerate(columns)}
            for slot, r in enumerate(rows):
                for concept, positions in layout.rows[r].items():
                    cols = torch.tensor([where[p] for p in positions], device=q.device)
                    value = maps[slot].index_select(0, cols).mean(dim=0)  # [qh, qw]
                    if self.recording:
                        key = (r, concept)
                        self.sums[key] = value if key not in self.sums else self.sums[key] + value
                        self.counts[key] = self.counts.get(key, 0) + 1

    def maps(self) -> dict[tuple[int, int], torch.Tensor]:
        """(row, concept) -> map ``[qh, qw]`` averaged over the blocks read."""
        return {key: total / self.counts[key] for key, total in self.sums.items()}


def checkpointed_blocks(transformer_options: dict, n_double: int, last: tuple[str, int]) -> dict:
    """A copy of ``transformer_options`` whose ``patches_replace["dit"]`` checkpoints every block up to ``last``
    and raises :class:`StopForward` after it (existing replace patches are chained inside the checkpoint)."""
    options = dict(transformer_options)
    replace = {k: dict(v) for k, v in (options.get("patches_replace") or {}).items()}
    dit = replace.setdefault("dit", {})
    last_type, last_index = last
    blocks = [("double", i) for i in range(n_double)]
    blocks += [("single", i) for i in range(last_index + 1)] if last_type == "single" else []
    blocks = blocks[:blocks.index((last_type, last_index)) + 1]
    for block_type, index in blocks:
        key = (f"{block_type}_block", index)
        dit[key] = _checkpointed(dit.get(key), block_type, index, (block_type, index) == (last_type, last_index))
    options["patches_replace"] = replace
    return options


@contextlib.contextmanager
def _block_modes() -> Iterator[None]:
    with InferenceTensorCopies(), training_scope():
        yield


def _copying_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Forward and recomputation of a checkpointed block both copy inference tensors and run in ComfyUI's
    training scope (the backward runs outside the gradient scope's modes)."""
    return _block_modes(), _block_modes()


def as_called_now(original_block: Callable) -> Callable:
    """ComfyUI's ``original_block`` with its closure's current values: Flux's ``forward_orig`` defines it in the
    block loop over the loop's ``block`` (and, from 0.33, ``extra_kwargs``), so called later — in a checkpoint's
    recomputation, after the loop moved on — it would run the last block reached instead of this one."""
    closure = original_block.__closure__
    if not closure:
        return original_block
    cells = tuple(types.CellType(cell.cell_contents) for cell in closure)
    return types.FunctionType(original_block.__code__, original_block.__globals__, original_block.__name__,
                              original_block.__defaults__, cells)


def _checkpointed(previous: Callable | None, block_type: str, index: int, is_last: bool) -> Callable:
    def patch(args: dict, extra: dict) -> dict:
        original = as_called_now(extra["original_block"])

        def run(block_args: dict) -> dict:
            block_options = block_args.get("transformer_options")
            if block_options is not None:  # Flux mutates one dict per forward; a recomputation must see this block
                block_options["block_type"], block_options["block_index"] = block_type, index
            # Flux's blocks add their residuals in place (``img += ...``): the block gets copies, so the
            # recomputation starts from the forward's inputs, not from this block's outputs (training_mode.py).
            block_args = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in block_args.items()}
            if previous is not None:
                return previous(block_args, {**extra, "original_block": original})
            return original(block_args)

        out = torch.utils.checkpoint.checkpoint(run, args, use_reentrant=False, context_fn=_copying_contexts)
        if is_last:
            raise StopForward(f"{block_type} block {index}")
        return out
    return patch
