"""Task 4 (preference pairs): HH dialogue splitting and its edge cases, row forms, loading with file/record errors,
the demo set as SFT conversations, ``prepare_training`` on a tiny tokenizer and model, and ``score_outputs``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gemma_lowmem.config import DataConfig, LoraConfig, RunConfig, TrainConfig
from gemma_lowmem.errors import UserError
from gemma_lowmem.model import add_lora
from gemma_lowmem.tasks import TaskTraining, get_task
from gemma_lowmem.tasks.preference import (
    SYSTEM_PROMPTS,
    BadRow,
    build_datasets,
    encode_pair,
    load_pairs,
    normalise,
    parse_dialogue,
    prepare_training,
    score_outputs,
    split_hh_pair,
)
from tests.tiny import tiny_gemma3, tiny_tokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
HH_FILE = SHARED / "preference" / "hh_rlhf_harmless_first1500.jsonl"

DIALOGUE = ("\n\nHuman: How do plants eat?\n\nAssistant: They make sugar from light."
            "\n\nHuman: Even at night?\n\nAssistant:")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- HH dialogues -------------------------------------------------------------------------------------------------


def test_parse_dialogue_turns_and_roles():
    assert parse_dialogue(DIALOGUE.lstrip("\n")) == [
        {"role": "user", "content": "How do plants eat?"},
        {"role": "assistant", "content": "They make sugar from light."},
        {"role": "user", "content": "Even at night?"},
    ]
    # Two human turns in a row are joined, so roles alternate as chat templates require.
    assert parse_dialogue("\n\nHuman: a\n\nHuman: b\n\nAssistant:") == [{"role": "user", "content": "a\n\nb"}]
    with pytest.raises(BadRow, match="before its first 'Human:'"):
        parse_dialogue("hello\n\nHuman: a\n\nAssistant: b")


def test_split_hh_pair_at_the_last_shared_assistant_turn():
    # The answers share their first word: the split is still at the turn marker, not inside the answer.
    messages, chosen, rejected = split_hh_pair(DIALOGUE + " Sure, plants rest at night.",
                                               DIALOGUE + " Sure thing, they eat pizza.")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[-1]["content"] == "Even at night?"
    assert (chosen, rejected) == ("Sure, plants rest at night.", "Sure thing, they eat pizza.")


@pytest.mark.parametrize("chosen,rejected,match", [
    ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y", "share no dialogue prefix"),
    ("abc", "xyz", "share no dialogue prefix"),
    (DIALOGUE + " Same answer.", DIALOGUE + " Same answer.  ", "identical"),
    (DIALOGUE + " ", DIALOGUE + " Something.", "'chosen' is empty"),
    ("\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y",
     "\n\nHuman: a\n\nAssistant: z\n\nHuman: b\n\nAssistant: y", "differ before their final assistant turn"),
])
def test_split_hh_pair_edge_cases(chosen, rejected, match):
    with pytest.raises(BadRow, match=match):
        split_hh_pair(chosen, rejected)


def test_row_forms_give_the_same_pair():
    plain = normalise({"prompt": "Even at night?", "chosen": " Yes. ", "rejected": "No."})
    assert plain["messages"] == [{"role": "user", "content": "Even at night?"}]
    assert (plain["chosen"], plain["rejected"], plain["lang"]) == ("Yes.", "No.", "en")
    again = normalise({"prompt": "Even at night?", "chosen": "Yes.", "rejected": "No."})
    other = normalise({"prompt": "Even at night?", "chosen": "Yes.", "rejected": "Never."})
    assert plain["id"].startswith("pair-") and plain["id"] == again["id"] != other["id"]  # from the content
    shared_form = normalise({"id": 7, "prompt": DIALOGUE.lstrip("\n"), "chosen": "Yes.", "rejected": "No."})
    whole = normalise({"id": 7, "chosen": DIALOGUE + " Yes.", "rejected": DIALOGUE + " No."})
    assert shared_form == whole and shared_form["id"] == "7" and len(whole["messages"]) == 3
    korean = normalise({"prompt": "식물은 밤에도 먹나요?", "chosen": "네.", "rejected": "아니요."})
    assert korean["lang"] == "ko"
    with pytest.raises(BadRow, match="missing field 'prompt'"):
        normalise({"chosen": "a", "rejected": "b"})
    with pytest.raises(BadRow, match="missing field 'rejected'"):
        normalise({"prompt": "q", "chosen": "a"})


def test_bad_record_names_file_and_record_or_is_skipped(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"prompt": "q2", "chosen": "same", "rejected": "same"},
        {"prompt": "q3", "chosen": "c", "rejected": "d"},
        {"prompt": "q4", "chosen": "e", "rejected": "f"},
    ])
    with pytest.raises(UserError, match=r"pairs\.jsonl: record 2: 'chosen' and 'rejected' are identical.*skip-bad"):
        load_pairs(DataConfig(task="preference", train_file=str(path)))
    data = load_pairs(DataConfig(task="preference", train_file=str(path), skip_bad_rows=True))
    assert data.bad_rows.count == 1 and len(data.train) + len(data.val) == 3


# ---- demo set and SFT view ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["ko", "en"])
def test_demo_set_as_sft_conversations(lang):
    train, val = build_datasets(DataConfig(task="preference", demo=True, lang=lang), seed=0)
    assert len(train) + len(val) == 24 and {c.meta["lang"] for c in val} == {"ko", "en"}
    conv = train[0]
    assert conv.messages[0] == {"role": "system", "content": SYSTEM_PROMPTS[lang]}
    assert [m["role"] for m in conv.messages[1:]] == ["user", "assistant"]
    assert conv.meta["rejected"] and conv.meta["rejected"] != conv.messages[-1]["content"]


# ---- tokens, reference and training hook ---------------------------------------------------------------------------


def test_encode_pair_drops_early_exchanges_then_the_pair():
    tok = tiny_tokenizer()  # bytes: one token per ASCII character
    messages = [{"role": "system", "content": "Be kind."}, *parse_dialogue(DIALOGUE)]
    full, shortened = encode_pair(tok, messages, "Yes.", "No.", max_len=1000)
    assert full is not None and not shortened
    s = full["split"]
    chosen_ids, rejected_ids = full["input_ids"][:s], full["input_ids"][s:]
    prompt_len = next(i for i, label in enumerate(full["labels"]) if label != -100)
    assert chosen_ids[:prompt_len] == rejected_ids[:prompt_len]  # the same prompt in both documents
    assert tok.decode([t for t in full["labels"][:s] if t != -100]) == "Yes.<end_of_turn>\n"
    short, shortened = encode_pair(tok, messages, "Yes.", "No.", max_len=len(full["input_ids"]) - 1)
    assert shortened and "How do plants eat?" not in tok.decode(short["input_ids"])
    assert "Be kind." in tok.decode(short["input_ids"])  # the system text stays
    assert encode_pair(tok, messages, "Yes.", "No.", max_len=20) == (None, False)


def toy_file(tmp_path: Path, n: int = 12) -> Path:
    rows = [{"id": f"t{i}", "prompt": f"Question {i}?", "chosen": "Good answer.", "rejected": "Bad reply!!"}
            for i in range(n)]
    return write_jsonl(tmp_path / "toy.jsonl", rows)


def run_config(tmp_path: Path, max_seq_length: int = 1000) -> RunConfig:
    return RunConfig(
        data=DataConfig(task="preference", train_file=str(toy_file(tmp_path)), lang="en",
                        max_seq_length=max_seq_length, cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(batch_size=4, precision="fp32"),
    )


def test_prepare_training_attaches_reference_and_uses_the_cache(tmp_path, monkeypatch):
    cfg = run_config(tmp_path)
    model = add_lora(tiny_gemma3(), LoraConfig(r=4, alpha=8, dropout=0.0), False)
    training = prepare_training(cfg, tiny_tokenizer(), model)
    assert isinstance(training, TaskTraining) and len(training.train) + len(training.val) == 12
    example = training.train[0]
    assert len(example["ref_logps"]) == 2 and all(math.isfinite(x) and x < 0 for x in example["ref_logps"])
    assert len(example["input_ids"]) <= 1000
    batch = training.collate_fn([[ex] for ex in training.train[:3]])
    loss, metrics = training.loss_fn(model, batch)
    # A fresh LoRA (B = 0) is the reference: every pair's loss is log 2.
    assert loss.item() == pytest.approx(3 * math.log(2), abs=1e-4) and "reward_accuracy" in metrics
    assert len(list((tmp_path / "cache" / "reference").glob("*.pt"))) == 1

    import gemma_lowmem.dpo as dpo

    monkeypatch.setattr(dpo, "reference_logps", lambda *a, **k: pytest.fail("the cache was not used"))
    again = prepare_training(cfg, tiny_tokenizer(), model)
    assert [ex["ref_logps"] for ex in again.train] == [ex["ref_logps"] for ex in training.train]


def test_prepare_training_settings_and_sft_view(tmp_path):
    cfg = run_config(tmp_path)
    object.__setattr__(cfg.preference, "loss", "hinge")  # past __post_init__, as a hand-edited config could be
    with pytest.raises(UserError, match="--dpo-loss.*hinge"):
        prepare_training(cfg, tiny_tokenizer(), add_lora(tiny_gemma3(), LoraConfig(r=4, alpha=8), False))
    assert get_task("preference").prepare_training is prepare_training
    assert get_task("preference_sft").prepare_training is None  # plain SFT on (prompt -> chosen)
    tight = run_config(tmp_path, max_seq_length=60)
    with pytest.raises(UserError, match="no training pair fits"):
        prepare_training(tight, tiny_tokenizer(), add_lora(tiny_gemma3(), LoraConfig(r=4, alpha=8), False))


# ---- scoring -----------------------------------------------------------------------------------------------------


def test_score_outputs_indicators():
    train, val = build_datasets(DataConfig(task="preference", demo=True, lang="en"), seed=0)
    convs = train[:6]
    chosen = [c.messages[-1]["content"] for c in convs]
    rejected = [c.meta["rejected"] for c in convs]
    like_chosen = score_outputs(convs, chosen)
    like_rejected = score_outputs(convs, rejected)
    assert like_chosen["metrics"]["closer_to_chosen_rate"] == 1.0
    assert like_rejected["metrics"]["closer_to_chosen_rate"] == 0.0
    assert like_chosen["metrics"]["mean_chars"] == pytest.approx(like_chosen["metrics"]["chosen_mean_chars"], abs=1)
    assert like_chosen["metrics"]["mentions_help_rate"] > like_rejected["metrics"]["mentions_help_rate"]
    row = like_chosen["rows"][0]
    assert row["output"] == chosen[0] and row["id"] == convs[0].meta["id"] and row["closer_to_chosen"]
    assert set(like_chosen["plots"]) == {"rouge_scatter", "indicators"}
    empty = score_outputs(convs[:2], ["", "   "])["metrics"]
    assert empty["empty_rate"] == 1.0 and empty["closer_to_chosen_rate"] == 0.0
    with pytest.raises(ValueError, match="pair up"):
        score_outputs(convs, chosen[:2])


# ---- real data ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared data not present")
def test_real_hh_pairs_load_with_empty_answers_reported():
    with pytest.raises(UserError, match=r"record 87: field 'chosen' is empty"):
        load_pairs(DataConfig(task="preference", train_file=str(HH_FILE)))
    data = load_pairs(DataConfig(task="preference", train_file=str(HH_FILE), skip_bad_rows=True,
                                 max_train_samples=None, max_val_samples=None))
    assert data.bad_rows.count == 4 and len(data.train) + len(data.val) == 1496
    raw = {r["id"]: r for r in map(json.loads, HH_FILE.read_text(encoding="utf-8").splitlines())}
    for row in data.train[:200]:
        original = raw[row["id"]]
        assert row["chosen"] == original["chosen"].strip() and row["messages"][-1]["role"] == "user"
        # The whole-dialogue form of the same row splits into the same pair.
        assert normalise({"chosen": original["chosen_full"], "rejected": original["rejected_full"],
                          "id": row["id"]}) == row
    assert sum(len(r["messages"]) > 1 for r in data.train) > 500  # multi-turn prompts are kept as turns
    assert torch.tensor([len(r["messages"]) % 2 for r in data.train]).all()  # always ends with a user turn
