"""What the torch dispatcher costs one call of ``quiver::arrow_add_`` on one token (a batch-1
decoding step makes one such call per routed module), against the same checks and fused CPU
kernel called from Python, interleaved in one process.

    python benchmarks/op_dispatch.py [--experts 32] [--features 512] [--calls 2000]
"""

from __future__ import annotations

import argparse

import torch

from quiver.routing import kernels, ops
from routing import interleaved_medians  # benchmarks/routing.py


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
    factors = (out, x, prototypes, panel, a_rows, b_rows)

    def through_the_op() -> None:
        for _ in range(args.calls):
            ops.arrow_add_(*factors, top_k=top_k, temperature=1.0, rank=rank, mix_parameters=False)

    def from_python() -> None:  # what the op's CPU implementation does, without the dispatcher
        for _ in range(args.calls):
            ops.check_arrow(*factors, top_k, 1.0, rank)
            index = torch.empty(1, top_k, dtype=torch.int64)
            weights = torch.empty(1, top_k)
            kernels._run(out, x, a_rows, b_rows, panel, 1.0, index, weights, rank, False)

    medians = interleaved_medians({"op": through_the_op, "python": from_python}, repeats=7)
    op, python = (medians[way] / args.calls * 1e6 for way in ("op", "python"))
    print(f"E={experts}, in={features}, r={rank}, top-k {top_k}, 1 token, 1 thread")
    print(f"through the dispatcher: {op:.1f} us per call; from Python: {python:.1f} us")
    print(f"the dispatcher adds {op - python:.1f} us per call ({op / python:.2f}x)")


if __name__ == "__main__":
    main()
