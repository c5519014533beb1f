"""Fused CPU kernels for routed layers: Arrow's routing and the chosen experts' low-rank update.

PyTorch has no CPU kernel that multiplies each token by a few experts picked per token without
gathering their factors (``embedding_bag`` comes closest, at a fraction of GEMM speed). So
``lowrank.cpp`` does it: per chunk of tokens (while they are in cache) it scores them against
the prototypes, picks each token's top-k, then visits the (token, expert) pairs expert by expert,
keeping each expert's factors in cache.

It registers itself, from C++, in front of the ``quiver::`` ops of ``ops.py`` (at the dispatcher's
BackendSelect key, below the fake, functionalization and autograd keys): a call on CPU float32
tensors that fit runs the kernel; any other call goes on to the portable implementation, whose
checks raise the ``RoutingError``. Registering from C++ rather than from Python is what makes a
decoding step cheap: a call on one token (E=32, in 512) costs about half as much as through a
Python-registered kernel (``benchmarks/op_dispatch.py``), and a batch-1 decoding step makes one
call per routed module (42 on the benchmarks' Llama).

The price is the build: against torch's headers, once per CPU and torch version, about 10-15 s of
CPU time (25-55 s on a loaded machine; without torch's headers it took about a second), into
``$QUIVER_HOME/kernels``, where every later process, and every test of a session, loads it
(``torch.ops.load_library``). The build targets the exact CPU (``-march=native``), so its file
name carries a hash of every target option that expands to, and of torch's version: a
``$QUIVER_HOME`` shared by several machines never loads another CPU's build. Built with OpenMP,
it runs on the libgomp torch has already loaded, i.e. on torch's threads; clang's OpenMP would
start a second pool fighting torch's for the cores, so clang is refused.

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
from rich.console import Console

from quiver.fs import atomic_path
from quiver.home import quiver_home

SOURCE = Path(__file__).with_name("lowrank.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++20", "-fopenmp", "-shared", "-fPIC", "-w")
_TORCH = Path(torch.__file__).parent
TORCH_FLAGS = (
    f"-I{_TORCH / 'include'}",
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    f"-L{_TORCH / 'lib'}",
    "-lc10",
    "-ltorch_cpu",
)
_MARCH = re.compile(r"^\s*-march=\s+(\S+)", re.MULTILINE)
_LOADED: dict[str, ctypes.CDLL] = {}  # every build loaded in this process, by path


def target_options(compiler: str) -> str:
    """What the compiler makes of ``FLAGS`` on this CPU: ``-march=native`` resolved to the CPU's
    name and every instruction-set option on or off (GCC's ``-Q --help=target``)."""
    query = [compiler, *FLAGS[:2], "-Q", "--help=target"]
    return subprocess.run(query, check=True, capture_output=True, text=True).stdout


def build_path(compiler: str, targets: str) -> Path:
    """Where the build for these sources, flags, torch, compiler and target options lives; any
    change in what the build would target or link against gives another file."""
    parts = [SOURCE.read_bytes(), " ".join(FLAGS + TORCH_FLAGS), torch.__version__, compiler]
    parts += [targets]
    key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts))
    march = _MARCH.search(targets)
    cpu = march.group(1) if march else "unknown"
    name = f"lowrank-{platform.machine()}-{cpu}-{key.hexdigest()[:16]}.so"
    return quiver_home() / "kernels" / name


def build(compiler: str) -> Path:
    """Compile ``lowrank.cpp`` unless this exact build exists; the target appears atomically."""
    target = build_path(compiler, target_options(compiler))
    if target.is_file():
        return target
    status = "Building Quiver's CPU kernels (once per CPU and torch version; 10-60 s)"
    with atomic_path(target) as temp, Console(stderr=True).status(status):
        command = [compiler, *FLAGS, str(SOURCE), "-o", str(temp), *TORCH_FLAGS]
        subprocess.run(command, check=True, capture_output=True, text=True)
    return target


@functools.cache
def cpu_kernels() -> ctypes.CDLL | None:
    """Load the fused kernels (building them first if need be) as the ops' CPU implementation, or
    turn them off: the library, or None (with one warning saying why when they cannot be had)."""
    library = _load()
    for loaded in _LOADED.values():
        loaded.quiver_use_kernels(int(loaded is library))
    return library


def _load() -> ctypes.CDLL | None:
    if os.environ.get("QUIVER_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    try:
        if compiler is None:
            raise OSError("no C++ compiler on PATH; set CXX")
        path = str(build(compiler))
        torch.ops.load_library(path)
    except (OSError, subprocess.CalledProcessError) as error:
        lines = (getattr(error, "stderr", None) or str(error)).strip().splitlines()
        detail = next((line.strip() for line in lines if "error" in line), lines[-1])
        warnings.warn(
            f"Quiver's CPU kernels did not build ({detail}); routed layers take the slower "
            "portable path",
            stacklevel=3,
        )
        return None
    # The handle torch.ops.load_library opened, for the kernels' switch.
    return _LOADED.setdefault(path, ctypes.CDLL(path))


def fused(x: torch.Tensor) -> bool:
    """True when the fused kernel can stand in for the portable path on a CPU input ``x``."""
    return x.dtype == torch.float32 and cpu_kernels() is not None
