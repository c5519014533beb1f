"""Loading PEFT folders: stacking, rank padding, scales, and refusing what does not fit."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from quiver.errors import IncompatibleExpertError, InvalidAdapterError, RoutingError
from quiver.routing import load_experts, route
from quiver.routing.experts import resolve_expert_paths
from quiver.testing import ARCHITECTURES, make_random_expert, tiny_model


def test_stacks_experts_per_module_with_padded_ranks(llama, tmp_path):
    paths = {
        "wide": make_random_expert(llama, tmp_path / "a", rank=8, alpha=16, seed=1),
        "narrow": make_random_expert(llama, tmp_path / "b", rank=4, alpha=4, seed=2),
    }
    experts = load_experts(paths, llama)
    stack = experts.modules["model.layers.1.mlp.down_proj"]
    assert experts.names == ("wide", "narrow")
    assert stack.A.shape == (2, 8, 64) and stack.B.shape == (2, 32, 8)
    assert stack.ranks == (8, 4) and stack.scales.tolist() == [2.0, 1.0]
    assert not stack.A[1, 4:].any() and not stack.B[1, :, 4:].any()
    saved = load_file(paths["narrow"] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    assert torch.equal(stack.A[1, :4], saved[key])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_single_expert_matches_peft_for_every_rank(arch, tmp_path):
    """Padding and scaling are right: each expert alone equals PEFT loading just that expert."""
    model = tiny_model(arch)
    paths = [
        make_random_expert(model, tmp_path / "r8", rank=8, seed=1),
        make_random_expert(model, tmp_path / "r4", rank=4, alpha=32, seed=2),
    ]
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    for path in paths:
        expected = PeftModel.from_pretrained(tiny_model(arch), str(path))(ids).logits
        routed = route(model, paths, "single", expert=path.name)
        torch.testing.assert_close(routed(ids).logits, expected, atol=1e-5, rtol=1e-4)
        routed.unroute()


def test_refuses_pickled_adapters(llama, tmp_path):
    folder = make_random_expert(llama, tmp_path / "pickled")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(InvalidAdapterError, match=r"'pickled'.*pickled adapter_model.bin"):
        load_experts([folder], llama)


def test_refuses_dora_and_non_lora(llama, tmp_path):
    folder = make_random_expert(llama, tmp_path / "dora")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(InvalidAdapterError, match=r"'dora' is a DoRA adapter"):
        load_experts([folder], llama)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(InvalidAdapterError, match=r"IA3"):
        load_experts([folder], llama)


def test_refuses_extra_tensors(llama, tmp_path):
    folder = make_random_expert(llama, tmp_path / "biased")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.zeros(32)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapterError, match=r"'biased' holds .*lora_B.bias"):
        load_experts([folder], llama)


def test_names_the_expert_that_does_not_fit(llama, tmp_path):
    good = make_random_expert(llama, tmp_path / "good")
    other_size = make_random_expert(tiny_model("llama", hidden=48), tmp_path / "bigger")
    mismatch = r"'bigger' at model.layers.0.* but the model's layer"
    with pytest.raises(IncompatibleExpertError, match=mismatch):
        load_experts([good, other_size], llama)
    fewer = make_random_expert(llama, tmp_path / "fewer", target_modules=("q_proj", "v_proj"))
    with pytest.raises(IncompatibleExpertError, match=r"'fewer' targets different modules"):
        load_experts([good, fewer], llama)
    gpt2_expert = make_random_expert(tiny_model("gpt2"), tmp_path / "gpt2")
    with pytest.raises(IncompatibleExpertError, match=r"'gpt2' targets transformer"):
        load_experts([good, gpt2_expert], llama)


def test_element_wise_methods_refuse_mixed_ranks(llama, tmp_path):
    paths = [
        make_random_expert(llama, tmp_path / "r8", rank=8),
        make_random_expert(llama, tmp_path / "r4", rank=4),
    ]
    for strategy, options in [("uniform", {}), ("arrow", {"top_k": 1, "mixing": "parameters"})]:
        with pytest.raises(IncompatibleExpertError, match=r"'r4' has rank 4"):
            route(llama, paths, strategy, **options)
    assert route(llama, paths, "arrow", top_k=2)  # output mixing takes any ranks


def test_expert_sources(tmp_path, llama):
    first = make_random_expert(llama, tmp_path / "x" / "same")
    second = make_random_expert(llama, tmp_path / "y" / "same")

    class Library:
        def expert_paths(self):
            return {"one": first, "two": second}

    assert list(resolve_expert_paths(Library())) == ["one", "two"]
    assert list(resolve_expert_paths({"b": first, "a": second})) == ["b", "a"]
    with pytest.raises(RoutingError, match=r"both named 'same'"):
        resolve_expert_paths([first, second])
    with pytest.raises(RoutingError, match=r"single path"):
        resolve_expert_paths(str(first))
    with pytest.raises(RoutingError, match=r"no experts"):
        resolve_expert_paths([])
