"""Fused CPU kernels for routed layers: Arrow's routing and the chosen experts' low-rank update.

PyTorch has no CPU kernel that multiplies each token by a few experts picked per token without
gathering their factors (``embedding_bag`` comes closest, at a fraction of GEMM speed). So
``lowrank.cpp`` does it: per chunk of tokens (while they are in cache) it scores them against
the prototypes, picks each token's top-k, then visits the (token, expert) pairs expert by expert,
keeping each expert's factors in cache. It is compiled once per CPU with the system's GCC
(about a second; no torch headers) into ``$QUIVER_HOME/kernels`` and loaded with ctypes. The
build targets the exact CPU (``-march=native``), so its file name carries a hash of every target
option that expands to: a ``$QUIVER_HOME`` shared by several machines never loads another CPU's
build. It runs as the CPU implementation of the ``ops.py`` custom ops. Built
with OpenMP, it runs on the libgomp torch has already loaded, i.e. on torch's threads; clang's
OpenMP would start a second pool fighting torch's for the cores, so clang is refused.

The kernels cover float32 on the CPU without autograd; everything else (GPUs, bf16/fp16,
training, machines without GCC, ``QUIVER_KERNELS=0``) takes the portable torch implementation in
``ops.py``, which gives the same results (up to float rounding in the scores, which can swap
two experts whose scores tie to within it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from quiver.errors import RoutingError
from quiver.fs import atomic_path
from quiver.home import quiver_home
from quiver.routing import ops

SOURCE = Path(__file__).with_name("lowrank.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC")
MAX_CHUNK = 256  # tokens per work item: a chunk's inputs stay in L2 while its pairs reuse factors
_MARCH = re.compile(r"^\s*-march=\s+(\S+)", re.MULTILINE)


def target_options(compiler: str) -> str:
    """What the compiler makes of ``FLAGS`` on this CPU: ``-march=native`` resolved to the CPU's
    name and every instruction-set option on or off (GCC's ``-Q --help=target``)."""
    query = [compiler, *FLAGS[:2], "-Q", "--help=target"]
    return subprocess.run(query, check=True, capture_output=True, text=True).stdout


def build_path(compiler: str, targets: str) -> Path:
    """Where the build for these sources, flags, compiler and target options lives; any change
    in what the build would target gives another file."""
    parts = [SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(), targets.encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    march = _MARCH.search(targets)
    cpu = march.group(1) if march else "unknown"
    return quiver_home() / "kernels" / f"lowrank-{platform.machine()}-{cpu}-{key}.so"


def _build(compiler: str) -> Path:
    """Compile ``lowrank.cpp`` unless this exact build exists; the target appears atomically."""
    target = build_path(compiler, target_options(compiler))
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


def fused(x: torch.Tensor) -> bool:
    """True when the fused kernel can stand in for the portable path on a CPU input ``x``."""
    return x.dtype == torch.float32 and cpu_kernels() is not None


@torch.library.impl("quiver::lowrank_add_", "CPU")
def _lowrank_add_cpu(out, x, a_rows, b_rows, index, weights, rank, mix_parameters) -> None:
    if not fused(x):
        return ops.portable_lowrank_add_(
            out, x, a_rows, b_rows, index, weights, rank, mix_parameters
        )
    ops.check_lowrank(out, x, a_rows, b_rows, index, weights, rank)
    _run(out, x, a_rows, b_rows, None, 0.0, index, weights, rank, mix_parameters)
    return None


@torch.library.impl("quiver::arrow_add_", "CPU")
def _arrow_add_cpu(out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank, mix):
    if not fused(x):
        return ops.portable_arrow_add_(
            out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank, mix
        )
    ops.check_arrow(out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank)
    index = torch.empty(len(x), top_k, dtype=torch.int64)
    weights = torch.empty(len(x), top_k, dtype=x.dtype)
    _run(out, x, a_rows, b_rows, panel, temperature, index, weights, rank, mix)
    return index, weights


def _chunk(tokens: int) -> int:
    """Tokens per work item: one per thread when that fits in MAX_CHUNK, since the larger a
    chunk, the more of its (token, expert) pairs share each expert's factors."""
    per_thread = -(-tokens // torch.get_num_threads())
    return min(MAX_CHUNK, max(8, -(-per_thread // 8) * 8))


def _run(out, x, a_rows, b_rows, panel, temperature, index, weights, rank, mix_parameters):
    """Call the kernel on arguments ``ops`` has checked (with a panel: Arrow fills index and
    weights; without: they are read, and an expert index out of range writes nothing)."""
    x, a_rows, b_rows = x.contiguous(), a_rows.contiguous(), b_rows.contiguous()
    index, weights = index.contiguous(), weights.contiguous()
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
