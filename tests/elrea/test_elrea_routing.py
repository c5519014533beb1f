"""ELREA routing: each prompt's weights from its gradient, one batched logit ensemble that
equals the per-adapter ensemble, in forward and in generate (KV cache, per-row weights)."""

import threading

import pytest
import torch
from elrea_helpers import (
    ensemble_logits,
    greedy_reference,
    peft_logits,
    peft_members,
    planted_pairs,
    until_eos,
)

from quiver.errors import IncompatibleExpertError, RoutingError
from quiver.registry import Library
from quiver.routing import route
from quiver.routing.elrea import ELREA, ensemble_choice
from quiver.testing import make_random_expert, tiny_model

EOS = 2


def _prompts(tokenizer, kinds, seed=1):
    tokenizer.padding_side = "left"
    batch = tokenizer(
        [p for p, _ in planted_pairs(kinds, seed=seed)], return_tensors="pt", padding=True
    )
    tokenizer.padding_side = "right"
    return batch


def test_new_prompts_weigh_their_kinds_expert_most(planted, tokenizer):
    _, library, _, _ = planted
    kinds = [0, 1, 2] * 4
    batch = _prompts(tokenizer, kinds)
    routed = route(tiny_model(), library, "elrea")
    choice = ensemble_choice(routed, batch.input_ids, batch.attention_mask)
    names = routed.expert_names
    weights = torch.zeros(len(kinds), len(names)).scatter(1, choice.index, choice.weights)
    torch.testing.assert_close(weights.sum(1), torch.ones(len(kinds)))
    heaviest = [names[i] for i in weights.argmax(1).tolist()]
    assert heaviest == [f"cluster-{kind}" for kind in kinds]  # cluster c holds kind c
    rows = choice.as_dicts(names)
    assert list(rows[0]) == list(names) and rows[0]["cluster-0"] == weights[0, 1].item()
    # A colder softmax sharpens the same choice; top-k keeps the heaviest, renormalised.
    cold = route(tiny_model(), library, ELREA(temperature=0.1))
    sharp = ensemble_choice(cold, batch.input_ids, batch.attention_mask)
    assert (sharp.weights.max(1).values > weights.max(1).values).all()
    top2 = route(tiny_model(), library, "elrea", top_k=2)
    pair = ensemble_choice(top2, batch.input_ids, batch.attention_mask)
    top, index = weights.topk(2, dim=1)
    assert torch.equal(pair.index, index)
    torch.testing.assert_close(pair.weights, top / top.sum(1, keepdim=True))


@pytest.mark.parametrize("member", ["cluster-1", "base"])
def test_all_weight_on_one_member_gives_its_logits_and_tokens(planted, tokenizer, member):
    _, library, _, _ = planted
    folder = library.expert_paths()[member]
    batch = _prompts(tokenizer, [0, 1, 2])
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    routed = route(tiny_model(), library, "elrea", top_k=None, weights={member: 1.0})
    with torch.no_grad():
        logits = routed(**inputs).logits
    torch.testing.assert_close(
        logits, peft_logits(tiny_model(), folder, **inputs), atol=2e-5, rtol=0
    )
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    peft_model = peft_members(tiny_model(), {member: folder})
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        loss = routed(**inputs, labels=labels).loss
        torch.testing.assert_close(loss, peft_model(**inputs, labels=labels).loss)
    assert torch.equal(
        routed.generate(**inputs, **settings), peft_model.generate(**inputs, **settings)
    )


def test_generation_is_each_rows_own_ensemble_with_the_cache(planted, tokenizer):
    _, library, _, _ = planted
    kinds = [0, 1, 2]
    batch = _prompts(tokenizer, kinds)
    routed = route(tiny_model(), library, "elrea", top_k=3)
    choice = ensemble_choice(routed, batch.input_ids, batch.attention_mask)
    out = routed.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    peft_model = peft_members(tiny_model(), library.expert_paths())
    width = batch.input_ids.shape[1]
    for row, members in enumerate(choice.as_dicts(routed.expert_names)):
        prompt = batch.input_ids[row, batch.attention_mask[row].bool()][None]
        expected = greedy_reference(peft_model, members, prompt, steps=6, eos=EOS)
        assert until_eos(out[row, width:].tolist(), EOS) == expected
    # The forward's logits are the same ensemble, row by row, padding and all.
    with torch.no_grad():
        logits = routed(**batch).logits
    for row, members in enumerate(choice.as_dicts(routed.expert_names)):
        mask = batch.attention_mask[row].bool()
        expected = ensemble_logits(peft_model, members, batch.input_ids[row, mask][None])
        torch.testing.assert_close(logits[row, mask], expected[0], atol=2e-5, rtol=0)
    # Sampling works with the cache too, and a seed repeats it.
    sampled = [
        (
            torch.manual_seed(3),
            routed.generate(**batch, max_new_tokens=6, do_sample=True, pad_token_id=0),
        )[1]
        for _ in range(2)
    ]
    assert torch.equal(sampled[0], sampled[1]) and torch.equal(
        sampled[0][:, :width], batch.input_ids
    )


