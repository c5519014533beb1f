"""The one adapter check: what real PEFT saves passes everywhere; a config that disagrees with its
tensors, or weights that are not finite, are refused at push and at library add (and by routing's
loader, which uses the same check), naming the tensor."""

import json
import math
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from registry_helpers import logits, store_state
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from quiver import route
from quiver.cli import app
from quiver.errors import InvalidAdapterError, RoutingError
from quiver.registry import Library
from quiver.routing import Merge, load_experts
from quiver.testing import tiny_model

BASE = "quiver-testing/tiny-llama"
WEIGHTS = "adapter_model.safetensors"
LAYER = "base_model.model.model.layers.1.self_attn"

PEFT_ADAPTERS = {
    "rank-and-alpha-patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
            alpha_pattern={"down_proj": 3},
        ),
    ),
    "rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "regex": ("llama", dict(r=4, target_modules=r".*\.layers\.0\.self_attn\.(q|k)_proj")),
    "all-linear": ("qwen2", dict(r=2, lora_alpha=4, target_modules="all-linear")),
}


@pytest.mark.parametrize("case", PEFT_ADAPTERS)
def test_what_peft_saves_is_pushed_added_and_routed_as_peft_loads_it(case, local, tmp_path):
    arch, options = PEFT_ADAPTERS[case]
    config = LoraConfig(init_lora_weights=False, **options)
    get_peft_model(tiny_model(arch), config).save_pretrained(tmp_path / case)
    pushed = local.push(tmp_path / case, f"peft/{case}")
    library = Library.create(local, "peft/lib", base_model=f"quiver-testing/tiny-{arch}")
    library.add(f"peft/{case}")
    # Routing reads it through the same check, with PEFT's scales: one expert equals PEFT.
    expected = logits(PeftModel.from_pretrained(tiny_model(arch), str(pushed.path)).eval())
    routed = route(tiny_model(arch), library, "single", expert=case)
    torch.testing.assert_close(logits(routed), expected, atol=1e-5, rtol=1e-4)


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(folder, edit):
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def _rank_16(folder):
    _edit_config(folder, r=16)


def _rank_pattern(folder):
    _edit_config(folder, rank_pattern={"model.layers.1.self_attn.v_proj": 8})


def _no_lora_b(folder):
    _edit_tensors(folder, lambda t: t.pop(f"{LAYER}.k_proj.lora_B.weight"))


def _no_lora_a(folder):
    _edit_tensors(folder, lambda t: t.pop(f"{LAYER}.k_proj.lora_A.weight"))


def _target_without_tensors(folder):  # the config still names k_proj
    _edit_tensors(folder, lambda t: [t.pop(k) for k in list(t) if ".k_proj." in k])


def _tensors_without_target(folder):
    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    _edit_config(folder, target_modules=[t for t in targets if t != "v_proj"])


def _ranks_disagree(folder):
    _edit_tensors(folder, lambda t: t.update({f"{LAYER}.o_proj.lora_B.weight": torch.ones(32, 3)}))


def _not_a_matrix(folder):
    _edit_tensors(folder, lambda t: t.update({f"{LAYER}.o_proj.lora_A.weight": torch.ones(4)}))


def _full_weight(folder):  # what modules_to_save writes
    _edit_tensors(folder, lambda t: t.update({"base_model.model.lm_head.weight": torch.ones(2)}))


def _integer_factor(folder):
    key = f"{LAYER}.q_proj.lora_A.weight"
    _edit_tensors(folder, lambda t: t.update({key: t[key].to(torch.int32)}))


BROKEN = {
    "r-16-for-rank-4": (_rank_16, r"\.lora_A\.weight has rank 4 but adapter_config\.json gives "),
    "rank-pattern": (_rank_pattern, r"v_proj\.lora_A\.weight has rank 4 but .* r=8"),
    "no-lora-B": (_no_lora_b, r"k_proj\.lora_A\.weight has no matching lora_B tensor"),
    "no-lora-A": (_no_lora_a, r"k_proj\.lora_B\.weight has no matching lora_A tensor"),
    "target-without-tensors": (_target_without_tensors, r"target module 'k_proj' has no lora_A"),
    "tensors-without-target": (_tensors_without_target, r"v_proj\.lora_A\.weight adapts .*v_proj,"),
    "ranks-disagree": (_ranks_disagree, r"o_proj\.lora_A\.weight has rank 4 but .*lora_B\.weight"),
    "not-a-matrix": (_not_a_matrix, r"o_proj\.lora_A\.weight is a F32 tensor of shape \(4,\), not"),
    "modules-to-save": (_full_weight, r"holds 'base_model\.model\.lm_head\.weight', which is not"),
    "integer-factor": (_integer_factor, r"q_proj\.lora_A\.weight is a I32 tensor"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_config_that_disagrees_with_its_tensors_is_refused_everywhere(
    case, local, make_expert, base_model
):
    spoil, message = BROKEN[case]
    local.push(make_expert("good"), "alice/good")
    library = Library.create(local, "alice/lib", base_model=BASE)
    before = store_state(local)
    folder = make_expert("broken")
    spoil(folder)
    result = CliRunner().invoke(app, ["push", str(folder), "alice/broken", "-r", str(local.root)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {folder}")
    assert re.search(message, result.stderr), result.stderr
    with pytest.raises(InvalidAdapterError, match=message):
        library.add(folder)
    assert store_state(local) == before
    with pytest.raises(InvalidAdapterError, match=rf"^expert 'broken'.*{message}"):
        load_experts({"good": make_expert("good-too"), "broken": folder}, base_model)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_weights_that_are_not_finite_are_refused_at_push_and_library_add(value, local, make_expert):
    library = Library.create(local, "alice/lib", base_model=BASE)
    before = store_state(local)
    folder = make_expert("diverged")
    key = f"{LAYER}.v_proj.lora_B.weight"

    def spoil(tensors):
        tensors[key][3, 1] = value

    _edit_tensors(folder, spoil)
    message = rf"{folder}: {key} holds NaN or infinite values"
    with pytest.raises(InvalidAdapterError, match=message):
        local.push(folder, "alice/diverged")
    with pytest.raises(InvalidAdapterError, match=message):
        library.add(folder)
    assert store_state(local) == before


def test_nan_merge_weights_are_refused_at_route(make_expert, base_model):
    for weight in (math.nan, math.inf):
        with pytest.raises(RoutingError, match=r"merge weight of 'a' is (nan|inf), not a finite"):
            Merge(weights={"a": weight, "b": 0.5})
    with pytest.raises(RoutingError, match="'a' is nan"):
        route(base_model, [make_expert("a"), make_expert("b")], "merge", weights={"a": math.nan})
