"""``sft.engine.models.load_tokenizer`` gives the tokenizer transformers' AutoTokenizer chooses from
the model's own config, for every family the tests build and for the embedded SmolLM2, while
choosing it without importing the model's config class (which made ``sft preview`` slow)."""

from __future__ import annotations

import pytest

from sft.engine.configuration import load_config
from sft.engine.models import _tokenizer_choice_config, load_tokenizer
from sft.testing import make_plugin_manager

from families import FAMILIES

PM = make_plugin_manager()


def _assert_same_tokenizer(path) -> None:
    from transformers import AutoTokenizer

    assert _tokenizer_choice_config(str(path)), "tokenizer_config.json names its class: the light choice applies"
    ours = load_tokenizer(load_config(overrides=[f"model.name={path}"], pm=PM).model)
    theirs = AutoTokenizer.from_pretrained(path)
    assert type(ours) is type(theirs)
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.chat_template == theirs.chat_template
    text = " ".join(theirs.all_special_tokens) + " Hello  world,\n\tüñï 12345 <|im_start|>user [INST] x"
    assert ours(text).input_ids == theirs(text).input_ids
    assert ours(text, add_special_tokens=False).input_ids == theirs(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_gets_the_tokenizer_of_its_model_config(family, family_models):
    _assert_same_tokenizer(family_models(family))


def test_the_embedded_model_gets_the_tokenizer_of_its_model_config(smollm2_dir):
    _assert_same_tokenizer(smollm2_dir)


def test_a_folder_whose_tokenizer_brings_its_own_code_is_left_to_transformers(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "MyTokenizer", "auto_map": {"AutoTokenizer": ["tok.MyTokenizer", null]}}')
    assert _tokenizer_choice_config(str(tmp_path)) == {}
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')  # no class named: the config decides
    assert _tokenizer_choice_config(str(tmp_path)) == {}
    assert _tokenizer_choice_config("HuggingFaceTB/SmolLM2-135M-Instruct") == {}  # a hub id
