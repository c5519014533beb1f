"""Gradient features: each row's exact gradient of its prompt's loss, sketched from a seed."""

import pytest
import torch
from peft import PeftModel

from quiver.errors import RoutingError
from quiver.routing import route
from quiver.routing.elrea import PromptGradients, prompt_features
from quiver.routing.gradients import CountSketch, prompt_loss
from quiver.testing import make_random_expert, tiny_model


def _peft_gradient(model, folder, ids):
    """The reference: PEFT's own LoRA parameters' gradient of one unpadded prompt's loss."""
    peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    try:
        mask = torch.ones_like(ids)
        prompt_loss(peft_model(input_ids=ids).logits, ids, mask).sum().backward()
        return {
            name.removeprefix("base_model.model.").replace(".default.weight", ""): p.grad[None]
            for name, p in peft_model.named_parameters()
            if "lora_" in name
        }
    finally:
        peft_model.unload()


def test_features_are_each_prompts_own_gradient_whatever_the_padding(tokenizer, tmp_path):
    model = tiny_model()
    folder = make_random_expert(model, tmp_path / "base", rank=4, b_std=0.2, seed=1)
    sketch = CountSketch(dim=512, seed=3)
    prompts = ["sum 123 456 =", "reverse abc:", "LOWER KLMNOPQ!"]
    expected = torch.cat(
        [sketch(_peft_gradient(model, folder, tokenizer(p, return_tensors="pt").input_ids))
         for p in prompts]
    )  # fmt: skip
    assert all(p.grad is None for p in model.parameters())  # PEFT left the model as it was
    routed = route(model, {"base": folder}, PromptGradients(sketch, "base"))
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        features = prompt_features(routed, batch.input_ids, batch.attention_mask)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    tokenizer.padding_side = "right"
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    assert features[0] @ features[1] < 0.99  # different prompts, different directions
    # The features of a routed model are its base adapter's whatever the model does otherwise.
    with torch.no_grad():
        again = prompt_features(routed.model, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(again, features, atol=1e-5, rtol=0)


def test_the_sketch_is_its_seed_and_keeps_inner_products():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30_000, generator=generator)
    x[1] = 0.6 * x[0] + 0.8 * x[1]  # cosine about 0.6
    cosine = torch.nn.functional.cosine_similarity(x[0], x[1], dim=0)
    parts = {"m.lora_A": x[:, :10_000], "m.lora_B": x[:, 10_000:]}
    sketched = CountSketch(dim=4096, seed=7)(parts)
    assert abs(float(sketched[0] @ sketched[1]) - float(cosine)) < 0.1  # about 5 sigma
    torch.testing.assert_close(CountSketch(dim=4096, seed=7)(parts), sketched)
    assert not torch.allclose(CountSketch(dim=4096, seed=8)(parts), sketched)
    with pytest.raises(RoutingError, match="positive"):
        CountSketch(dim=0)


def test_prompts_without_a_loss_are_refused(tokenizer, tmp_path):
    model = tiny_model()
    folder = make_random_expert(model, tmp_path / "base", rank=4)
    routed = route(model, {"base": folder}, PromptGradients(CountSketch(64), "base"))
    batch = tokenizer(["a prompt", ""], return_tensors="pt", padding=True)
    with pytest.raises(RoutingError, match="prompt row 1 has 0 token"):
        prompt_features(routed, batch.input_ids, batch.attention_mask)
    with pytest.raises(RoutingError, match="not routed with ELREA"):
        prompt_features(routed.unroute(), batch.input_ids, batch.attention_mask)
