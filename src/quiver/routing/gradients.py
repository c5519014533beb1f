"""Per-example gradients of a prompt's loss with respect to one LoRA adapter, sketched to a fixed
dimension: ELREA's gradient features.

Per-example gradients come from one batched forward and backward: every row gets its own copy of
the adapter's factors (autograd leaves ``[rows, r, in]`` and ``[rows, out, r]``), so the gradient
of the summed per-row losses with respect to row ``i``'s copy is row ``i``'s own gradient. The
rows of a causal LM never mix, so this is exact, costs what one batched backward costs, and works
for any architecture (no ``torch.func`` tracing of the model).

The gradient (``d_grad`` = sum over modules of ``r * (in + out)``: about 10M for a 1B model's
all-linear rank-8 LoRA) is projected with a CountSketch, a sparse sign Johnson-Lindenstrauss
transform: coordinate ``j`` of parameter tensor ``t`` is added, times a sign ``s_t(j) = +-1``, to
bucket ``h_t(j)`` of ``dim``. ``h`` and ``s`` are drawn from a generator seeded by
``sha256(seed, t)``, so the projection is a seed and a dimension, never a stored matrix, and
costs ``O(d_grad)`` per example (a dense Gaussian projection costs ``O(d_grad * dim)``: see
``benchmarks/elrea.py``). Inner products are preserved in expectation, with a variance of about
``2 / dim`` for unit vectors whose mass is spread out, as gradients' is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quiver.errors import RoutingError

MIN_PROMPT_TOKENS = 2  # a loss on the prompt needs one token to predict from another


@dataclass(frozen=True)
class CountSketch:
    """A sparse sign JL projection ``R^d_grad -> R^dim``, defined by ``seed`` and ``dim`` alone."""

    dim: int
    seed: int = 0
    _hashes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise RoutingError(f"the projection dimension must be positive, got {self.dim}")

    def _hash(self, key: str, numel: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Bucket and sign of every coordinate of parameter tensor ``key`` (cached)."""
        cached = self._hashes.get((key, numel, device))
        if cached is None:
            digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            buckets = torch.randint(0, self.dim, (numel,), generator=generator)
            signs = torch.randint(0, 2, (numel,), generator=generator).float() * 2 - 1
            cached = (buckets.to(device), signs.to(device))
            self._hashes[(key, numel, device)] = cached
        return cached

    def __call__(self, gradients: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sketch per-row gradients (``key -> [rows, ...]``) into unit rows ``[rows, dim]``."""
        sketch = None
        for key, gradient in gradients.items():
            flat = gradient.detach().flatten(1).float()
            if sketch is None:
                sketch = flat.new_zeros(len(flat), self.dim)
            buckets, signs = self._hash(key, flat.shape[1], flat.device)
            sketch.index_add_(1, buckets, flat * signs)
        if sketch is None:
            raise RoutingError("no gradients to sketch")
        return F.normalize(sketch, dim=1)


class GradientPass:
    """One forward whose LoRA'd modules run ``rows`` private copies of one adapter; after the
    backward, ``gradients()`` holds each row's gradient in PEFT's layouts (``A [r, in]``,
    ``B [out, r]``, scale included)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._leaves: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def lora_delta(
        self, module: str, x: torch.Tensor, lora_a: torch.Tensor, b_rows: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``x [N, in] -> [N, out]``: ``x A^T (s B^T)`` with row-private leaves of ``A [r, in]``
        and ``s B^T [r, out]`` (a module called twice reuses its leaves; autograd adds up)."""
        if module not in self._leaves:
            a = lora_a.detach().expand(self.rows, *lora_a.shape).clone().requires_grad_()
            b = b_rows.detach().expand(self.rows, *b_rows.shape).clone().requires_grad_()
            self._leaves[module] = (a, b, scale)
        a, b, _ = self._leaves[module]
        per_row = x.reshape(self.rows, -1, x.shape[-1])
        return torch.bmm(torch.bmm(per_row, a.mT), b).reshape(len(x), -1)

    def gradients(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each row's gradient of ``loss.sum()`` (``loss [rows]``): ``name -> [rows, ...]``."""
        if not self._leaves:
            raise RoutingError("the gradient pass reached no LoRA module of the base adapter")
        leaves = [leaf for a, b, _ in self._leaves.values() for leaf in (a, b)]
        grads = torch.autograd.grad(loss.sum(), leaves)
        out = {}
        for i, (module, (_, _, scale)) in enumerate(self._leaves.items()):
            grad_a, grad_scaled_bt = grads[2 * i], grads[2 * i + 1]
            out[f"{module}.lora_A"] = grad_a  # [rows, r, in]
            # x A^T (s B^T) depends on B through s B^T: d/dB = s (d/d(s B^T))^T, [rows, out, r]
            out[f"{module}.lora_B"] = scale * grad_scaled_bt.mT
        return out


def check_prompts(attention_mask: torch.Tensor) -> None:
    """Refuse rows with fewer than two prompt tokens: their prompt has no loss to differentiate."""
    counts = attention_mask.sum(-1)
    short = (counts < MIN_PROMPT_TOKENS).nonzero().flatten().tolist()
    if short:
        raise RoutingError(
            f"prompt row {short[0]} has {int(counts[short[0]])} token(s) after tokenisation; "
            f"ELREA routes by the gradient of the prompt's loss, which needs at least "
            f"{MIN_PROMPT_TOKENS}",
            hint="give every row a non-empty prompt",
        )


def prompt_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token loss over its prompt (pairs of unmasked positions): ``[rows]``."""
    pairs = (mask[:, 1:] * mask[:, :-1]).to(torch.float32)
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
    )
    return (losses * pairs).sum(1) / pairs.sum(1)
