"""Every strategy against an independent computation of what it should do."""

import shutil

import pytest
import torch
from peft import PeftModel
from routing_helpers import naive_mix
from safetensors.torch import load_file, save_file

from quiver.errors import RoutingError
from quiver.routing import Arrow, Merge, route
from quiver.routing.ops import mix_lowrank


@pytest.mark.parametrize("mix_parameters", [False, True])
def test_mix_lowrank_matches_a_per_token_loop(mix_parameters):
    gen = torch.Generator().manual_seed(0)
    lora_a, lora_b = torch.randn(6, 3, 10, generator=gen), torch.randn(6, 7, 3, generator=gen)
    x = torch.randn(9, 10, generator=gen)
    index = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=gen).softmax(-1)
    got = mix_lowrank(
        x,
        lora_a.flatten(0, 1),
        lora_b.mT.flatten(0, 1),
        index,
        weights,
        rank=3,
        mix_parameters=mix_parameters,
    )
    expected = naive_mix(x, lora_a, lora_b, index, weights, mix_parameters)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def write_merged_expert(paths, folder, weights):
    """A PEFT folder whose A and B are the weighted sums of the experts' A and B."""
    tensors = [load_file(p / "adapter_model.safetensors") for p in paths]
    merged = {k: sum(w * t[k] for w, t in zip(weights, tensors, strict=True)) for k in tensors[0]}
    shutil.copytree(paths[0], folder)
    save_file(merged, folder / "adapter_model.safetensors")
    return folder


def test_uniform_and_weighted_merges_match_peft_on_merged_weights(llama, tmp_path, expert_paths):
    paths = expert_paths(llama, n=3)
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(2))
    for weights, strategy in [((1 / 3,) * 3, "uniform"), ((0.5, 0.0, 1.5), "merge")]:
        folder = write_merged_expert(paths, tmp_path / f"merged-{strategy}", weights)
        base = type(llama)(llama.config).eval()
        base.load_state_dict(llama.state_dict())
        expected = PeftModel.from_pretrained(base, str(folder))(ids).logits
        options = {} if strategy == "uniform" else {"weights": {"e0": 0.5, "e2": 1.5}}
        routed = route(llama, paths, strategy, **options)
        torch.testing.assert_close(routed(ids).logits, expected, atol=1e-5, rtol=1e-4)
        routed.unroute()


def test_output_merge_is_the_weighted_sum_of_updates(llama, expert_paths):
    paths = expert_paths(llama, n=3)
    x = torch.randn(5, 32)
    layer = "model.layers.0.mlp.up_proj"
    base_out = llama.get_submodule(layer)(x)
    updates = []
    for path in paths:
        routed = route(llama, paths, "single", expert=path.name)
        updates.append(llama.get_submodule(layer)(x) - base_out)
        routed.unroute()
    routed = route(llama, paths, Merge({"e0": 0.25, "e1": 2.0}, mixing="outputs"))
    got = llama.get_submodule(layer)(x) - base_out
    torch.testing.assert_close(got, 0.25 * updates[0] + 2.0 * updates[1], atol=1e-5, rtol=1e-4)


def test_oracle_sends_each_row_to_its_named_expert(llama, expert_paths):
    paths = expert_paths(llama, n=3)
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(3))
    singles = {}
    for name in ("e1", "e2"):
        routed = route(llama, paths, "single", expert=name)
        singles[name] = routed(ids).logits
        routed.unroute()
    routed = route(llama, paths, "oracle")
    with routed.use_expert("e1"):
        torch.testing.assert_close(routed(ids).logits, singles["e1"])
    with routed.use_expert(["e2", "e1"]):
        logits = routed(ids).logits
    torch.testing.assert_close(logits[0], singles["e2"][0])
    torch.testing.assert_close(logits[1], singles["e1"][1])
    with pytest.raises(RoutingError, match=r"no expert to use"):
        routed(ids)
    with (
        pytest.raises(RoutingError, match=r"3 experts for a batch of 2"),
        routed.use_expert(["e0", "e1", "e2"]),
    ):
        routed(ids)
    with pytest.raises(RoutingError, match=r"unknown expert 'nope'"), routed.use_expert("nope"):
        pass


def test_arrow_parameter_mixing_differs_from_output_mixing_only_when_mixing(llama, expert_paths):
    paths = expert_paths(llama, n=4)
    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(4))
    for top_k in (1, 2):
        logits = {}
        for mixing in ("outputs", "parameters"):
            routed = route(llama, paths, Arrow(top_k=top_k, mixing=mixing))
            logits[mixing] = routed(ids).logits
            routed.unroute()
        gap = (logits["outputs"] - logits["parameters"]).abs().max()
        assert gap < 1e-5 if top_k == 1 else gap > 1e-4  # cross terms appear with 2 experts


def test_bad_requests_are_routing_errors(llama, expert_paths):
    paths = expert_paths(llama, n=2)
    cases = [
        (lambda: route(llama, paths, "magic"), "unknown strategy 'magic'"),
        (lambda: route(llama, paths, "arrow", topk=2), "bad options for strategy 'arrow'"),
        (lambda: route(llama, paths, Arrow(), top_k=2), "given with a strategy object"),
        (lambda: route(llama, paths, "arrow", top_k=3), "top_k=3 but the library has 2"),
        (lambda: Arrow(temperature=0), "temperature must be positive"),
        (lambda: Arrow(top_k=1.5), r"top_k must be at least 1 \(an integer\)"),
        (lambda: Arrow(temperature=float("nan")), "temperature must be positive"),
        (lambda: Arrow(mixing="cat"), "unknown mixing 'cat'"),
        (lambda: route(llama, paths, "merge", weights={"e9": 1.0}), "unknown expert 'e9'"),
    ]
    for call, message in cases:
        with pytest.raises(RoutingError, match=message):
            call()
    routed = route(llama, paths, "arrow", top_k=1)
    with pytest.raises(RoutingError, match=r"already routed"):
        route(llama, paths, "uniform")
    with pytest.raises(RoutingError, match=r"needs a model routed with strategy='oracle'"):
        routed.use_expert("e0").__enter__()


def test_routed_model_behaves_like_the_base_and_unroutes(llama, expert_paths):
    ids = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(7))
    base_logits = llama(ids).logits
    routed = route(llama, expert_paths(llama, n=2), "uniform")
    assert routed.config is llama.config and routed.device == llama.device
    assert len(routed.routed_layers) == 14
    assert (routed(ids).logits - base_logits).abs().max() > 1e-3
    assert routed.unroute() is llama and not routed.routed_layers
    torch.testing.assert_close(llama(ids).logits, base_logits)
