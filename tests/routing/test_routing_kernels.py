"""The fused CPU kernels against a per-token loop, torch's top-k, and the portable path; the
custom ops refusing calls that do not fit; and the build cache keyed on the CPU it targets."""

import pytest
import torch
from routing_helpers import naive_mix

from quiver.errors import RoutingError
from quiver.routing import Arrow, kernels, ops, route


@pytest.fixture(autouse=True)
def fresh_kernels(monkeypatch):
    """Each test sees the kernels as its own environment would build (or refuse) them, with the
    kernels on unless it turns them off (whatever QUIVER_KERNELS the suite runs with); after it,
    they are as the suite's environment has them."""
    monkeypatch.delenv("QUIVER_KERNELS", raising=False)
    kernels.cpu_kernels.cache_clear()
    kernels.cpu_kernels()
    yield
    monkeypatch.undo()
    kernels.cpu_kernels.cache_clear()
    kernels.cpu_kernels()


def random_update_case(tokens, experts, rank, din, dout, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(experts, rank, din, generator=gen)
    lora_b = torch.randn(experts, dout, rank, generator=gen)
    x = torch.randn(tokens, din, generator=gen)
    index = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen).softmax(-1)
    return lora_a, lora_b, x, index, weights


def kernel_update(out, lora_a, lora_b, x, index, weights, *, mix_parameters=False):
    """``ops.lowrank_add_`` on factors shaped as ``naive_mix`` takes them."""
    rank = lora_a.shape[1]
    factors = (lora_a.flatten(0, 1), lora_b.mT.flatten(0, 1))
    ops.lowrank_add_(out, x, *factors, index, weights, rank=rank, mix_parameters=mix_parameters)


def kernel_arrow(out, lora_a, lora_b, x, prototypes, *, top_k, temperature=1.0):
    """``ops.arrow_add_`` (output mixing) on factors shaped as ``naive_mix`` takes them."""
    factors = (lora_a.flatten(0, 1), lora_b.mT.flatten(0, 1))
    return ops.arrow_add_(
        out,
        x,
        prototypes,
        ops.prototype_panel(prototypes),
        *factors,
        top_k=top_k,
        temperature=temperature,
        rank=lora_a.shape[1],
        mix_parameters=False,
    )


@pytest.mark.parametrize("mix_parameters", [False, True])
@pytest.mark.parametrize(
    ("tokens", "experts", "rank", "din", "dout", "k"),
    [
        (600, 9, 8, 64, 48, 3),  # several chunks of tokens, the last one partial
        (7, 5, 3, 13, 7, 2),  # rank and widths that fill no vector
        (65, 4, 12, 40, 21, 4),  # rank 8 + 4, every expert chosen by every token
        (1, 6, 16, 24, 9, 1),  # one token, one expert (a decoding step, the oracle)
    ],
)
def test_kernel_update_matches_a_per_token_loop(
    tokens, experts, rank, din, dout, k, mix_parameters
):
    lora_a, lora_b, x, index, weights = random_update_case(tokens, experts, rank, din, dout, k)
    base = torch.randn(tokens, dout)
    out = base.clone()
    kernel_update(out, lora_a, lora_b, x, index, weights, mix_parameters=mix_parameters)
    expected = naive_mix(x, lora_a, lora_b, index, weights, mix_parameters)
    torch.testing.assert_close(out - base, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("tokens", "experts", "din"),
    [
        (300, 32, 24),  # chunks, and lanes of eight tokens with a partial last one
        (37, 13, 600),  # a partial group of prototypes; columns in two blocks
    ],
)
def test_kernel_arrow_choice_matches_torch_top_k_and_its_update_the_loop(tokens, experts, din):
    lora_a, lora_b, x, _, _ = random_update_case(tokens, experts, 4, din, 16, 4)
    prototypes = torch.randn(experts, din, generator=torch.Generator().manual_seed(1))
    out = torch.zeros(tokens, 16)
    index, weights = kernel_arrow(out, lora_a, lora_b, x, prototypes, top_k=4, temperature=0.7)
    top, expected_index = (x @ prototypes.T).abs().topk(4, dim=-1)
    assert torch.equal(index, expected_index)
    # Scores sum `din` products in another order than torch's matmul: float32 rounding of ~1e-5
    # relative, which the softmax at T=0.7 turns into ~1e-4 on the weights.
    torch.testing.assert_close(weights, (top / 0.7).softmax(-1), atol=1e-4, rtol=1e-4)
    expected = naive_mix(x, lora_a, lora_b, index, weights, mix_parameters=False)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_kernel_arrow_breaks_ties_toward_the_lower_expert():
    lora_a, lora_b, _, _, _ = random_update_case(20, 6, 2, 16, 8, 3)
    gen = torch.Generator().manual_seed(2)  # small integers: every sum is exact, in any order
    x = torch.randint(1, 4, (20, 16), generator=gen).float()
    prototypes = torch.ones(6, 16)
    prototypes[[1, 4]] = 3.0  # experts 1 and 4 score exactly alike on every token,
    prototypes[2] = -3.0  # and so does 2, as Arrow ranks by |score|: they are the top 3
    index, _ = kernel_arrow(torch.zeros(20, 8), lora_a, lora_b, x, prototypes, top_k=3)
    assert index.tolist() == [[1, 2, 4]] * 20


