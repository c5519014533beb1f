"""Routing traces, independent rows in a batch, padding, bf16, and stored prototypes."""

import pytest
import torch

from quiver.errors import IncompatibleExpertError, RoutingError
from quiver.routing import (
    Arrow,
    compute_arrow_prototypes,
    load_prototypes,
    route,
    save_prototypes,
)
from quiver.routing import strategies as strategies_module
from quiver.testing import tiny_model


def test_trace_records_top_k_weights_per_token_module_and_layer(llama, expert_paths):
    routed = route(llama, expert_paths(llama, n=5), "arrow", top_k=2)
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    with routed.trace() as trace:
        out = routed.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)
    assert len(trace.modules) == 2 * 7  # 2 layers x 7 projections
    weights = trace.module_weights("model.layers.1.mlp.down_proj")
    assert weights.shape == (2, 6 + 3, 5)  # prompt, then one position per further step
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 9))
    assert ((weights > 0).sum(-1) == 2).all()
    layers = trace.layer_weights()
    assert sorted(layers) == [0, 1]
    layer_modules = [trace.module_weights(m) for m in trace.modules if ".layers.0." in m]
    torch.testing.assert_close(layers[0], torch.stack(layer_modules).mean(0))
    drawn = trace.to_dict(row=1)
    assert drawn["experts"] == ["e0", "e1", "e2", "e3", "e4"]
    assert len(drawn["layers"]["1"]) == 9 and len(drawn["layers"]["1"][0]) == 5
    with torch.no_grad():
        routed(ids)  # outside the block nothing is recorded
    assert trace.module_weights("model.layers.1.mlp.down_proj").shape[1] == 9


def test_trace_views_of_calls_that_chose_differently_many_experts(llama, expert_paths):
    routed = route(llama, expert_paths(llama, n=3), "arrow", top_k=2)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad(), routed.trace() as trace:
        routed(ids)
        with routed.using("uniform"):
            routed(ids[:, :2])

    weights = trace.module_weights("model.layers.0.mlp.up_proj")
    assert weights.shape == (2, 5, 3)
    assert ((weights[:, :3] > 0).sum(-1) == 2).all()
    torch.testing.assert_close(weights[:, 3:], torch.full((2, 2, 3), 1 / 3))
    steps = trace.step_layer_weights()[0]
    assert steps.shape == (2, 2, 3)
    torch.testing.assert_close(steps[:, 0], trace.layer_weights()[0][:, 2])
    torch.testing.assert_close(steps[:, 1], torch.full((2, 3), 1 / 3))

    with torch.no_grad(), routed.trace() as mixed:
        routed(ids)
        routed(ids[:1])
    with pytest.raises(RoutingError, match=r"calls of \[1, 2\] batch rows"):
        mixed.layer_weights()


def test_trace_of_a_merge_shows_its_fixed_weights(llama, expert_paths):
    routed = route(llama, expert_paths(llama, n=2), "merge", weights={"e1": 0.7})
    with routed.trace() as trace:
        routed(torch.tensor([[5, 6, 7]]))
    expected = torch.tensor([0.0, 0.7]).expand(1, 3, 2)
    torch.testing.assert_close(trace.layer_weights()[1], expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_route_independently_and_padding_changes_nothing(arch, expert_paths):
    model = tiny_model(arch)
    routed = route(model, expert_paths(model, n=4), Arrow(top_k=2))
    prompts = [[10, 20, 30, 40, 50, 60], [70, 80, 90]]
    batch = torch.tensor([prompts[0], prompts[1] + [0, 0, 0]])  # right padding
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad(), routed.trace() as together:
        batched = routed(batch, attention_mask=mask).logits
    for row, prompt in enumerate(prompts):
        with torch.no_grad(), routed.trace() as alone:
            single = routed(torch.tensor([prompt])).logits
        n = len(prompt)
        torch.testing.assert_close(batched[row, :n], single[0], atol=1e-5, rtol=1e-4)
        for module in alone.modules:
            torch.testing.assert_close(
                together.module_weights(module)[row, :n], alone.module_weights(module)[0]
            )


def test_left_padded_generation_matches_one_prompt_at_a_time(llama, expert_paths):
    routed = route(llama, expert_paths(llama, n=4), Arrow(top_k=2))
    prompts = [[11, 12, 13, 14, 15], [21, 22]]
    batch = torch.tensor([prompts[0], [0, 0, 0, *prompts[1]]])
    mask = (batch != 0).long()
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    together = routed.generate(batch, attention_mask=mask, **options)[:, 5:]
    for row, prompt in enumerate(prompts):
        alone = routed.generate(torch.tensor([prompt]), **options)[0, len(prompt) :]
        assert torch.equal(together[row], alone)


def test_bf16_model_routes_in_bf16(expert_paths):
    model32 = tiny_model("llama")
    paths = expert_paths(model32, n=4, spectral_gap=6.0)
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(5))
    expected = route(model32, paths, Arrow(top_k=2))(ids).logits
    routed = route(tiny_model("llama", dtype=torch.bfloat16), paths, Arrow(top_k=2))
    mixer = routed.routed_layers["model.layers.0.self_attn.q_proj"].mixer
    assert mixer.a_rows.dtype == mixer.prototypes.dtype == torch.bfloat16
    logits = routed(ids).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().max() < 0.05 * expected.abs().max()


class Library:
    """What the registry's Library offers routing: folders and stored artifacts."""

    def __init__(self, paths, artifact=None):
        self.paths, self.artifact = {p.name: p for p in paths}, artifact

    def expert_paths(self):
        return self.paths

    def artifact_path(self, name):
        return self.artifact if name == "arrow_prototypes" else None


def test_stored_prototypes_round_trip_and_are_used(llama, tmp_path, expert_paths, monkeypatch):
    paths = expert_paths(llama, n=3)
    prototypes = compute_arrow_prototypes(paths)
    stored = save_prototypes(prototypes, tmp_path / "lib" / "arrow_prototypes.safetensors")
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # no temp file left
    loaded = load_prototypes(stored)
    assert loaded.expert_names == ("e0", "e1", "e2")
    for module, vectors in prototypes.vectors.items():
        torch.testing.assert_close(loaded.vectors[module], vectors)

    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(6))
    expected = route(llama, paths, Arrow(top_k=2))(ids).logits
    llama = tiny_model("llama")

    def must_not_recompute(*args):
        raise AssertionError("stored prototypes were recomputed")

    monkeypatch.setattr(strategies_module, "compute_arrow_prototypes", must_not_recompute)
    routed = route(llama, Library(paths, stored), Arrow(top_k=2))
    torch.testing.assert_close(routed(ids).logits, expected)


def test_stored_prototypes_of_other_experts_are_refused(llama, tmp_path, expert_paths):
    paths = expert_paths(llama, n=3)
    stored = save_prototypes(compute_arrow_prototypes(paths[:2]), tmp_path / "protos.safetensors")
    with pytest.raises(IncompatibleExpertError, match=r"prototypes are for experts"):
        route(llama, Library(paths, stored), "arrow", top_k=2)
