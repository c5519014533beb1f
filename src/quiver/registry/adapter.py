"""The one check every LoRA expert passes: at push, at library add, at pull and before routing.

An expert is a plain PEFT LoRA folder: ``adapter_config.json`` (peft_type LORA, no DoRA) and
``adapter_model.safetensors`` holding, for each module the config targets, a ``lora_A [r, in]`` and
a ``lora_B [out, r]`` whose rank is the one the config gives that module (``r``, or its
``rank_pattern`` entry). Nothing else: no biases, embeddings or ``modules_to_save``. The check
reads only the safetensors header, so a 10 GB expert costs what a 10 MB one does;
``check_finite`` streams the tensors one at a time for the push-time scan for NaN and infinities.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from quiver.errors import IntegrityError, InvalidAdapterError

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
ALL_LINEAR = "all-linear"  # PEFT's shorthand for every linear layer but the output head
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(\.[^.]+)?\.weight$"
)
_ONLY_LORA = (
    "a Quiver expert is plain LoRA on Linear/Conv1D layers (no biases, embeddings, "
    "modules_to_save or trainable tokens)"
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: where its two factors are in the weights file, and its geometry."""

    a_key: str
    b_key: str
    rank: int
    in_features: int
    out_features: int
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA


def read_adapter_config(folder: Path, label: str) -> dict[str, Any]:
    """``adapter_config.json`` of a plain LoRA (not DoRA, not another PEFT method), checked."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise InvalidAdapterError(
            f"{label} has no {ADAPTER_CONFIG}",
            hint="point at a folder written by PEFT's save_pretrained "
            "(libraries are pulled with `quiver library pull`)",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidAdapterError(
            f"{label}: {ADAPTER_CONFIG} is not valid JSON: {error}"
        ) from error
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{label}: {ADAPTER_CONFIG} is not a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidAdapterError(
            f"{label} is a {peft_type or 'non-PEFT'} adapter, not a LoRA",
            hint="Quiver experts are plain LoRA adapters (peft_type LORA)",
        )
    if config.get("use_dora"):
        raise InvalidAdapterError(
            f"{label} is a DoRA adapter, not a plain LoRA", hint="train it with use_dora=False"
        )
    missing = [key for key in ("r", "lora_alpha", "target_modules") if not config.get(key)]
    if missing:
        raise InvalidAdapterError(f"{label}: {ADAPTER_CONFIG} misses {', '.join(missing)}")
    problem = _config_problem(config)
    if problem:
        raise InvalidAdapterError(
            f"{label}: {ADAPTER_CONFIG} is malformed: {problem}",
            hint="save the adapter with PEFT's save_pretrained",
        )
    return config


def _config_problem(config: dict[str, Any]) -> str | None:
    """What makes the LoRA fields of a config unusable, if anything."""
    targets = config["target_modules"]
    if not isinstance(targets, str) and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        return "target_modules must be a regex string or a list of module names"
    patterns = [config.get(key) or {} for key in ("rank_pattern", "alpha_pattern")]
    if not all(isinstance(pattern, dict) for pattern in patterns):
        return "rank_pattern and alpha_pattern must map module names to numbers"
    if not all(isinstance(r, int) and r > 0 for r in [config["r"], *patterns[0].values()]):
        return "r and the ranks of rank_pattern must be positive integers"
    alphas = [config["lora_alpha"], *patterns[1].values()]
    if not all(isinstance(alpha, (int, float)) for alpha in alphas):
        return "lora_alpha and the values of alpha_pattern must be numbers"
    return None


def lora_modules(folder: Path, config: dict[str, Any], label: str) -> dict[str, LoraModule]:
    """Every adapted module of the folder's weights, each checked against ``config``."""
    shapes = _read_header(folder / WEIGHTS, label)
    pairs: dict[str, dict[str, str]] = {}
    for key in shapes:
        match = _LORA_KEY.match(key)
        if match is None:
            raise InvalidAdapterError(
                f"{label} holds {key!r}, which is not a LoRA A/B weight", hint=_ONLY_LORA
            )
        pairs.setdefault(match["module"], {})[match["factor"]] = key
    if not pairs:
        raise InvalidAdapterError(f"{label}: {WEIGHTS} holds no lora_A/lora_B tensors")
    modules = {
        module: _check_pair(module, pair, shapes, config, label) for module, pair in pairs.items()
    }
    _check_targets(config, modules, label)
    return modules


def read_adapter(folder: Path, label: str) -> tuple[dict[str, Any], dict[str, LoraModule]]:
    """The config and the checked modules of a LoRA folder; raises naming what disagrees."""
    config = read_adapter_config(folder, label)
    return config, lora_modules(folder, config, label)


