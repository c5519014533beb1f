"""One expert: data formats, the filled card, determinism, and loading with plain PEFT."""

import copy
import json

import datasets
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from training_helpers import FAST, pairs, write_jsonl

from quiver.errors import NotFoundError, TrainingError
from quiver.registry import Expert, LocalRegistry, open_registry
from quiver.testing import tiny_model
from quiver.training import TrainConfig, evaluate, train_expert
from quiver.training.data import IGNORE_INDEX, load_examples, tokenize_examples
from quiver.training.trainer import lora_attached


def _weights(expert: Expert) -> dict[str, torch.Tensor]:
    return load_file(expert.path / "adapter_model.safetensors")


def test_expert_card_is_filled_and_eval_metrics_recorded(model, tokenizer, tmp_path):
    data = write_jsonl(
        tmp_path / "upper.jsonl", [{"prompt": p, "response": r} for p, r in pairs("upper")]
    )
    expert = train_expert(
        model,
        data,
        config=FAST,
        tokenizer=tokenizer,
        eval_data=pairs("upper")[:4],
        output_dir=tmp_path / "out",
    )
    card = expert.card
    assert card.tasks == ["upper"]  # the file's name
    assert (card.examples, card.steps, card.rank) == (10, 12, 4)
    assert card.epochs == pytest.approx(12 / 2)  # 10 examples at batch 8: 2 steps an epoch
    assert card.hyperparameters["learning_rate"] == FAST.learning_rate
    assert card.hyperparameters["seed"] == 0 and card.hyperparameters["init_seed"] == 0
    assert card.train_loss > 0
    assert card.target_modules == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    metrics = {r.metric_type: r.metric_value for r in card.eval_results}
    assert set(metrics) == {"loss", "token_accuracy"} and 0 <= metrics["token_accuracy"] <= 1
    # The card is on disk, so a re-read gives the same fields.
    assert Expert.from_folder(expert.path).card == card


def test_same_seeds_same_weights_bit_for_bit(model, tokenizer, tmp_path):
    def run(seed, name):
        return train_expert(
            model,
            pairs("reverse"),
            task="reverse",
            config=FAST,
            seed=seed,
            tokenizer=tokenizer,
            output_dir=tmp_path / name,
        )

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first.weights_sha256 == again.weights_sha256
    # PEFT saves target_modules from a set, in the order of this process's string hashes; sorted,
    # the config's bytes are the same in every process.
    saved = json.loads((first.path / "adapter_config.json").read_text())["target_modules"]
    assert saved == sorted(saved) and len(saved) == 7
    assert first.weights_sha256 != other.weights_sha256