def test_concurrent_generations_keep_their_own_ensembles(planted, tokenizer):
    _, library, _, _ = planted
    routed = route(tiny_model(), library, "elrea", top_k=2)
    batches = [_prompts(tokenizer, [kind], seed=5) for kind in range(3)]
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone = [routed.generate(**batch, **settings) for batch in batches]
    together = [None] * 3

    def run(i):
        together[i] = routed.generate(**batches[i], **settings)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))


def test_bf16_routes_and_generates_close_to_float32(planted, tokenizer):
    _, library, _, _ = planted
    batch = _prompts(tokenizer, [0, 1, 2])
    full = ensemble_choice(
        route(tiny_model(), library, "elrea"), batch.input_ids, batch.attention_mask
    )
    routed = route(tiny_model(dtype=torch.bfloat16), library, "elrea")
    half = ensemble_choice(routed, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(half.weights, full.weights, atol=0.05, rtol=0)
    out = routed.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    width = batch.input_ids.shape[1]
    assert out.shape[1] > width and torch.equal(out[:, :width], batch.input_ids)


def test_unroute_removes_the_ensemble(planted, tokenizer):
    _, library, _, _ = planted
    model, plain = tiny_model(), tiny_model()
    batch = _prompts(tokenizer, [0, 1])
    route(model, library, "elrea").unroute()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain(**batch).logits)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_bad_libraries_and_inputs_are_refused(planted, tokenizer, tmp_path):
    registry, library, _, _ = planted
    paths = library.expert_paths()
    bare = Library.create(registry, "me/bare", base_model=library.manifest.base_model)
    for name in ("base", "cluster-0"):
        bare.add(paths[name], name=name)
    with pytest.raises(RoutingError, match="no 'elrea' artifact"):
        route(tiny_model(), bare, "elrea")
    bare.add_artifact("elrea", library.artifact_path("elrea"))
    with pytest.raises(IncompatibleExpertError, match="the library has"):
        route(tiny_model(), bare, "elrea")
    model = tiny_model()
    wider = {name: make_random_expert(model, tmp_path / name, rank=8) for name in library.names}
    other = Library.create(registry, "me/rank8", base_model=library.manifest.base_model)
    for name, folder in wider.items():
        other.add(folder, name=name)
    other.add_artifact("elrea", library.artifact_path("elrea"))
    with pytest.raises(IncompatibleExpertError, match="gradients of size"):
        route(model, other, "elrea")
    with pytest.raises(RoutingError, match="top_k=5"):
        route(tiny_model(), library, "elrea", top_k=5)
    options = [
        ({"top_k": 1.5}, "top_k must be at least 1"),  # a raw TypeError from topk before
        ({"top_k": True}, "top_k must be at least 1"),
        ({"temperature": float("inf")}, "temperature must be positive and finite"),
        ({"temperature": "1"}, "temperature must be positive and finite"),
        ({"weights": {"base": float("inf")}}, "not a finite number"),  # NaN weights before
    ]
    for option, message in options:
        with pytest.raises(RoutingError, match=message):
            route(tiny_model(), library, "elrea", **option)

    routed = route(tiny_model(), library, "elrea")
    empty = tokenizer(["sum 1 2 =", ""], return_tensors="pt", padding=True)
    with pytest.raises(RoutingError, match="prompt row 1 has 0 token"):
        routed.generate(**empty, max_new_tokens=2, pad_token_id=0)
    batch = _prompts(tokenizer, [0])
    with pytest.raises(RoutingError, match="token ids"):
        routed(inputs_embeds=routed.get_input_embeddings()(batch.input_ids))
    with pytest.raises(RoutingError, match="not beam search"):
        routed.generate(**batch, max_new_tokens=3, num_beams=2, pad_token_id=0)
    with pytest.raises(RoutingError, match="inner modules"):
        routed.model.model(**batch)  # the backbone, past the hooks