def check_finite(folder: Path, label: str) -> None:
    """Refuse NaN or infinite weights, naming the tensor; reads one tensor at a time."""
    import torch  # only pushes pay for it: the header checks above need no torch

    with safe_open(str(folder / WEIGHTS), framework="pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if not torch.isfinite(weights.get_tensor(key)).all():
                raise InvalidAdapterError(
                    f"{label}: {key} holds NaN or infinite values",
                    hint="the training diverged: lower the learning rate, or use an earlier "
                    "checkpoint",
                )


def _read_header(path: Path, label: str) -> dict[str, tuple[list[int], str]]:
    """``key -> (shape, dtype)`` from the safetensors header, without reading any tensor."""
    if not path.is_file():
        pickled = [name for name in PICKLED_WEIGHTS if (path.parent / name).exists()]
        raise InvalidAdapterError(
            f"{label} has no {WEIGHTS}"
            + (f" (only a pickled {pickled[0]}, which Quiver never loads)" if pickled else ""),
            hint="Quiver loads safetensors only and never unpickles .bin files; "
            "re-save the adapter with safe_serialization=True",
        )
    try:
        with safe_open(str(path), framework="numpy") as weights:
            slices = {key: weights.get_slice(key) for key in weights.keys()}  # noqa: SIM118
            return {key: (s.get_shape(), s.get_dtype()) for key, s in slices.items()}
    except (SafetensorError, OSError) as error:
        raise IntegrityError(
            f"{label}: {WEIGHTS} is not a readable safetensors file ({error})",
            hint="the weights are truncated or corrupt: pull or re-save them",
        ) from error


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup (imported only when an adapter uses them)."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(patterns.keys(), module), default)


def _check_pair(
    module: str,
    pair: dict[str, str],
    shapes: dict[str, tuple[list[int], str]],
    config: dict[str, Any],
    label: str,
) -> LoraModule:
    """One module's lora_A and lora_B: both present, 2-D floats, ranks as the config says."""
    for present, absent in (("A", "B"), ("B", "A")):
        if absent not in pair:
            raise InvalidAdapterError(
                f"{label}: {pair[present]} has no matching lora_{absent} tensor",
                hint="a LoRA needs both factors of every module: re-save the adapter with PEFT",
            )
    (a_shape, a_dtype), (b_shape, b_dtype) = shapes[pair["A"]], shapes[pair["B"]]
    for key, shape, dtype in ((pair["A"], a_shape, a_dtype), (pair["B"], b_shape, b_dtype)):
        if len(shape) != 2 or dtype not in _FLOAT_DTYPES:
            raise InvalidAdapterError(
                f"{label}: {key} is a {dtype} tensor of shape {tuple(shape)}, not a LoRA factor "
                "matrix",
                hint=_ONLY_LORA,
            )
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    if a_shape[0] != b_shape[1]:
        raise InvalidAdapterError(
            f"{label}: {pair['A']} has rank {a_shape[0]} but {pair['B']} has rank {b_shape[1]}",
            hint="lora_A is [r, in] and lora_B is [out, r]: the weights are inconsistent",
        )
    if a_shape[0] != rank:
        raise InvalidAdapterError(
            f"{label}: {pair['A']} has rank {a_shape[0]} but {ADAPTER_CONFIG} gives {module} "
            f"r={rank}",
            hint="the config does not describe these weights: save them together with PEFT",
        )
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    return LoraModule(pair["A"], pair["B"], rank, a_shape[1], b_shape[0], float(scale))


def _check_targets(config: dict[str, Any], modules: dict[str, LoraModule], label: str) -> None:
    """Every tensor's module is one the config targets, and every named target has tensors."""
    targets = config["target_modules"]
    if isinstance(targets, str):  # a regex over module names, or PEFT's "all-linear"
        if targets.lower() == ALL_LINEAR:
            return
        untargeted = [module for module in modules if not re.fullmatch(targets, module)]
        unused: list[str] = []
    else:
        untargeted = [m for m in modules if not any(_names(m, target) for target in targets)]
        unused = [t for t in targets if not any(_names(m, t) for m in modules)]
    if untargeted:
        module = untargeted[0]
        raise InvalidAdapterError(
            f"{label}: {modules[module].a_key} adapts {module}, which target_modules "
            f"({targets!r}) does not name",
            hint="the config does not describe these weights: save them together with PEFT",
        )
    if unused:
        raise InvalidAdapterError(
            f"{label}: target module {unused[0]!r} has no lora_A/lora_B tensors",
            hint="the config does not describe these weights: save them together with PEFT",
        )


def _names(module: str, target: str) -> bool:
    """PEFT's rule for a target_modules list entry: the module's name or a dotted suffix of it."""
    return module == target or module.endswith(f".{target}")