def test_the_shared_init_seed_fixes_the_lora_init_and_the_model_is_restored(model):
    before = {name: p.clone() for name, p in model.named_parameters()}

    def initial_a(init_seed):
        with lora_attached(model, TrainConfig(init_seed=init_seed)) as peft_model:
            return {n: p.clone() for n, p in peft_model.named_parameters() if "lora_A" in n}

    first, same, other = initial_a(0), initial_a(0), initial_a(1)
    assert all(torch.equal(first[n], same[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)
    after = dict(model.named_parameters())
    assert set(after) == set(before)  # no LoRA layer left behind
    assert all(torch.equal(before[n], after[n]) and after[n].requires_grad for n in before)
    assert model.training is False


def test_pushed_expert_loads_with_plain_peft_and_beats_the_base(
    hub_server, model, tokenizer, tmp_path
):
    config = TrainConfig(rank=4, dropout=0.0, learning_rate=1e-2, max_steps=40, batch_size=8)
    expert = train_expert(model, pairs("upper"), task="upper", config=config, tokenizer=tokenizer)
    token = hub_server.create_token("trainer", write=True)
    hub = open_registry(hub_server.endpoint, token=token)
    published = hub.push(expert, "trainer/upper")
    local = LocalRegistry(tmp_path / "store")
    local.push(expert, "trainer/upper")

    base_loss = evaluate(model, tokenizer, pairs("upper"))["loss"]
    for source in ("trainer/upper", local.pull("trainer/upper").path):
        loaded = PeftModel.from_pretrained(tiny_model("llama", seed=0), source, cache_dir=tmp_path)
        assert evaluate(loaded, tokenizer, pairs("upper"))["loss"] < base_loss - 0.2
    pulled = hub.pull("trainer/upper", revision=published.commit)
    assert pulled.card.train_loss == expert.card.train_loss
    assert pulled.card.hyperparameters == expert.card.hyperparameters


def test_data_sources_agree(model, tokenizer, tmp_path):
    """A JSONL file, a Dataset in memory or on disk, and dicts all give the same examples."""
    records = [{"prompt": p, "completion": r} for p, r in pairs("double")]
    dataset = datasets.Dataset.from_list(records)
    dataset.save_to_disk(tmp_path / "saved")
    sources = [
        pairs("double"),
        write_jsonl(tmp_path / "double.jsonl", records),
        dataset,
        tmp_path / "saved",
        iter(records),
    ]
    expected = [(e.prompt, e.response) for e in load_examples(pairs("double"))]
    for source in sources:
        assert [(e.prompt, e.response) for e in load_examples(source)] == expected


def test_loss_covers_only_the_response(tokenizer):
    [pair] = tokenize_examples(load_examples([("up ab:", "AB")]), tokenizer, max_length=64)
    prompt = tokenizer("up ab:")["input_ids"]
    assert pair["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert pair["labels"][len(prompt) :] == tokenizer("AB")["input_ids"] + [tokenizer.eos_token_id]

    chat = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "HI"},
            {"role": "user", "content": "yo"},
            {"role": "assistant", "content": "YO"},
        ]
    }
    [features] = tokenize_examples(load_examples([chat]), tokenizer, max_length=256)
    learned = [
        t
        for t, label in zip(features["input_ids"], features["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    # The assistant turns' contents and their end-of-turn tokens, nothing of the user's.
    assert tokenizer.decode(learned) == "HI</s>YO</s>"


def test_model_and_tokenizer_by_local_path(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    expert = train_expert(tmp_path / "base", pairs("upper"), task="upper", config=FAST)
    assert expert.card.base_model == str(tmp_path / "base")
    loaded = PeftModel.from_pretrained(tiny_model("llama", seed=0), expert.path)
    assert (
        evaluate(loaded, tokenizer, pairs("upper"))["loss"]
        < evaluate(model, tokenizer, pairs("upper"))["loss"]
    )


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a",\n', "bad.jsonl:2: not valid JSON"),
        ("\n\n", "holds no examples"),
        ('{"question": "a"}\n', "bad.jsonl:1: an example needs 'prompt' and 'response'"),
        ('{"prompt": "a", "response": ""}\n', "bad.jsonl:1: the response is empty"),
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", ', "bad.jsonl:2: not UTF-8"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}\n',
            "bad.jsonl:1: 'messages' must be",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}, '
            '{"role": "assistant", "content": 5}]}\n',
            "bad.jsonl:1: 'messages' must be",
        ),
        ('{"messages": "user: a"}\n', "bad.jsonl:1: 'messages' must be"),
    ],
)
def test_bad_files_are_refused_naming_the_line(model, tokenizer, tmp_path, lines, message):
    write = (tmp_path / "bad.jsonl").write_bytes if isinstance(lines, bytes) else None
    (write or (tmp_path / "bad.jsonl").write_text)(lines)
    with pytest.raises(TrainingError, match=message):
        train_expert(model, tmp_path / "bad.jsonl", tokenizer=tokenizer, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()  # refused before any training


def test_other_bad_input_is_refused_before_training(model, tokenizer, tmp_path):
    too_long = [("x" * 300, "y")]  # the tiny model's context is 256 positions
    with pytest.raises(TrainingError, match=r"data, example 0: 30\d tokens, longer than"):
        train_expert(model, too_long, task="t", tokenizer=tokenizer)
    with pytest.raises(TrainingError, match="holds no examples"):
        train_expert(model, [], task="t", tokenizer=tokenizer)
    with pytest.raises(TrainingError, match="no training data at"):
        train_expert(model, tmp_path / "missing.jsonl", tokenizer=tokenizer)
    with pytest.raises(TrainingError, match="name the task"):
        train_expert(model, pairs("upper"), tokenizer=tokenizer)
    for source in (5, None):
        with pytest.raises(TrainingError, match="is not a data source"):
            train_expert(model, source, task="t", tokenizer=tokenizer)
    with pytest.raises(TrainingError, match="learning_rate must be a positive number"):
        TrainConfig(learning_rate=0)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    chat = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(TrainingError, match="the tokenizer has no chat template"):
        train_expert(model, chat, task="t", tokenizer=plain)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("rank", 2.5),
        ("rank", "4"),
        ("batch_size", True),
        ("max_steps", 0.5),
        ("init_seed", -1),
        ("learning_rate", float("inf")),
        ("alpha", "16"),
        ("max_grad_norm", 0),
        ("weight_decay", -0.1),
        ("extra", {"nonsense": 1}),
        ("extra", {"seed": 3}),  # TrainConfig's and train_expert's own settings
    ],
)
def test_a_config_of_the_wrong_type_or_range_is_refused(setting, value):
    with pytest.raises(TrainingError, match=f"TrainConfig.{setting}"):
        TrainConfig(**{setting: value})


