"""Arrow at sequence granularity: one choice per row from its prompt, kept for the whole
sequence, against a hand computation, planted inputs, fixed merges and per-row runs."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from quiver.errors import RoutingError
from quiver.routing import Arrow, Merge, compute_arrow_prototypes, route
from quiver.testing import LORA_TARGETS, make_random_expert, tiny_model

PROMPTS = [[11, 12, 13, 14, 15, 16], [21, 22], [31, 32, 33, 34]]


def module_inputs(model, ids):
    """Every LoRA-targeted layer's input for one unpadded prompt, from the plain base model."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS[model.config.model_type]:
            hook = module.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, a[0]))
            hooks.append(hook)
    with torch.no_grad():
        model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return {name: x[0] for name, x in seen.items()}


def reference_choice(paths, prompt, top_k, temperature, ignored=(), layers=None):
    """The definition, by hand: per module (of blocks ``layers``, default all) the mean |x . p_e|
    over the prompt's tokens (but those ``ignored``), divided by its sum over experts; summed
    over modules; top-k; softmax at the temperature."""
    prototypes = compute_arrow_prototypes(paths).vectors
    kept = torch.tensor([token not in ignored for token in prompt])
    total = sum(
        (x[kept] @ prototypes[name].T).abs().mean(0)
        / (x[kept] @ prototypes[name].T).abs().mean(0).sum()
        for name, x in module_inputs(tiny_model("llama"), prompt).items()
        if layers is None or int(name.split(".layers.")[1].split(".")[0]) in layers
    )
    top, index = total.topk(top_k)
    return index, (top / temperature).softmax(-1), total


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return ids, (ids != 0).long()


@pytest.fixture
def sequence_routed(llama, expert_paths):
    paths = expert_paths(llama, n=5)
    return route(llama, paths, Arrow(top_k=2, temperature=0.5, granularity="sequence")), paths


