"""The chat template: our ids equal transformers' apply_chat_template, the mask marks replies."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from gpt2.chat import (
    DEFAULT_TEMPLATE,
    check_messages,
    conversation_ids,
    prompt_ids,
    render,
)
from gpt2.config import GPTConfig
from gpt2.errors import UserError
from gpt2.hf import save_pretrained
from gpt2.model import GPT
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer, load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is 37 + 45?"},
    {"role": "assistant", "content": "82."},
    {"role": "user", "content": "Reverse the word 'stressed'."},
    {"role": "assistant", "content": "desserts"},
]

# A template of another shape (Zephyr-like markers on their own lines), to show that nothing
# here depends on the default one.
OTHER_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>\n{% endif %}"
)


def _exported(tmp_path: Path, template: str | None) -> transformers.PreTrainedTokenizerBase:
    tok = GPT2Tokenizer()
    tok.chat_template = template
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=64, vocab_size=50257)
    save_pretrained(GPT(cfg), tmp_path, tok)
    return transformers.AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("template", [None, OTHER_TEMPLATE], ids=["default", "other"])
def test_ids_equal_transformers_apply_chat_template(tmp_path: Path, template: str | None) -> None:
    hf = _exported(tmp_path, template)
    assert hf.chat_template == (template or DEFAULT_TEMPLATE)
    ours = GPT2Tokenizer()
    ours.chat_template = template
    ids, mask = conversation_ids(ours, CONVERSATION)
    theirs = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert ids == list(theirs)
    assert len(mask) == len(ids)
    question = CONVERSATION[:2]
    prompt = hf.apply_chat_template(
        question, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert prompt_ids(ours, question) == list(prompt)


def test_the_mask_covers_each_reply_and_its_end_of_text() -> None:
    tok = GPT2Tokenizer()
    ids, mask = conversation_ids(tok, CONVERSATION)
    trained = [i for i, on in zip(ids, mask, strict=True) if on]
    eot = tok.eot_token
    assert trained == tok.encode(" 82.") + [eot] + tok.encode(" desserts") + [eot]
    # The prompt before the first reply is exactly what generation is given.
    first = mask.index(True)
    assert ids[:first] == prompt_ids(tok, CONVERSATION[:2])


def test_default_rendering() -> None:
    text = render(GPT2Tokenizer(), CONVERSATION[1:3], add_generation_prompt=False)
    assert text == "User: What is 37 + 45?\n\nAssistant: 82.<|endoftext|>"
    assert render(GPT2Tokenizer(), CONVERSATION[1:2], True).endswith("\n\nAssistant:")


def test_a_template_travels_in_tokenizer_json(tmp_path: Path) -> None:
    tok = GPT2Tokenizer()
    tok.chat_template = OTHER_TEMPLATE
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).chat_template == OTHER_TEMPLATE
    GPT2Tokenizer().save(tmp_path)
    assert load_tokenizer(tmp_path).chat_template is None


def test_hf_folder_template_is_read_back(tmp_path: Path) -> None:
    from gpt2.hf import load_hf

    _exported(tmp_path, OTHER_TEMPLATE)
    _, tok = load_hf(tmp_path)
    assert tok.chat_template == OTHER_TEMPLATE


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "robot", "content": "x"}], "has role 'robot'"),
        ([{"role": "user"}], "content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
    ],
)
def test_bad_messages_get_one_line(messages: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_messages(messages)


def test_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert check_messages([{"role": "user", "content": parts}])[0]["content"] == "ab"


def test_a_vocabulary_without_end_of_text_cannot_chat() -> None:
    with pytest.raises(UserError, match="end-of-text token"):
        prompt_ids(CharTokenizer("abc"), [{"role": "user", "content": "abc"}])


def test_a_template_that_splits_a_token_is_refused() -> None:
    # "Assistant: 8" + "2." apart are not the ids of "Assistant: 82." together
    bad = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    tok = GPT2Tokenizer()
    tok.chat_template = bad
    with pytest.raises(UserError, match="tokenize differently"):
        conversation_ids(
            tok, [{"role": "user", "content": "8"}, {"role": "assistant", "content": "2"}]
        )