def test_a_diverged_training_writes_nothing(model, tokenizer, tmp_path):
    exploding = TrainConfig(max_steps=3, learning_rate=1e30, max_grad_norm=1e30, dropout=0.0)
    with pytest.raises(TrainingError, match=r"the training diverged.*NaN or infinite"):
        train_expert(
            model, pairs("upper"), task="upper", config=exploding, tokenizer=tokenizer,
            output_dir=tmp_path / "out",
        )  # fmt: skip
    assert sorted(tmp_path.iterdir()) == []  # no expert, no staging folder


def test_the_output_folder_must_be_new_or_empty_and_the_base_model_loadable(
    model, tokenizer, tmp_path
):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "README.md").write_text("my project")
    for taken in (tmp_path / "project", tmp_path / "project" / "README.md"):
        with pytest.raises(TrainingError, match="new or empty folder"):
            train_expert(model, pairs("upper"), task="u", tokenizer=tokenizer, output_dir=taken)
    assert (tmp_path / "project" / "README.md").read_text() == "my project"
    for missing in ("nobody/no-such-model", str(tmp_path / "no-model")):
        with pytest.raises(NotFoundError, match="cannot load the base model"):
            train_expert(missing, pairs("upper"), task="u", tokenizer=tokenizer)
    with pytest.raises(TrainingError, match="task names must be non-empty"):
        train_expert(model, pairs("upper"), task="", tokenizer=tokenizer)
    (tmp_path / "empty").mkdir()
    expert = train_expert(
        model, pairs("upper"), task="a/b", config=FAST, tokenizer=tokenizer,
        output_dir=tmp_path / "empty",
    )  # fmt: skip
    assert expert.path == tmp_path / "empty" and expert.card.tasks == ["a/b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "project"]


def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(
        '{"prompt": "café", "response": "b"}\n'.encode("utf-8-sig")
    )
    [example] = load_examples(tmp_path / "bom.jsonl")
    assert (example.prompt, example.response) == ("café", "b")


def test_a_bf16_base_trains_and_its_expert_loads(tokenizer):
    model = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    expert = train_expert(model, pairs("upper"), task="upper", config=FAST, tokenizer=tokenizer)
    assert {t.dtype for t in _weights(expert).values()} == {torch.float32}  # PEFT's adapter dtype
    assert next(model.parameters()).dtype == torch.bfloat16
    base_loss = evaluate(model, tokenizer, pairs("upper"))["loss"]
    loaded = PeftModel.from_pretrained(model, expert.path)
    assert evaluate(loaded, tokenizer, pairs("upper"))["loss"] < base_loss


def test_a_full_disk_is_a_training_error_and_leaves_nothing(model, tokenizer, small_disk):
    disk = small_disk("16k")  # less than the tiny expert's weights
    with pytest.raises(TrainingError, match=r"cannot write the expert to .*(No space|os error 28)"):
        train_expert(
            model, pairs("upper"), task="upper", config=FAST, tokenizer=tokenizer,
            output_dir=disk / "expert",
        )  # fmt: skip
    assert list(disk.iterdir()) == []
