"""What one call of ``quiver::arrow_add_`` on one token costs (a batch-1 decoding step makes one
such call per routed module): the op as it runs, its fused CPU kernel registered from C++,
against the same op behind a kernel registered from Python (as Quiver had it: the checks in
Python, then the fused kernel), interleaved in one process, in this process's CPU time.

    python benchmarks/op_dispatch.py [--experts 32] [--features 512] [--calls 2000]
"""

from __future__ import annotations

import argparse
import time

import torch

from quiver.routing import kernels, ops
from routing import interleaved_medians  # benchmarks/routing.py


def python_registered() -> tuple[torch.library.Library, object]:
    """``quiver_bench::arrow_add_``: the same schema, its CPU kernel a Python function that runs
    the checks, then the fused kernel (``quiver::arrow_add_``, which checks again in C++)."""
    library = torch.library.Library("quiver_bench", "DEF")
    library.define(str(torch.ops.quiver.arrow_add_.default._schema).split("::", 1)[1])

    def arrow_add_cpu(out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank, mix):
        ops.check_arrow(out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank)
        return torch.ops.quiver.arrow_add_.default(
            out, x, prototypes, panel, a_rows, b_rows, top_k, temperature, rank, mix
        )

    library.impl("arrow_add_", arrow_add_cpu, "CPU")
    return library, torch.ops.quiver_bench.arrow_add_.default  # it lasts as long as its library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if kernels.cpu_kernels() is None:
        raise SystemExit("the fused CPU kernels are not built on this machine")
    experts, features, rank, top_k = args.experts, args.features, args.rank, args.top_k
    x, out = torch.randn(1, features), torch.zeros(1, features)
    prototypes = torch.nn.functional.normalize(torch.randn(experts, features), dim=1)
    panel = ops.prototype_panel(prototypes)
    a_rows, b_rows = torch.randn(experts * rank, features), torch.randn(experts * rank, features)
    arguments = (out, x, prototypes, panel, a_rows, b_rows, top_k, 1.0, rank, False)
    _library, through_python = python_registered()

    def registered_from_cpp() -> None:
        for _ in range(args.calls):
            ops.arrow_add_(
                *arguments[:6], top_k=top_k, temperature=1.0, rank=rank, mix_parameters=False
            )

    def registered_from_python() -> None:
        for _ in range(args.calls):
            through_python(*arguments)

    ways = {"cpp": registered_from_cpp, "python": registered_from_python}
    medians = interleaved_medians(ways, repeats=7, clock=time.process_time)  # one thread
    cpp, python = (medians[way] / args.calls * 1e6 for way in ways)
    print(f"E={experts}, in={features}, r={rank}, top-k {top_k}, 1 token, 1 thread")
    print(f"kernel registered from C++: {cpp:.1f} us per call; from Python: {python:.1f} us")
    print(f"the Python registration adds {python - cpp:.1f} us per call ({python / cpp:.2f}x)")


if __name__ == "__main__":
    main()
