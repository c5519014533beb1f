"""Fused CPU kernels for routed layers: Arrow's routing and the chosen experts' low-rank update.

PyTorch has no CPU kernel that multiplies each token by a few experts picked per token without
gathering their factors (``embedding_bag`` comes closest, at a fraction of GEMM speed). So
``lowrank.cpp`` does it: per chunk of tokens (while they are in cache) it scores them against
the prototypes, picks each token's top-k, then visits the (token, expert) pairs expert by expert,
keeping each expert's factors in cache. It is compiled once per machine with the system's GCC
(about a second; no torch headers) into ``$QUIVER_HOME/kernels`` and loaded with ctypes. Built
with OpenMP, it runs on the libgomp torch has already loaded, i.e. on torch's threads; clang's
OpenMP would start a second pool fighting torch's for the cores, so clang is refused.

The kernels cover float32 on the CPU without autograd; everything else (GPUs, bf16/fp16,
training, machines without GCC, ``QUIVER_KERNELS=0``) takes the portable torch path in
``layers.py``, which gives the same results (up to float rounding in the scores, which can swap
two experts whose scores tie to within it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from quiver.errors import RoutingError
from quiver.fs import atomic_path
from quiver.home import quiver_home

SOURCE = Path(__file__).with_name("lowrank.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC")
MAX_CHUNK = 256  # tokens per work item: a chunk's inputs stay in L2 while its pairs reuse factors
TILE_EXPERTS = 16  # experts per score tile (lowrank.cpp's kTileExperts)


def _build(compiler: str) -> Path:
    """Compile ``lowrank.cpp`` unless this exact build exists; the target appears atomically."""
    source = SOURCE.read_bytes()
    machine = f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode()]))
    target = quiver_home() / "kernels" / f"lowrank-{machine}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    with atomic_path(target) as temp:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", temp], check=True, capture_output=True, text=True
        )
    return target


@functools.cache
def cpu_kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning saying why) when they cannot be had."""
    if os.environ.get("QUIVER_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    try:
        if compiler is None:
            raise OSError("no C++ compiler on PATH; set CXX")
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        lines = (getattr(error, "stderr", None) or str(error)).strip().splitlines()
        detail = next((line.strip() for line in lines if "error" in line), lines[-1])
        warnings.warn(
            f"Quiver's CPU kernels did not build ({detail}); routed layers take the slower "
            "portable path",
            stacklevel=2,
        )
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.quiver_lowrank_add.argtypes = [pointer] * 5 + [ctypes.c_float, pointer, pointer]
    library.quiver_lowrank_add.argtypes += [size] * 6 + [ctypes.c_int, size]
    library.quiver_lowrank_add.restype = ctypes.c_int
    return library


def applicable(*tensors: torch.Tensor) -> bool:
    """True when the kernels can stand in for the torch path on these tensors (the experts'
    buffers follow the model, so a layer's input and output decide)."""
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.dtype != torch.float32:
            return False
        if tensor.requires_grad and torch.is_grad_enabled():
            return False  # the kernels carry no gradient
    return cpu_kernels() is not None


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
    """Add the chosen experts' update to ``out [N, out]`` in place (see ``mix_lowrank``)."""
    index, weights = index.to(torch.int64).contiguous(), weights.contiguous()
    _run(out, x, a_rows, b_rows, None, 0.0, index, weights, rank, mix_parameters)


def prototype_panel(prototypes: torch.Tensor) -> torch.Tensor:
    """Arrow's prototypes ``[E, in]`` laid out as the kernels' score tiles read them:
    ``[ceil(E / 16), in, 16]``, each group of 16 experts column by column, zero past the last."""
    experts, features = prototypes.shape
    groups = -(-experts // TILE_EXPERTS)
    padded = torch.nn.functional.pad(prototypes, (0, 0, 0, groups * TILE_EXPERTS - experts))
    return padded.view(groups, TILE_EXPERTS, features).transpose(1, 2).contiguous()


def arrow_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    panel: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    *,
    top_k: int,
    temperature: float,
    rank: int,
    mix_parameters: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrow in one pass: per token, the top-k of ``|x . p_e|`` over the prototypes (as
    ``prototype_panel``), softmax at ``temperature``, and the update added to ``out``; returns
    the choice ``index, weights [N, k]``."""
    experts = len(a_rows) // rank
    if not 1 <= top_k <= experts:
        raise RoutingError(f"top_k={top_k} needs between 1 and {experts} experts")
    index = torch.empty(len(x), top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty(len(x), top_k, dtype=x.dtype, device=x.device)
    _run(out, x, a_rows, b_rows, panel, temperature, index, weights, rank, mix_parameters)
    return index, weights


def _chunk(tokens: int) -> int:
    """Tokens per work item: one per thread when that fits in MAX_CHUNK, since the larger a
    chunk, the more of its (token, expert) pairs share each expert's factors."""
    per_thread = -(-tokens // torch.get_num_threads())
    return min(MAX_CHUNK, max(8, -(-per_thread // 8) * 8))


def _run(out, x, a_rows, b_rows, panel, temperature, index, weights, rank, mix_parameters):
    if not out.is_contiguous():
        raise RoutingError("the kernels write into a contiguous output only")
    x, a_rows, b_rows = x.contiguous(), a_rows.contiguous(), b_rows.contiguous()
    experts = a_rows.shape[0] // rank
    status = cpu_kernels().quiver_lowrank_add(
        out.data_ptr(),
        x.data_ptr(),
        a_rows.data_ptr(),
        b_rows.data_ptr(),
        None if panel is None else panel.data_ptr(),
        temperature,
        index.data_ptr(),
        weights.data_ptr(),
        len(x),
        x.shape[1],
        out.shape[1],
        experts,
        rank,
        index.shape[1],
        int(mix_parameters),
        _chunk(len(x)),
    )
    if status != 0:
        raise RoutingError(f"an expert index is outside 0..{experts - 1}")