def test_a_top_k_beyond_the_experts_is_refused():
    lora_a, lora_b, x, _, _ = random_update_case(4, 3, 2, 8, 8, 2)
    with pytest.raises(RoutingError, match="top_k=4"):
        kernel_arrow(torch.zeros(4, 8), lora_a, lora_b, x, torch.randn(3, 8), top_k=4)


def test_an_expert_index_out_of_range_is_refused_before_writing():
    lora_a, lora_b, x, index, weights = random_update_case(4, 3, 2, 8, 8, 2)
    index[2, 1] = 3
    out = torch.zeros(4, 8)
    with pytest.raises(RoutingError, match=r"outside 0\.\.2"):
        kernel_update(out, lora_a, lora_b, x, index, weights)
    assert not out.any()


@pytest.mark.parametrize("mixing", ["outputs", "parameters"])
def test_routed_logits_are_the_same_with_and_without_kernels(
    llama, expert_paths, monkeypatch, mixing
):
    routed = route(llama, expert_paths(llama, 6), Arrow(top_k=3, mixing=mixing))
    ids = torch.randint(3, 250, (3, 70), generator=torch.Generator().manual_seed(2))
    x = torch.zeros(1)
    with torch.no_grad():
        assert kernels.fused(x)
        fast = routed(ids).logits
        monkeypatch.setenv("QUIVER_KERNELS", "0")
        kernels.cpu_kernels.cache_clear()
        assert not kernels.fused(x)
        portable = routed(ids).logits
    torch.testing.assert_close(fast, portable, atol=1e-5, rtol=1e-5)


def test_a_forward_that_autograd_records_takes_the_portable_path(llama, expert_paths):
    """The ops carry no autograd formula, so a recorded forward calls the portable functions."""
    routed = route(llama, expert_paths(llama, 3), Arrow(top_k=2))
    layer = routed.routed_layers["model.layers.0.mlp.up_proj"]
    x = torch.randn(5, 32, requires_grad=True)
    recorded = layer(x)
    assert recorded.grad_fn is not None and kernels.fused(x)
    with torch.no_grad():
        torch.testing.assert_close(recorded, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compiler", ["no-such-compiler", "a-failing-compiler"])
def test_without_a_working_compiler_routing_warns_and_takes_the_portable_path(
    llama, expert_paths, monkeypatch, tmp_path, compiler
):
    routed = route(llama, expert_paths(llama, 3), Arrow(top_k=2))
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = routed(ids).logits
    monkeypatch.setenv("QUIVER_HOME", str(tmp_path))  # no build cached there
    if compiler == "a-failing-compiler":
        complaint = "lowrank.cpp:9:2: error: no OpenMP here\n    ^\n1 error generated."
        (tmp_path / compiler).write_text(f"#!/bin/sh\necho '{complaint}' >&2\nexit 1\n")
        (tmp_path / compiler).chmod(0o755)
    monkeypatch.setenv("CXX", str(tmp_path / compiler))
    kernels.cpu_kernels.cache_clear()
    with pytest.warns(UserWarning, match="did not build") as warned:
        assert kernels.cpu_kernels() is None
    with torch.no_grad():
        torch.testing.assert_close(routed(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert not list(tmp_path.glob("kernels/*"))
    if compiler == "a-failing-compiler":
        assert "error: no OpenMP here)" in str(warned[0].message)  # the error, not the noise


def test_build_path_changes_with_every_target_option(monkeypatch, tmp_path):
    monkeypatch.setenv("QUIVER_HOME", str(tmp_path))
    skylake = "  -march=                     \tskylake\n  -mavx512f                  \t[disabled]\n"
    avx512 = skylake.replace("[disabled]", "[enabled]")
    paths = {kernels.build_path("c++", targets) for targets in (skylake, avx512)}
    assert len(paths) == 2 and all(p.parent == tmp_path / "kernels" for p in paths)
    assert all("-skylake-" in p.name for p in paths)
    assert kernels.build_path("c++", skylake) == kernels.build_path("c++", skylake)
    assert kernels.build_path("g++", skylake) != kernels.build_path("c++", skylake)


def test_a_shared_home_never_loads_the_build_of_another_cpu(monkeypatch, tmp_path):
    """A compiler that reports what -march=native means on "this" CPU: when that changes (another
    machine sharing $QUIVER_HOME), the kernels are built anew rather than reused. (It writes an
    empty library instead of compiling: the real build is tested above.)"""
    targets = tmp_path / "targets.txt"
    compiler = tmp_path / "c++"
    compiler.write_text(
        '#!/bin/sh\nfor arg; do [ "$arg" = --help=target ] && exec cat "$TARGETS"; done\n'
        'while [ "$1" != -o ]; do shift; done; : > "$2"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("TARGETS", str(targets))
    monkeypatch.setenv("QUIVER_HOME", str(tmp_path / "home"))
    real = kernels.target_options("c++")
    home = tmp_path / "home" / "kernels"
    for cpu, builds in [("first", 1), ("second", 2), ("first", 2)]:
        targets.write_text(f"{real}  -mquiver-test-cpu-{cpu}\n")
        built = kernels.build(str(compiler))
        assert built == kernels.build_path(str(compiler), targets.read_text())
        assert len(list(home.glob("*.so"))) == builds
