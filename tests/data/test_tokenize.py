"""Conversations -> tokens: Gemma turn format, system folding, loss only on the last answer, cutting, cache."""

import pytest

from gemma_lowmem.data.conversation import Conversation
from gemma_lowmem.data.tokenize import (
    IGNORE_INDEX,
    encode_conversations,
    encode_messages,
    fold_system,
    render,
)
from tests.tiny import tiny_tokenizer

MESSAGES = [
    {"role": "system", "content": "You grade summaries."},
    {"role": "user", "content": "Summarise: The cat sat."},
    {"role": "assistant", "content": "A cat sat."},
    {"role": "user", "content": "Grade it."},
    {"role": "assistant", "content": "Total: 90/100"},
]
# A chat template that, like many, has a system role: rendered only when system_role=True.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<end_of_turn>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_fold_system_merges_into_first_user_turn():
    folded = fold_system(MESSAGES)
    assert [m["role"] for m in folded] == ["user", "assistant", "user", "assistant"]
    assert folded[0]["content"] == "You grade summaries.\n\nSummarise: The cat sat."
    assert fold_system(MESSAGES[1:]) == MESSAGES[1:]


def test_gemma_turn_format_without_chat_template():
    text = render(tiny_tokenizer(), MESSAGES, add_generation_prompt=False)
    assert text == (
        "<bos><start_of_turn>user\nYou grade summaries.\n\nSummarise: The cat sat.<end_of_turn>\n"
        "<start_of_turn>model\nA cat sat.<end_of_turn>\n"
        "<start_of_turn>user\nGrade it.<end_of_turn>\n"
        "<start_of_turn>model\nTotal: 90/100<end_of_turn>\n"
    )
    assert "system" not in text
    prompt = render(tiny_tokenizer(), MESSAGES[:-1], add_generation_prompt=True)
    assert prompt.endswith("<start_of_turn>user\nGrade it.<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["gemma-turns", "chat-template"])
def test_only_the_last_answer_carries_loss(template):
    tokenizer = tiny_tokenizer(template)
    example = encode_messages(tokenizer, MESSAGES)
    assert len(example["input_ids"]) == len(example["labels"])
    answer = [t for t in example["labels"] if t != IGNORE_INDEX]
    decoded = tokenizer.decode(answer)
    assert decoded.startswith("Total: 90/100") and "<end_of_turn>" in decoded  # the model learns to stop
    first = example["labels"].index(answer[0])
    assert all(t == IGNORE_INDEX for t in example["labels"][:first])
    assert example["input_ids"][first:] == answer  # one contiguous span at the end
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["gemma-turns", "chat-template"])
def test_answer_weights_mark_the_tokens_of_their_spans(template):
    tokenizer = tiny_tokenizer(template)
    answer = MESSAGES[-1]["content"]  # "Total: 90/100"
    start = answer.index("90")
    example = encode_messages(tokenizer, MESSAGES, answer_weights=[(start, start + 2, 5)])
    assert len(example["loss_weights"]) == len(example["input_ids"])
    weighted = [t for t, w in zip(example["input_ids"], example["loss_weights"]) if w == 5]
    assert weighted and tokenizer.decode(weighted).strip() == "90"
    assert set(example["loss_weights"]) == {1, 5}
    assert "loss_weights" not in encode_messages(tokenizer, MESSAGES)  # unweighted examples stay as they were
    conversation = Conversation(MESSAGES, answer_weights=[(start, start + 2, 5)])
    encoded = encode_conversations(tokenizer, [conversation], 512).examples[0]
    assert encoded["loss_weights"] == example["loss_weights"]


def test_system_role_kept_when_the_template_has_one():
    tokenizer = tiny_tokenizer(TEMPLATE)
    assert "<|system|>" in render(tokenizer, MESSAGES, add_generation_prompt=False, system_role=True)
    assert "<|system|>" not in render(tokenizer, MESSAGES, add_generation_prompt=False, system_role=False)


def test_roles_must_alternate():
    with pytest.raises(ValueError, match="alternate"):
        render(tiny_tokenizer(), [MESSAGES[1], MESSAGES[1], MESSAGES[2]], add_generation_prompt=False)



def _conversation(article: str, answer: str = "Score: 50/100") -> Conversation:
    messages = [{"role": "user", "content": f"Article:\n{article}\nPlease grade."},
                {"role": "assistant", "content": answer}]
    return Conversation(messages, cut=article)


def test_long_article_is_cut_not_the_answer(tmp_path):
    tokenizer = tiny_tokenizer()
    article = " ".join(f"Sentence number {i} is here." for i in range(60))
    result = encode_conversations(tokenizer, [_conversation(article)], max_seq_length=300)
    assert result.n_cut == 1 and result.n_dropped == 0
    example = result.examples[0]
    assert len(example["input_ids"]) <= 300
    text = tokenizer.decode(example["input_ids"])
    assert "Please grade." in text and text.rstrip().endswith("Score: 50/100<end_of_turn>")
    assert "Sentence number 0 is here." in text and "Sentence number 59" not in text


def test_conversation_that_cannot_fit_is_dropped_and_counted():
    tokenizer = tiny_tokenizer()
    short = _conversation("Short.")
    no_cut = Conversation([{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "ok"}])
    result = encode_conversations(tokenizer, [short, no_cut], max_seq_length=100)
    assert result.n_dropped == 1 and result.dropped == [1] and result.kept == [0]


def test_cache_round_trip(tmp_path):
    tokenizer = tiny_tokenizer()
    conversations = [_conversation(f"Article {i}.") for i in range(3)]
    first = encode_conversations(tokenizer, conversations, 200, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 1
    second = encode_conversations(tokenizer, conversations, 200, cache_dir=tmp_path)
    assert second.examples == first.examples
    encode_conversations(tokenizer, conversations, 199, cache_dir=tmp_path)  # other settings: another entry
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 2
