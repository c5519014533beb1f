"""The toy world's tasks: seeded, split without overlap, clusters by input domain, typed errors."""

import random

import pytest

from quiver.errors import InvalidInputError
from quiver.toyworld import tasks as world
from quiver.toyworld.tasks import CLUSTERS, HELD_OUT, TASKS, Domain, Task, get_tasks


def test_sixteen_training_tasks_in_four_clusters_with_disjoint_input_domains():
    assert len(TASKS) >= 16
    assert {t.cluster for t in TASKS} == set(CLUSTERS) and len(CLUSTERS) == 4
    for cluster in CLUSTERS:
        assert sum(t.cluster == cluster for t in TASKS) == 4
    inputs = {c: set(world.DOMAINS[c].symbols) for c in CLUSTERS}
    for a in CLUSTERS:
        for b in CLUSTERS:
            assert a == b or not inputs[a] & inputs[b]


def test_examples_are_seeded_and_answers_follow_the_domain_mapping():
    task = get_tasks(["letters-ends"])[0]
    first, again = task.examples(50, seed=3), task.examples(50, seed=3)
    assert first == again and first != task.examples(50, seed=4)
    for example in first:
        instruction, inputs = example.prompt.split(" : ")
        assert instruction == "map ends"
        letters = inputs.split()
        domain = world.DOMAINS["letters"]
        assert example.answer.split() == [domain.map(letters[0]), domain.map(letters[-1])]


def test_each_domain_maps_by_a_seeded_permutation_of_its_own_symbols():
    for domain in world.DOMAINS.values():
        assert len(domain.symbols) == world.TABLE_SIZE
        assert sorted(domain.outputs) == sorted(domain.symbols)
        assert domain.outputs != domain.symbols


def test_train_and_eval_splits_never_share_an_input():
    for task in (*TASKS[:4], *HELD_OUT[:3]):
        train = {e.prompt for e in task.examples(400, split="train")}
        held = {e.prompt for e in task.examples(100, split="eval")}
        assert train and held and not train & held


def test_held_out_tasks_are_new_instructions_over_a_trained_cluster():
    trained = {t.instruction for t in TASKS}
    assert {t.kind for t in HELD_OUT} == {"paraphrase", "new format"}
    for task in HELD_OUT:
        assert task.held_out and task.cluster in CLUSTERS
        assert task.instruction not in trained


def test_anyone_can_add_a_task():
    def generate(rng: random.Random):
        word = rng.choice(["cat", "dog"])
        return [word], [word.upper()]

    task = Task("shout", "animals", "copy each", generate)
    examples = task.examples(5, seed=0)
    assert all(e.answer == e.prompt.split()[-1].upper() for e in examples)


def test_bad_input_is_a_typed_error():
    with pytest.raises(InvalidInputError, match="no-such-task"):
        get_tasks(["numbers-each", "no-such-task"])
    with pytest.raises(InvalidInputError, match="split"):
        TASKS[0].examples(3, split="test")
    with pytest.raises(InvalidInputError, match="kind"):
        Task("t", "c", "copy each", lambda rng: ([], []), kind="other")
    with pytest.raises(InvalidInputError):
        Domain("bad", ("a", "a"), ("b", "c"))
    tiny = Task("one", "c", "copy each", lambda rng: (["cat"], ["cat"]))
    with pytest.raises(InvalidInputError, match="cannot give"):
        tiny.examples(1, split="eval")  # its only input hashes to the train split


def test_one_task_name_is_taken_as_a_name_not_its_letters():
    assert get_tasks(TASKS[0].name) == [TASKS[0]]
