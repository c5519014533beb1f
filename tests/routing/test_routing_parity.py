"""Our Arrow against PEFT's create_arrow_model, and our prototypes against a dense SVD."""

import pytest
import torch
from peft import ArrowConfig, create_arrow_model
from peft.tuners.lora.arrow import ArrowLoraLinearLayer

from quiver.routing import Arrow, route
from quiver.routing.arrow import top_right_singular_vectors
from quiver.routing.experts import load_experts
from quiver.testing import make_random_expert, tiny_model

PEFT_PREFIX = "base_model.model."


def peft_arrow(arch, paths, top_k, general=None):
    """PEFT's Arrow model plus, per module, the experts it chose for each token."""
    config = ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0, use_gks=bool(general))
    model = create_arrow_model(
        tiny_model(arch), [str(p) for p in paths], config, [str(p) for p in general or []]
    )
    chosen = {}

    def capture(name):
        def hook(module, args):
            # PEFT builds its prototypes lazily in the first forward; read them afterwards.
            chosen[name] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    for name, module in model.named_modules():
        if hasattr(module, "lora_arrow"):
            module.register_forward_pre_hook(capture(name.removeprefix(PEFT_PREFIX)))
    return model, chosen


def peft_choices(model, inputs, top_k):
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_arrow"):
            prototypes = module.lora_arrow["arrow_router"].prototypes
            x = inputs[name.removeprefix(PEFT_PREFIX)]
            out[name.removeprefix(PEFT_PREFIX)] = (x @ prototypes.T).abs().topk(top_k).indices
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("use_gks", [False, True])
def test_arrow_output_mixing_matches_peft(arch, use_gks, tmp_path, expert_paths):
    model = tiny_model(arch)
    paths = expert_paths(model, n=6, spectral_gap=6.0)
    general = [make_random_expert(model, tmp_path / f"g{i}", seed=100 + i) for i in range(2)]
    general = general if use_gks else None
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    base_logits = model(ids).logits

    reference, inputs = peft_arrow(arch, paths, top_k=3, general=general)
    with torch.no_grad():
        expected = reference(ids).logits
    routed = route(model, paths, Arrow(top_k=3, general_experts=general))
    with torch.no_grad(), routed.trace() as trace:
        logits = routed(ids).logits

    assert (expected - base_logits).abs().max() > 1e-2  # the experts really change the output
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
    theirs = peft_choices(reference, inputs, top_k=3)
    assert set(theirs) == set(trace.modules)
    for module, their_choice in theirs.items():
        ours = trace.module_weights(module).reshape(-1, 6).topk(3).indices
        assert torch.equal(ours.sort().values, their_choice.sort().values), module


def dense_top_vector(lora_a, lora_b):
    return torch.linalg.svd(lora_b.double() @ lora_a.double()).Vh[0]


def test_exact_prototypes_beat_power_iteration_on_small_gap(tmp_path, expert_paths):
    """Where PEFT's and our prototypes differ, PEFT's is the one away from the dense SVD."""
    model = tiny_model("qwen2", hidden=64)
    experts = load_experts(expert_paths(model, n=3), model)
    config = ArrowConfig(rng_seed=0)
    config.task_adapter_names = []
    ours_cos, theirs_cos = [], []
    for stack in experts.modules.values():
        power = ArrowLoraLinearLayer(stack.in_features, config)
        ours = top_right_singular_vectors(stack.A, stack.B)
        for e in range(len(experts.names)):
            exact = dense_top_vector(stack.A[e], stack.B[e])
            theirs = power.top_right_singular_vec_from_BA(stack.A[e], stack.B[e])
            ours_cos.append(abs(exact @ ours[e].double()).item())
            theirs_cos.append(abs(exact @ theirs.double()).item())
    assert min(ours_cos) > 1 - 1e-5
    assert min(theirs_cos) < 0.99  # power iteration misses on some modules
    assert all(o >= t - 1e-5 for o, t in zip(ours_cos, theirs_cos, strict=True))


def test_exact_prototypes_of_rank_padded_stacks_match_dense_svd():
    gen = torch.Generator().manual_seed(0)
    lora_a, lora_b = torch.zeros(2, 5, 12), torch.zeros(2, 9, 5)
    lora_a[0], lora_b[0] = torch.randn(5, 12, generator=gen), torch.randn(9, 5, generator=gen)
    lora_a[1, :3] = torch.randn(3, 12, generator=gen)
    lora_b[1, :, :3] = torch.randn(9, 3, generator=gen)
    ours = top_right_singular_vectors(lora_a, lora_b).double()
    for e in range(2):
        assert abs(dense_top_vector(lora_a[e], lora_b[e]) @ ours[e]) > 1 - 1e-6