def test_the_trace_shows_each_prompts_weights(planted, tokenizer):
    _, library, _, _ = planted
    routed = route(tiny_model(), library, "elrea", top_k=2)
    batch = _prompts(tokenizer, [0, 2])
    choice = ensemble_choice(routed, batch.input_ids, batch.attention_mask)
    with routed.trace() as trace:
        routed.generate(
            **batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0
        )
    [recorded] = trace.choices  # one choice per generation, none for the gradient pass
    assert torch.equal(recorded.index, choice.index)
    torch.testing.assert_close(recorded.weights, choice.weights)
    dense = torch.zeros(2, len(routed.expert_names)).scatter(1, choice.index, choice.weights)
    steps = 1 + 3  # the prompt's pass, then one pass per generated token but the last
    assert trace.steps == steps and set(trace.modules) == set(routed.routed_layers)
    for weights in trace.layer_weights().values():  # original rows, every position
        assert weights.shape == (2, batch.input_ids.shape[1] + 3, len(routed.expert_names))
        torch.testing.assert_close(weights, dense[:, None].expand_as(weights))
    assert trace.to_dict(1)["sequence"] == [pytest.approx(choice.as_dicts(routed.expert_names)[1])]


def test_using_elrea_on_a_model_routed_otherwise(planted, tokenizer):
    _, library, _, _ = planted
    batch = _prompts(tokenizer, [1, 2])
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    routed = route(tiny_model(), library, "arrow", top_k=2)
    with routed.using("elrea", top_k=2):
        ours = routed.generate(**batch, **settings)
    expected = route(tiny_model(), library, "elrea", top_k=2).generate(**batch, **settings)
    assert torch.equal(ours, expected)
    with torch.no_grad():  # outside the block the model routes by Arrow again
        arrow = route(tiny_model(), library, "arrow", top_k=2)(**batch).logits
        torch.testing.assert_close(routed(**batch).logits, arrow)


def test_teacher_forced_rows_are_weighted_by_their_prompt_alone(planted, tokenizer):
    """``prompt_lengths``: prompt + answer rows (right-padded) in one forward get the weights
    of their prompts alone, and each row's logits are that prompt's ensemble."""
    _, library, _, _ = planted
    pairs = planted_pairs([0, 2, 1], seed=3)
    prompts = [tokenizer(p)["input_ids"] for p, _ in pairs]
    rows = [tokenizer(p + " " + a)["input_ids"] for p, a in pairs]
    assert all(row[: len(p)] == p for row, p in zip(rows, prompts, strict=True))

    def padded(seqs):
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        return ids, mask

    ids, mask = padded(rows)
    routed = route(tiny_model(), library, "elrea")
    alone = ensemble_choice(routed, *padded(prompts))
    with torch.no_grad(), routed.trace() as trace:
        logits = routed(input_ids=ids, attention_mask=mask, prompt_lengths=list(map(len, prompts)))
        routed(input_ids=ids, attention_mask=mask)  # no prompt_lengths: the whole rows
    ours, whole = trace.choices
    torch.testing.assert_close(ours.weights, alone.weights)
    assert not torch.allclose(whole.weights, alone.weights, atol=1e-4)  # the answers move it
    names = routed.expert_names
    for row, weights in enumerate(alone.as_dicts(names)):
        fixed = route(tiny_model(), library, "elrea", weights=weights)
        length = len(rows[row])
        with torch.no_grad():
            expected = fixed(input_ids=ids[row : row + 1, :length]).logits[0]
        torch.testing.assert_close(logits.logits[row, :length], expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(RoutingError, match="prompt_lengths is for sequence-level routing"):
        route(tiny_model(), library, "uniform")(input_ids=ids, prompt_lengths=[2, 2, 2])


def test_a_forward_without_a_cache_raises_no_deprecation_warning(planted, tokenizer, monkeypatch):
    """Looking for a KV cache the forward did not make must not touch transformers 5's
    deprecated ``past_key_values`` (it warns on every run of a scoring loop's first forward)."""
    from transformers.utils import generic

    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda *args, **kwargs: warned.append(args))
    _, library, pairs, _ = planted
    routed = route(tiny_model(), library, "elrea")
    ids = torch.tensor([tokenizer(pairs[0][0])["input_ids"]])
    with torch.no_grad():
        routed(input_ids=ids, use_cache=False)
        routed(input_ids=ids, use_cache=True)
    assert warned == []
