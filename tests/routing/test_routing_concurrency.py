"""One routed model, several callers at once: each call has its own routing (experts, sequence
choices, strategy) and its own trace, and a streamed generation's trace can be read while it
grows."""

import contextvars
import threading

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from quiver.errors import RoutingError
from quiver.routing import Arrow, Merge, route
from quiver.testing import tiny_model, tiny_tokenizer

NEW_TOKENS = 6
OPTIONS = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


class Lockstep(StoppingCriteria):
    """Makes concurrent generations wait for each other after every token, so their steps
    interleave on the shared layers."""

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier = barrier

    def __call__(self, input_ids, scores, **kwargs):
        self.barrier.wait(timeout=30)
        return torch.zeros(len(input_ids), dtype=torch.bool)


def run_together(calls):
    """Run ``calls`` (functions of a stopping-criteria list) in threads, in lockstep."""
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), []

    def work(i, call):
        try:
            barrier.wait(timeout=30)
            results[i] = call(StoppingCriteriaList([Lockstep(barrier)]))
        except Exception as error:  # surfaced below, in the test's thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return results


def test_concurrent_oracle_generations_keep_their_own_expert_and_trace(llama, expert_paths):
    routed = route(llama, expert_paths(llama, n=3), "oracle")
    prompts = {"e0": torch.tensor([[5, 6, 7, 8]]), "e2": torch.tensor([[9, 10, 11]])}

    def generate(expert, stopping=None):
        with routed.use_expert(expert), routed.trace() as trace:
            out = routed.generate(prompts[expert], stopping_criteria=stopping, **OPTIONS)
        return out, trace

    alone = {expert: generate(expert)[0] for expert in prompts}
    together = run_together([lambda s, e=e: generate(e, s) for e in prompts])
    for (expert, prompt), (out, trace) in zip(prompts.items(), together, strict=True):
        assert torch.equal(out, alone[expert])
        assert trace.steps == NEW_TOKENS
        own = torch.zeros(3).index_fill_(0, torch.tensor(int(expert[1])), 1.0)
        for module in trace.modules:
            weights = trace.module_weights(module)
            assert weights.shape == (1, prompt.shape[1] + NEW_TOKENS - 1, 3)
            assert torch.equal(weights, own.expand_as(weights))


def test_concurrent_sequence_routed_generations_choose_and_trace_alone(llama, expert_paths):
    routed = route(llama, expert_paths(llama, n=5), Arrow(top_k=2, granularity="sequence"))
    prompts = [torch.tensor([[11, 12, 13, 14, 15]]), torch.tensor([[201, 202]])]

    def generate(prompt, stopping=None):
        with routed.trace() as trace:
            out = routed.generate(prompt, stopping_criteria=stopping, **OPTIONS)
        return out, trace

    alone = [generate(prompt) for prompt in prompts]
    together = run_together([lambda s, p=p: generate(p, s) for p in prompts])
    assert not torch.equal(alone[0][1].choices[0].index, alone[1][1].choices[0].index)
    for (out, trace), (expected, expected_trace) in zip(together, alone, strict=True):
        assert torch.equal(out, expected)
        assert len(trace.choices) == 1
        assert torch.equal(trace.choices[0].index, expected_trace.choices[0].index)
        assert trace.to_dict() == expected_trace.to_dict()


def test_a_streamed_generation_trace_grows_one_step_per_token(llama, expert_paths):
    """The app's pattern: generate in a worker thread that shares the trace through
    contextvars.copy_context(), and read the trace while the text streams."""
    routed = route(llama, expert_paths(llama, n=4), Arrow(top_k=2))
    tokenizer = tiny_tokenizer()
    prompt = torch.tensor([[40, 41, 42, 43]])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    seen_steps = []
    with routed.trace() as trace:
        worker = threading.Thread(
            target=contextvars.copy_context().run,
            args=(routed.generate, prompt),
            kwargs=dict(streamer=streamer, pad_token_id=0, **OPTIONS),
        )
        worker.start()
        for _ in streamer:
            steps = trace.steps
            weights = trace.step_weights()  # complete steps only; the worker may add one meanwhile
            assert weights.shape[0] == 1 and weights.shape[2] == 4
            assert steps <= weights.shape[1] <= trace.steps
            seen_steps.append(weights.shape[1])
        worker.join(timeout=60)
    assert seen_steps == sorted(seen_steps) and trace.steps == NEW_TOKENS
    with routed.trace() as direct:
        routed.generate(prompt, pad_token_id=0, **OPTIONS)
    torch.testing.assert_close(trace.step_weights(), direct.step_weights())
    weights = trace.step_weights()[0]
    torch.testing.assert_close(weights.sum(-1), torch.ones(NEW_TOKENS))
    layers = trace.step_layer_weights()
    torch.testing.assert_close(torch.stack(list(layers.values())).mean(0)[0], weights)


def test_concurrent_callers_each_route_by_the_strategy_they_chose(llama, expert_paths):
    paths = expert_paths(llama, n=3)
    routed = route(llama, paths, "oracle")
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    strategies = {"uniform": Merge(), "arrow": Arrow(top_k=2)}

    def generate(strategy, stopping=None):
        with routed.using(strategy), routed.trace() as trace:
            out = routed.generate(prompt, stopping_criteria=stopping, **OPTIONS)
        return out, trace

    together = run_together([lambda s, k=k: generate(strategies[k], s) for k in strategies])
    for (name, strategy), (out, trace) in zip(strategies.items(), together, strict=True):
        alone = route(tiny_model("llama"), paths, strategy).generate(prompt, **OPTIONS)
        assert torch.equal(out, alone), name
        weights = trace.module_weights("model.layers.1.mlp.up_proj")
        chosen = (weights > 0).sum(-1)
        assert (chosen == (3 if name == "uniform" else 2)).all(), name
    with routed.using("base"), torch.no_grad():
        torch.testing.assert_close(routed(prompt).logits, tiny_model("llama")(prompt).logits)
    with pytest.raises(RoutingError, match=r"no expert to use"), torch.no_grad():
        routed(prompt)  # outside using(), the model's own strategy: the oracle
