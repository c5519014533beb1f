"""The evaluation harness: one teacher-forced forward per batch, padding-blind, with routing
diagnostics for routed models."""

import pytest
import torch
from transformers import LlamaForCausalLM

from quiver.errors import InvalidInputError
from quiver.routing import Arrow, route
from quiver.testing import make_random_expert
from quiver.toyworld.evaluate import evaluate, score_examples
from quiver.toyworld.model import build_tokenizer, encode, model_config
from quiver.toyworld.tasks import TASKS


@pytest.fixture(scope="module")
def toy():
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    return LlamaForCausalLM(model_config(tokenizer, hidden=32, layers=2, mlp=64)).eval(), tokenizer


def test_scores_in_a_padded_batch_equal_scores_one_by_one(toy):
    model, tokenizer = toy
    examples = TASKS[0].examples(3) + TASKS[1].examples(3)  # answers of different lengths
    batch = score_examples(model, tokenizer, examples)
    for row, example in enumerate(examples):
        alone = score_examples(model, tokenizer, [example])
        torch.testing.assert_close(batch["nll"][row], alone["nll"][0])
        prompt, answer = encode(tokenizer, example)
        logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        predicted = logits.argmax(-1)
        assert batch["tokens"][row] == len(answer)
        assert batch["token_hits"][row] == (predicted == torch.tensor(answer)).sum()
        assert batch["correct"][row] == bool((predicted == torch.tensor(answer)).all())
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum")
        torch.testing.assert_close(batch["nll"][row], expected)


def test_evaluation_reports_every_metric_per_task(toy):
    model, tokenizer = toy
    result = evaluate(model, tokenizer, TASKS[:2], examples=10, batch_size=4)
    assert [r.task for r in result.results] == [TASKS[0].name, TASKS[1].name]
    for r in result.results:
        assert r.examples == 10 and 0 <= r.exact_match <= r.token_accuracy <= 1
        assert r.answer_nll > 0 and r.routing is None
    assert result.mean() == pytest.approx(sum(r.exact_match for r in result.results) / 2)
    assert result.right_cluster() is None


def test_routed_models_get_per_layer_routing_diagnostics(toy, tmp_path):
    model, tokenizer = toy
    experts = {
        name: make_random_expert(model, tmp_path / name, rank=4, seed=i)
        for i, name in enumerate(["a", "b", "c"])
    }
    routed = route(model, experts, Arrow(top_k=2))
    try:
        task = TASKS[0]
        own = evaluate(routed, tokenizer, [task], examples=8, expert_clusters={"a": task.cluster})
        everyone = dict.fromkeys(experts, task.cluster)
        all_right = evaluate(routed, tokenizer, [task], examples=8, expert_clusters=everyone)
    finally:
        routed.unroute()
    routing = own.results[0].routing
    assert sorted(routing) == [0, 1]  # one entry per layer
    for layer in routing.values():
        assert set(layer.top1) <= set(experts)
        assert sum(layer.top1.values()) == pytest.approx(1.0)
        assert layer.right_cluster == pytest.approx(layer.top1.get("a", 0.0))
    assert all_right.right_cluster() == pytest.approx(1.0)
    # Scores do not depend on whether routing is being recorded.
    assert own.results[0].answer_nll == pytest.approx(all_right.results[0].answer_nll)


def test_no_tasks_is_a_typed_error(toy):
    with pytest.raises(InvalidInputError):
        evaluate(*toy, [])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"examples": 0}, "examples must be a positive integer"),  # ZeroDivisionError before
        ({"batch_size": 0}, "batch_size must be a positive integer"),  # range() step 0
        ({"examples": 2.5}, "examples must be a positive integer"),
        ({"oracle": {}}, "the oracle names no expert for"),  # KeyError mid-run
    ],
)
def test_bad_settings_are_typed_errors_before_scoring(toy, options, message):
    with pytest.raises(InvalidInputError, match=message):
        evaluate(*toy, TASKS[:1], **options)
