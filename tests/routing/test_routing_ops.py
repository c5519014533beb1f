"""The ``quiver::`` custom ops: calls that do not fit are refused before any kernel reads memory
(eagerly and under fake tensors), and torch.compile traces a routed model through them."""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode

from quiver.errors import RoutingError
from quiver.routing import Arrow, kernels, ops, route


@pytest.fixture(autouse=True, scope="module")
def cpu_kernels():
    """The fused CPU kernels loaded (as routing a model does), so CPU calls go through them."""
    assert kernels.cpu_kernels() is not None


def lowrank_args(tokens=6, experts=4, rank=3, din=10, dout=7, k=2):
    gen = torch.Generator().manual_seed(0)
    return dict(
        out=torch.zeros(tokens, dout),
        x=torch.randn(tokens, din, generator=gen),
        a_rows=torch.randn(experts * rank, din, generator=gen),
        b_rows=torch.randn(experts * rank, dout, generator=gen),
        index=torch.randint(0, experts, (tokens, k), generator=gen),
        weights=torch.rand(tokens, k, generator=gen),
    )


def call_lowrank(args, rank=3):
    ops.lowrank_add_(**args, rank=rank, mix_parameters=False)


def call_arrow(args, prototypes, top_k=2, temperature=1.0, rank=3, panel=None):
    factors = {k: args[k] for k in ("out", "x", "a_rows", "b_rows")}
    panel = ops.prototype_panel(prototypes) if panel is None else panel
    return ops.arrow_add_(
        **factors,
        prototypes=prototypes,
        panel=panel,
        top_k=top_k,
        temperature=temperature,
        rank=rank,
        mix_parameters=False,
    )


BAD_LOWRANK_CALLS = {
    "x of another width": (lambda a: {**a, "x": torch.randn(6, 11)}, r"a_rows has shape"),
    "out of fewer tokens": (lambda a: {**a, "out": torch.zeros(5, 7)}, r"out has shape"),
    "b_rows of another width": (lambda a: {**a, "b_rows": torch.randn(12, 8)}, r"b_rows has"),
    "weights of another k": (lambda a: {**a, "weights": torch.rand(6, 3)}, r"weights has shape"),
    "index as int32": (lambda a: {**a, "index": a["index"].int()}, r"index must be 2-D int64"),
    "bf16 factors": (lambda a: {**a, "a_rows": a["a_rows"].bfloat16()}, r"a_rows is torch.bf"),
    "factors on meta": (lambda a: {**a, "b_rows": a["b_rows"].to("meta")}, r"b_rows is on meta"),
    "a strided out": (lambda a: {**a, "out": torch.zeros(7, 6).T}, r"out must be contiguous"),
}


@pytest.mark.parametrize("case", sorted(BAD_LOWRANK_CALLS))
def test_lowrank_add_refuses_arguments_that_do_not_fit(case):
    change, message = BAD_LOWRANK_CALLS[case]
    args = change(lowrank_args())
    before = args["out"].clone()
    with pytest.raises(RoutingError, match=message):
        call_lowrank(args)
    assert torch.equal(args["out"], before)  # nothing written


@pytest.mark.parametrize(("rank", "message"), [(0, "rank=0"), (5, "rank=5 does not divide")])
def test_ops_refuse_a_rank_that_does_not_divide_the_rows(rank, message):
    args = lowrank_args()
    with pytest.raises(RoutingError, match=message):
        call_lowrank(args, rank=rank)
    with pytest.raises(RoutingError, match=message):
        call_arrow(args, torch.randn(4, 10), rank=rank)


def test_arrow_add_refuses_bad_prototypes_top_k_and_temperature():
    args, prototypes = lowrank_args(), torch.randn(4, 10)
    cases = [
        (dict(prototypes=torch.randn(5, 10)), r"prototypes has shape \(5, 10\), expected \(4, 10"),
        (dict(prototypes=prototypes, panel=torch.zeros(1, 10, 8)), r"panel has shape"),
        (dict(prototypes=prototypes.double()), r"prototypes is torch.float64"),
        (dict(prototypes=prototypes, top_k=5), r"top_k=5 needs between 1 and 4"),
        (dict(prototypes=prototypes, top_k=0), r"top_k=0"),
        (dict(prototypes=prototypes, temperature=0.0), r"temperature must be positive"),
    ]
    for options, message in cases:
        with pytest.raises(RoutingError, match=message):
            call_arrow(args, **options)
    assert not args["out"].any()


def test_fake_implementations_check_and_give_the_shapes_compile_traces_with():
    with FakeTensorMode():
        args, prototypes = lowrank_args(tokens=9), torch.randn(4, 10)
        index, weights = call_arrow(args, prototypes, top_k=3)
        assert index.shape == weights.shape == (9, 3) and index.dtype == torch.int64
        call_lowrank(args)  # fits: nothing to say
        with pytest.raises(RoutingError, match=r"x of|a_rows has shape"):
            call_lowrank({**args, "x": torch.randn(9, 12)})
        with pytest.raises(RoutingError, match=r"top_k=7"):
            call_arrow(args, prototypes, top_k=7)


def test_portable_and_fused_cpu_implementations_agree():
    args, prototypes = lowrank_args(tokens=40), torch.randn(4, 10)
    portable = {k: v.clone() for k, v in args.items()}
    index, weights = call_arrow(args, prototypes)
    ops.portable_arrow_add_(
        portable["out"],
        portable["x"],
        prototypes,
        ops.prototype_panel(prototypes),
        portable["a_rows"],
        portable["b_rows"],
        2,
        1.0,
        3,
        False,
    )
    expected_index, expected_weights = ops.arrow_choice(args["x"], prototypes, 2, 1.0)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(weights, expected_weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(args["out"], portable["out"], atol=1e-5, rtol=1e-5)


def test_calls_the_cpu_kernel_does_not_take_go_on_to_the_portable_implementation():
    """bf16 on the CPU: the fused kernel (float32) hands the call on; the portable path answers."""
    args, prototypes = lowrank_args(tokens=5), torch.randn(4, 10).bfloat16()
    args = {k: v.bfloat16() if v.is_floating_point() else v for k, v in args.items()}
    portable = {k: v.clone() for k, v in args.items()}
    index, weights = call_arrow(args, prototypes)
    expected = ops.portable_arrow_add_(
        *(portable[k] for k in ("out", "x")),
        prototypes,
        ops.prototype_panel(prototypes),
        *(portable[k] for k in ("a_rows", "b_rows")),
        2,
        1.0,
        3,
        False,
    )
    assert args["out"].dtype == weights.dtype == torch.bfloat16 and args["out"].any()
    assert torch.equal(index, expected[0]) and torch.equal(weights, expected[1])
    assert torch.equal(args["out"], portable["out"])


def test_torch_compile_traces_a_routed_model_in_one_graph(llama, expert_paths):
    routed = route(llama, expert_paths(llama, 4), Arrow(top_k=2))
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    graph_ops = []

    def record(graph, inputs):
        graph_ops.extend(str(node.args[0]) for node in graph.graph.nodes if node.args)
        return graph

    compiled = torch.compile(routed, backend=aot_autograd(fw_compiler=record), fullgraph=True)
    with torch.no_grad():
        expected = routed(ids).logits
        torch.testing.assert_close(compiled(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert sum("quiver.arrow_add_" in op for op in graph_ops) == len(routed.routed_layers)
