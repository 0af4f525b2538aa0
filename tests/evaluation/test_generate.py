"""Our batched greedy generation equals transformers' ``generate`` on tiny models, row by row."""

import pytest
import torch

from gemma_lowmem.evaluation.generate import generate_ids, generate_texts
from tests.tiny import tiny_gemma3, tiny_gemma3n, tiny_tokenizer


@pytest.mark.parametrize("factory", [tiny_gemma3, tiny_gemma3n], ids=["gemma3", "gemma3n"])
def test_batched_greedy_equals_model_generate(factory):
    model = factory()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(6, 1000, (n,), generator=g).tolist() for n in (5, 12, 9, 3)]
    ours = generate_ids(model, prompts, pad_id=0, stop_ids=[1], max_new_tokens=12, batch_size=3, show_progress=False)
    for prompt, got in zip(prompts, ours):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=1,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert got == expected[: expected.index(1)] if 1 in expected else got == expected  # ours drops the stop


def test_generation_stops_at_a_stop_token():
    model = tiny_gemma3()
    prompt = [10, 11, 12]
    free = generate_ids(model, [prompt], pad_id=0, stop_ids=[1], max_new_tokens=8, show_progress=False)[0]
    stopped = generate_ids(model, [prompt], pad_id=0, stop_ids=[free[2]], max_new_tokens=8, show_progress=False)[0]
    assert stopped == free[: free.index(free[2])]


def test_generate_texts_decodes_without_special_tokens():
    texts = generate_texts(tiny_gemma3(), tiny_tokenizer(), ["<bos>hello", "<bos>안녕"], max_new_tokens=4,
                           show_progress=False)
    assert len(texts) == 2 and all(isinstance(t, str) and "<bos>" not in t for t in texts)
