"""Routing's two fused operations as PyTorch custom ops, so the dispatcher chooses the kernel.

- ``quiver::lowrank_add_``: ``out [N, out] +=`` the update of ``x [N, in]`` by each token's
  chosen experts ``index, weights [N, k]``, from their factors as rows (see ``mix_lowrank``).
- ``quiver::arrow_add_``: Arrow's choice (top-k of ``|x . p_e|``, softmax at a temperature) and
  that update in one pass; returns the choice.

As bitsandbytes does with its kernels: the schemas mark what is written (``out``); a fake
(meta) implementation checks shapes, dtypes and devices and gives the outputs' shapes, so a wrong
call raises a ``RoutingError`` before any kernel reads memory and ``torch.compile`` can trace a
routed model; the portable torch implementation (the same checks, then torch ops) serves every
device. The fused CPU kernels (``lowrank.cpp``, built and loaded by ``kernels.py``) register
themselves from C++ in front of it and take every call that fits them (CPU, float32); the rest
they hand on to it. The ops carry no gradient: routed layers call the portable functions below
directly while autograd records.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quiver.errors import RoutingError

torch.library.define(
    "quiver::lowrank_add_",
    "(Tensor(a!) out, Tensor x, Tensor a_rows, Tensor b_rows, Tensor index, Tensor weights, "
    "int rank, bool mix_parameters) -> ()",
)
torch.library.define(
    "quiver::arrow_add_",
    "(Tensor(a!) out, Tensor x, Tensor prototypes, Tensor panel, Tensor a_rows, Tensor b_rows, "
    "int top_k, float temperature, int rank, bool mix_parameters) "
    "-> (Tensor index, Tensor weights)",
)

TILE_EXPERTS = 16  # experts per score tile of the CPU kernel (lowrank.cpp's kTileExperts)


def _mismatch(x: torch.Tensor, expected: tuple, same_dtype: bool = True) -> str | None:
    """The first of ``(name, tensor, shape)`` whose shape, device or dtype differs from what a
    call on ``x`` needs, said plainly; or None. (Plain comparisons: it runs on every call.)"""
    device, dtype = x.device, x.dtype
    for name, tensor, shape in expected:
        if tensor.shape != shape:
            found = tuple(tensor.shape)
            return f"{name} has shape {found}, expected {shape} for x {tuple(x.shape)}"
        if tensor.device != device:
            return f"{name} is on {tensor.device} but x is on {device}"
        if same_dtype and tensor.dtype != dtype:
            return f"{name} is {tensor.dtype} but x is {dtype}"
    return None


def _factors_problem(out, x, a_rows, b_rows, rank) -> str | None:
    """What is wrong with the arguments both ops take, or None."""
    if x.dim() != 2 or out.dim() != 2 or not x.dtype.is_floating_point:
        return f"x and out must be 2-D floating point, got {tuple(x.shape)} {x.dtype}, {out.shape}"
    if rank < 1 or a_rows.dim() != 2 or a_rows.shape[0] % rank:
        return f"rank={rank} does not divide the expert rows a_rows {tuple(a_rows.shape)}"
    rows, (tokens, din), dout = a_rows.shape[0], x.shape, out.shape[1]
    expected = (
        ("out", out, (tokens, dout)),
        ("a_rows", a_rows, (rows, din)),
        ("b_rows", b_rows, (rows, dout)),
    )
    problem = _mismatch(x, expected)
    if problem is None and not out.is_contiguous():
        return "out must be contiguous"
    return problem


def _choice_problem(x, index, weights) -> str | None:
    """What is wrong with a given choice ``index, weights [N, k]``, or None."""
    if index.dim() != 2 or index.dtype != torch.int64:
        return f"index must be 2-D int64, got {tuple(index.shape)} {index.dtype}"
    shape = (x.shape[0], index.shape[1])
    problem = _mismatch(x, (("index", index, shape),), same_dtype=False)
    return problem or _mismatch(x, (("weights", weights, shape),))


def _arrow_problem(x, prototypes, panel, experts, top_k, temperature) -> str | None:
    """What is wrong with Arrow's own arguments, or None."""
    if not 1 <= top_k <= experts:
        return f"top_k={top_k} needs between 1 and {experts} experts"
    if not temperature > 0:
        return f"temperature must be positive, got {temperature}"
    groups = -(-experts // TILE_EXPERTS)
    expected = (
        ("prototypes", prototypes, (experts, x.shape[1])),
        ("panel", panel, (groups, x.shape[1], TILE_EXPERTS)),
    )
    return _mismatch(x, expected)


def check_lowrank(out, x, a_rows, b_rows, index, weights, rank) -> None:
    """Raise a ``RoutingError`` unless the arguments of ``lowrank_add_`` fit together."""
    problem = _factors_problem(out, x, a_rows, b_rows, rank) or _choice_problem(x, index, weights)
    if problem is not None:
        raise RoutingError(f"quiver::lowrank_add_: {problem}")


def check_arrow(out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank) -> None:
    """Raise a ``RoutingError`` unless the arguments of ``arrow_add_`` fit together."""
    problem = _factors_problem(out, x, a_rows, b_rows, rank)
    if problem is None:
        experts = a_rows.shape[0] // rank
        problem = _arrow_problem(x, prototypes, panel, experts, top_k, temperature)
    if problem is not None:
        raise RoutingError(f"quiver::arrow_add_: {problem}")


def _row_dots(x: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[t, j] = table[rows[t, j]] . x[t]``, without gathering the rows into memory.

    This is the transpose of ``embedding_bag`` (its gradient with respect to per-sample weights),
    which ATen exposes as one fused kernel.
    """
    tokens, per_token = rows.shape
    offsets = torch.arange(0, tokens * per_token, per_token, device=x.device)
    bags = torch.arange(tokens, device=x.device).repeat_interleave(per_token)
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x.contiguous(), table, rows.reshape(-1), offsets, bags, 0, -1
    )
    return dots.view(tokens, per_token)


def mix_lowrank(
    x: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    *,
    rank: int,
    mix_parameters: bool = False,
) -> torch.Tensor:
    """Weighted LoRA update of each token ``x [N, in]`` by its chosen experts ``index [N, k]``.

    The experts' rank-``r`` factors come as rows: ``a_rows [E * r, in]`` (the A_e stacked) and
    ``b_rows [E * r, out]`` (the scaled B_e transposed and stacked). Output mixing:
    ``sum_j w_j B_j A_j x``. Parameter mixing (mttl): ``(sum_j w_j B_j) (sum_j w_j A_j) x``.
    Portable (any device and dtype) and differentiable.
    """
    tokens, k = index.shape
    rows = (index[..., None] * rank + torch.arange(rank, device=index.device)).view(tokens, -1)
    codes = _row_dots(x, a_rows, rows).view(tokens, k, rank)  # A_j x for each chosen j
    if mix_parameters:  # every chosen B reads the same mixed code (sum_j w_j A_j) x
        codes = (weights[..., None] * codes).sum(1, keepdim=True)
    scaled = (weights[..., None] * codes).view(tokens, -1)
    return F.embedding_bag(rows, b_rows, per_sample_weights=scaled, mode="sum")


def arrow_choice(
    x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the top-k experts by ``|x . p_e|`` and their softmax at ``temperature``."""
    top, index = (x @ prototypes.mT).abs().topk(top_k, dim=-1)
    return index, (top / temperature).softmax(dim=-1)


@torch.library.register_fake("quiver::lowrank_add_")
def _lowrank_add_fake(out, x, a_rows, b_rows, index, weights, rank, mix_parameters) -> None:
    check_lowrank(out, x, a_rows, b_rows, index, weights, rank)


@torch.library.register_fake("quiver::arrow_add_")
def _arrow_add_fake(out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank, mix):
    check_arrow(out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank)
    return x.new_empty(x.shape[0], top_k, dtype=torch.int64), x.new_empty(x.shape[0], top_k)


def portable_lowrank_add_(out, x, a_rows, b_rows, index, weights, rank, mix) -> None:
    check_lowrank(out, x, a_rows, b_rows, index, weights, rank)
    out.add_(mix_lowrank(x, a_rows, b_rows, index, weights, rank=rank, mix_parameters=mix))


def portable_arrow_add_(out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank, mix):
    check_arrow(out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank)
    index, weights = arrow_choice(x, prototypes, top_k, temperature)
    out.add_(mix_lowrank(x, a_rows, b_rows, index, weights, rank=rank, mix_parameters=mix))
    return index, weights


# The portable implementations serve every device; lowrank.cpp's kernels stand in front of them.
torch.library.impl("quiver::lowrank_add_", "CompositeExplicitAutograd", portable_lowrank_add_)
torch.library.impl("quiver::arrow_add_", "CompositeExplicitAutograd", portable_arrow_add_)


def prototype_panel(prototypes: torch.Tensor) -> torch.Tensor:
    """Arrow's prototypes ``[E, in]`` laid out as the CPU kernel's score tiles read them:
    ``[ceil(E / 16), in, 16]``, each group of 16 experts column by column, zero past the last."""
    experts, features = prototypes.shape
    groups = -(-experts // TILE_EXPERTS)
    padded = F.pad(prototypes, (0, 0, 0, groups * TILE_EXPERTS - experts))
    return padded.view(groups, TILE_EXPERTS, features).transpose(1, 2).contiguous()


_LOWRANK_ADD = torch.ops.quiver.lowrank_add_.default
_ARROW_ADD = torch.ops.quiver.arrow_add_.default


def lowrank_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    *,
    rank: int,
    mix_parameters: bool,
) -> None:
    """``quiver::lowrank_add_``: add the chosen experts' update to ``out`` in place."""
    try:
        _LOWRANK_ADD(out, x, a_rows, b_rows, index, weights, rank, mix_parameters)
    except IndexError as error:  # the CPU kernel's range check on index, before it writes
        raise RoutingError(str(error)) from None


def arrow_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    prototypes: torch.Tensor,
    panel: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    *,
    top_k: int,
    temperature: float,
    rank: int,
    mix_parameters: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quiver::arrow_add_``: Arrow's choice and update in one pass; returns ``index, weights``
    ``[N, k]``. ``panel`` is ``prototype_panel(prototypes)``, packed once per layer."""
    return _ARROW_ADD(
        out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank, mix_parameters
    )
