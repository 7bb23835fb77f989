"""The family templates (mistral, gemma) and the ``tokenizer`` template on each family's real chat_template.

The real templates are in tests/data/chat_templates/ (see its README). Qwen's own ``qwen`` and
``qwen3`` templates come with the tool-calling work; until then Qwen runs use ``chatml`` or
``tokenizer``, and both are checked here against Qwen's real templates.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sft.core.errors import SftError
from sft.core.interfaces import Message
from sft.core.plugins import get_plugin_manager
from sft.core.templating import segments_text
from sft.testing import assert_exact_masking

from datakit import fresh_tokenizer

PM = get_plugin_manager()
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SYSTEM = [Message("system", "S"), Message("user", "U"), Message("assistant", "A")]
TWO_TURNS = [Message("user", "Who are you?"), Message("assistant", "I'm Forge."),
             Message("user", "Say it again."), Message("assistant", "I'm Forge.\nMade by sft-forge.")]


def _real(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def _with_template(smollm2_dir, jinja: str, specials: list[str], eos: str | None = None, bos: str | None = None):
    """SmolLM2's tokenizer standing in for a family's: the family's markers as special tokens, its chat_template."""
    tokenizer = fresh_tokenizer(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if eos:
        tokenizer.eos_token = eos
    if bos:
        tokenizer.bos_token = bos
    tokenizer.chat_template = jinja
    return tokenizer


# -- mistral and gemma ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("mistral", "<s>[INST] S\n\nU [/INST]A</s>"),
    ("gemma", "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"),
])
def test_family_template_folds_a_system_turn_into_the_first_user_turn(name, expected, smollm2_dir):
    template = PM.get("chat_template", name)
    assert segments_text(template.render(SYSTEM)) == expected
    tokenizer = _with_template(smollm2_dir, "", [template.stop_tokens()[0]])
    rendered = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in SYSTEM],
                                             chat_template=template.jinja(tokenizer), tokenize=False)
    assert rendered == expected
    with pytest.raises(SftError, match="no system role"):
        template.render([Message("user", "U"), Message("system", "late"), Message("assistant", "A")])


def test_gemma_renders_what_gemmas_own_template_renders(smollm2_dir):
    tokenizer = _with_template(smollm2_dir, _real("google-gemma-2-2b-it"), ["<start_of_turn>", "<end_of_turn>"],
                               bos="<bos>")
    gemma = PM.get("chat_template", "gemma")
    own = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in TWO_TURNS], tokenize=False)
    assert segments_text(gemma.render(TWO_TURNS, tokenizer)) == own
    assert gemma.stop_tokens(tokenizer)[0] == "<end_of_turn>"  # trained after every answer (axolotl#3754)
    assert_exact_masking(gemma, TWO_TURNS, tokenizer)


# -- the tokenizer template on the families' real templates ----------------------------------------
@pytest.mark.parametrize("source, specials, eos, eot", [
    ("Qwen-Qwen2.5-7B-Instruct", ["<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|im_end|>"),
    ("Qwen-Qwen3-0.6B", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], "<|im_end|>", "<|im_end|>"),
    ("google-gemma-2-2b-it", ["<start_of_turn>", "<end_of_turn>"], "<eos>", "<end_of_turn>"),
    ("microsoft-Phi-3.5-mini-instruct", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|endoftext|>", "<|end|>"),
    ("mistralai-Mistral-Nemo-Instruct-2407", ["[INST]", "[/INST]"], "</s>", "</s>"),
    ("meta-llama-Llama-3.2-3B-Instruct", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>",
     "<|eot_id|>"),
])
def test_tokenizer_template_trains_each_familys_real_template_exactly(source, specials, eos, eot, smollm2_dir):
    tokenizer = _with_template(smollm2_dir, _real(source), [*specials, eos], eos=eos)
    template = PM.get("chat_template", "tokenizer")
    assert template.stop_tokens(tokenizer)[0] == eot
    single = TWO_TURNS[:2]
    assert_exact_masking(template, single, tokenizer)
    # Qwen3's template writes an empty <think></think> block into the last answer only; the
    # span finder ends an earlier answer at its own end-of-turn token, so it is masked exactly too.
    assert_exact_masking(template, TWO_TURNS, tokenizer)