def test_each_padded_row_chooses_as_the_hand_computed_reference(sequence_routed):
    routed, paths = sequence_routed
    ids, mask = left_padded(PROMPTS)
    right = torch.tensor([p + [0] * (6 - len(p)) for p in PROMPTS])
    choices = [
        routed.choose_experts(ids, attention_mask=mask),
        routed.choose_experts(right, attention_mask=(right != 0).long()),
    ]
    for row, prompt in enumerate(PROMPTS):
        index, weights, total = reference_choice(paths, prompt, top_k=2, temperature=0.5)
        for choice in choices:
            assert torch.equal(choice.index[row], index)
            torch.testing.assert_close(choice.weights[row], weights, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(choice.scores[row], total, atol=1e-5, rtol=1e-5)


def test_ignored_tokens_are_scored_by_no_expert(llama, expert_paths):
    """``ignore_token_ids`` (a chat template's tokens): those positions still shape the others'
    hidden states, but add nothing to the prompt's scores."""
    paths = expert_paths(llama, n=5)
    ignored = (11, 21, 34, 99)
    arrow = Arrow(top_k=2, temperature=0.5, granularity="sequence", ignore_token_ids=ignored)
    routed = route(llama, paths, arrow)
    ids, mask = left_padded(PROMPTS)
    choice = routed.choose_experts(ids, attention_mask=mask)
    for row, prompt in enumerate(PROMPTS):
        index, weights, total = reference_choice(paths, prompt, 2, 0.5, ignored=ignored)
        torch.testing.assert_close(choice.weights[row], weights, atol=1e-5, rtol=1e-5)
        assert torch.equal(choice.index[row], index)
        torch.testing.assert_close(choice.scores[row], total, atol=1e-5, rtol=1e-5)
        _, _, everything = reference_choice(paths, prompt, 2, 0.5)
        assert not torch.allclose(total, everything, atol=1e-3)  # the option changed the scores
    routed.unroute()


def test_ignore_token_ids_is_checked(llama, expert_paths):
    with pytest.raises(RoutingError, match="sequence-level"):
        Arrow(ignore_token_ids=(1,))
    routed = route(llama, expert_paths(llama, n=2), "arrow", top_k=1, granularity="sequence",
                   ignore_token_ids=[21, 22])  # fmt: skip
    with pytest.raises(RoutingError, match="no prompt token"):  # row 1 is all ignored
        routed.choose_experts(*left_padded(PROMPTS))
    embeds = llama.get_input_embeddings()(torch.tensor([PROMPTS[0]]))
    with pytest.raises(RoutingError, match="input_ids"):
        routed.choose_experts(inputs_embeds=embeds)


def test_prompt_layers_score_the_prompt_at_those_blocks_only(llama, expert_paths):
    """``prompt_layers``: only the modules of those blocks add their scores; every module still
    adds the chosen experts' updates."""
    paths = expert_paths(llama, n=5)
    arrow = Arrow(top_k=2, temperature=0.5, granularity="sequence", prompt_layers=[0])
    assert arrow.prompt_layers == (0,)
    routed = route(llama, paths, arrow)
    ids, mask = left_padded(PROMPTS)
    choice = routed.choose_experts(ids, attention_mask=mask)
    for row, prompt in enumerate(PROMPTS):
        index, weights, total = reference_choice(paths, prompt, 2, 0.5, layers=(0,))
        torch.testing.assert_close(choice.scores[row], total, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(choice.weights[row], weights, atol=1e-5, rtol=1e-5)
        assert torch.equal(choice.index[row], index)
        _, _, everything = reference_choice(paths, prompt, 2, 0.5)
        assert not torch.allclose(total, everything, atol=1e-3)  # the option changed the scores
    with routed.trace() as trace, torch.no_grad():
        routed(ids, attention_mask=mask)
    assert {int(m.split(".layers.")[1].split(".")[0]) for m in trace.modules} == set(
        range(llama.config.num_hidden_layers)
    )  # every block still adds the chosen experts
    routed.unroute()


def test_prompt_layers_is_checked(llama, expert_paths):
    with pytest.raises(RoutingError, match="sequence-level"):
        Arrow(prompt_layers=(0,))
    for bad in ((), (-1,), (0.5,), (True,)):
        with pytest.raises(RoutingError, match="layer numbers"):
            Arrow(granularity="sequence", prompt_layers=bad)
    experts = expert_paths(llama, n=2)
    for layers in ((9,), (0, 9)):  # one block the experts do not adapt is enough to refuse
        with pytest.raises(RoutingError, match=r"no routed module lies in prompt_layers \[9\]"):
            route(llama, experts, Arrow(1, granularity="sequence", prompt_layers=layers))


def test_teacher_forced_rows_route_by_their_prompt_as_a_fixed_merge(sequence_routed, tmp_path):
    """prompt + answer rows with per-row prompt lengths: the choice is the prompt's alone, and
    the logits are those of the merge of the chosen experts with the chosen weights."""
    routed, paths = sequence_routed
    answers = [[40, 41, 42], [50], [60, 61]]
    rows = [p + a for p, a in zip(PROMPTS, answers, strict=True)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = (ids != 0).long()
    lengths = [len(p) for p in PROMPTS]
    with torch.no_grad():
        logits = routed(ids, attention_mask=mask, prompt_lengths=lengths).logits
    for row, prompt in enumerate(PROMPTS):
        index, weights, _ = reference_choice(paths, prompt, top_k=2, temperature=0.5)
        chosen = {f"e{e}": w for e, w in zip(index.tolist(), weights.tolist(), strict=True)}
        merged = route(tiny_model("llama"), paths, Merge(chosen, mixing="outputs"))
        with torch.no_grad():
            expected = merged(ids[row : row + 1, : len(rows[row])]).logits[0]
        torch.testing.assert_close(logits[row, : len(rows[row])], expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(RoutingError, match=r"2 prompt lengths for a batch of 3"):
        routed(ids, attention_mask=mask, prompt_lengths=lengths[:2])


def test_generation_keeps_each_rows_choice_and_matches_one_prompt_at_a_time(sequence_routed):
    routed, _ = sequence_routed
    ids, mask = left_padded(PROMPTS)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with routed.trace() as trace:
        together = routed.generate(ids, attention_mask=mask, **options)[:, ids.shape[1] :]
    choice = routed.choose_experts(ids, attention_mask=mask)
    for row, prompt in enumerate(PROMPTS):
        alone = routed.generate(torch.tensor([prompt]), **options)[0, len(prompt) :]
        assert torch.equal(together[row], alone)
        dense = torch.zeros(5).index_put_((choice.index[row],), choice.weights[row])
        for module in trace.modules:  # every position of the row used the same experts
            weights = trace.module_weights(module)[row]
            torch.testing.assert_close(weights, dense.expand_as(weights), atol=1e-6, rtol=0)
    assert len(trace.choices) == 1 and torch.equal(trace.choices[0].index, choice.index)
    drawn = trace.to_dict(row=1)
    chosen = zip(choice.index[1].tolist(), choice.weights[1].tolist(), strict=True)
    expected = {f"e{e}": w for e, w in chosen}
    assert drawn["sequence"] == [pytest.approx(expected)]
    assert len(drawn["steps"]) == 4 and len(drawn["step_layers"]["0"]) == 4


def test_a_sequence_goes_to_the_expert_whose_prototype_matches_its_planted_inputs(llama, tmp_path):
    """Prompts of one repeated token give every position the same input at each module. Each
    expert's top direction is planted as the part of one prompt's input no other prompt shares,
    so the right expert is plain to see, but only summed over the prompt and modules."""
    prompts = [[40] * 5, [90] * 3, [140] * 6, [190] * 2]
    inputs = [module_inputs(llama, prompt) for prompt in prompts]
    paths = []
    for e in range(len(prompts)):
        folder = make_random_expert(llama, tmp_path / f"e{e}", spectral_gap=30.0, seed=e)
        tensors = load_file(folder / "adapter_model.safetensors")
        for name in inputs[0]:
            others = torch.stack([inputs[i][name][0] for i in range(len(prompts)) if i != e])
            own = inputs[e][name][0]
            # the part of this prompt's input orthogonal to every other prompt's input
            direction = own - others.T @ torch.linalg.lstsq(others.T, own).solution
            tensors[f"base_model.model.{name}.lora_A.weight"][0] = direction / direction.norm()
        save_file(tensors, folder / "adapter_model.safetensors")
        paths.append(folder)
    routed = route(llama, paths, Arrow(top_k=1, granularity="sequence"))
    ids, mask = left_padded(prompts)
    assert routed.choose_experts(ids, attention_mask=mask).index[:, 0].tolist() == [0, 1, 2, 3]


def test_bf16_sequence_routing_chooses_as_float32(expert_paths):
    model32 = tiny_model("llama")
    paths = expert_paths(model32, n=4, spectral_gap=6.0)
    ids, mask = left_padded(PROMPTS)
    strategy = Arrow(top_k=2, granularity="sequence")
    routed32 = route(model32, paths, strategy)
    routed16 = route(tiny_model("llama", dtype=torch.bfloat16), paths, strategy)
    choice32 = routed32.choose_experts(ids, attention_mask=mask)
    choice16 = routed16.choose_experts(ids, attention_mask=mask)
    assert torch.equal(choice16.index[:, 0], choice32.index[:, 0])
    torch.testing.assert_close(choice16.scores, choice32.scores, atol=0.05, rtol=0.05)
    with torch.no_grad():
        expected = routed32(ids, attention_mask=mask).logits
        logits = routed16(ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_sequence_routing_refuses_what_it_cannot_do(sequence_routed, llama):
    routed, paths = sequence_routed
    with pytest.raises(RoutingError, match=r"unknown granularity 'word'"):
        Arrow(granularity="word")
    with pytest.raises(RoutingError, match=r"no experts chosen for this call"):
        routed.model(torch.tensor([[5, 6]]))  # the inner model skips the prompt scoring
    with pytest.raises(RoutingError, match=r"a row has no prompt token"):
        routed.choose_experts(torch.tensor([[5, 6]]), attention_mask=torch.tensor([[0, 0]]))
    routed.unroute()
    per_token = route(llama, paths, Arrow(top_k=2))
    with pytest.raises(RoutingError, match=r"prompt_lengths is for sequence-level routing"):
        per_token(torch.tensor([[5, 6]]), prompt_lengths=[1])
    with pytest.raises(RoutingError, match=r"choose_experts\(\) is for sequence-level"):
        per_token.choose_experts(torch.tensor([[5, 6]]))
