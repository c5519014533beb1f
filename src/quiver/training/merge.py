"""Merge a cluster's experts into one LoRA without data: the mean of their updates ``s B A``.

- ``"svd"`` (default): the mean update truncated back to rank r, exactly as the best rank-r
  approximation: QR of the concatenated factors, SVD of the small core, never a dense matrix.
- ``"concat"``: the mean update exactly, its rank the sum of the members' (zero-padded to
  ``rank`` so that a library's experts share one rank).
- ``"mu"``: the paper's uniform baseline, the mean of the A's and of the B's separately. Across
  experts from independent LoRA inits the factors do not line up and mostly cancel out; use it
  only for experts trained from one shared init.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from quiver.errors import TrainingError
from quiver.registry import Expert
from quiver.routing import ExpertSet

MERGES = ("svd", "concat", "mu")


def _mean_update_factors(
    experts: ExpertSet, module: str, members: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``B [out, n r]`` and ``A [n r, in]`` with ``B @ A`` the members' mean update."""
    stack = experts.modules[module]
    scaled_b = stack.scaled_B().double()
    lora_b = torch.cat([scaled_b[i] for i in members], dim=1) / len(members)
    lora_a = torch.cat([stack.A[i].double() for i in members], dim=0)
    return lora_b, lora_a


def truncate(lora_b: torch.Tensor, lora_a: torch.Tensor, rank: int):
    """The best rank-``rank`` factors of ``B @ A``: thin QRs of B and A^T, then the SVD of the
    small core; singular values split evenly between the two factors."""
    q_b, r_b = torch.linalg.qr(lora_b)
    q_a, r_a = torch.linalg.qr(lora_a.T)
    u, singular, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = min(rank, singular.shape[0])
    root = singular[:keep].sqrt()
    new_b = torch.zeros(lora_b.shape[0], rank, dtype=lora_b.dtype)
    new_a = torch.zeros(rank, lora_a.shape[1], dtype=lora_a.dtype)
    new_b[:, :keep] = q_b @ u[:, :keep] * root
    new_a[:keep] = root[:, None] * vh[:keep] @ q_a.T
    return new_b, new_a


def merged_factors(
    experts: ExpertSet, members: Sequence[str], *, method: str = "svd", rank: int | None = None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, float]:
    """``module -> (A, B)`` of the merged expert, with its rank and LoRA alpha."""
    if method not in MERGES:
        raise TrainingError(f"unknown merge {method!r}", hint=f"use one of {MERGES}")
    indices = [experts.index(name) for name in members]
    first = next(iter(experts.modules.values()))
    if method == "mu":
        experts.require_uniform_rank("mu (the mean of the A's and of the B's)")
        scales = {float(s.scales[i]) for s in experts.modules.values() for i in indices}
        if len(scales) > 1:
            raise TrainingError(
                "mu averages A and B separately, which needs one LoRA scale for all members",
                hint="use merge='svd'",
            )
        factors = {
            m: (s.A[indices].mean(0), s.B[indices].mean(0)) for m, s in experts.modules.items()
        }
        rank = first.A.shape[1]
        return factors, rank, scales.pop() * rank
    rank = rank or (first.A.shape[1] if method == "svd" else first.A.shape[1] * len(indices))
    factors = {}
    for module in experts.modules:
        lora_b, lora_a = _mean_update_factors(experts, module, indices)
        if method == "svd":
            lora_b, lora_a = truncate(lora_b, lora_a, rank)
        elif lora_a.shape[0] > rank:
            raise TrainingError(f"concat needs rank >= {lora_a.shape[0]}, got {rank}")
        else:
            lora_b = torch.nn.functional.pad(lora_b, (0, rank - lora_b.shape[1]))
            lora_a = torch.nn.functional.pad(lora_a, (0, 0, 0, rank - lora_a.shape[0]))
        factors[module] = (lora_a.float(), lora_b.float())
    return factors, rank, float(rank)  # alpha = rank: scale 1, the scales live in B


def write_merged_expert(
    folder: str | Path,
    experts: ExpertSet,
    members: Sequence[str],
    template: Mapping,
    *,
    method: str = "svd",
    rank: int | None = None,
    tasks: Sequence[str] = (),
    merged_from: Sequence[str] = (),
) -> Expert:
    """Write the merge of ``members`` as a plain PEFT folder (``template``: a member's
    adapter_config) whose card says it was merged, not trained."""
    factors, rank, alpha = merged_factors(experts, members, method=method, rank=rank)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (lora_a, lora_b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {**template, "r": rank, "lora_alpha": alpha, "use_rslora": False}
    config.update(rank_pattern={}, alpha_pattern={})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    sources = list(merged_from or members)
    expert = Expert.from_folder(
        folder,
        tasks=list(tasks),
        merged_from=sources,
        hyperparameters={"merge": method, "rank": rank},
        description=f"Merged, not trained: the {_DESCRIPTIONS[method]} of {len(sources)} "
        f"experts ({', '.join(sources)}).",
    )
    expert.save(folder)
    return Expert.from_folder(folder)


_DESCRIPTIONS = {
    "svd": "mean update (s B A), truncated to its rank by SVD,",
    "concat": "exact mean update (s B A, ranks concatenated)",
    "mu": "mean of the A's and of the B's (mu)",
}
