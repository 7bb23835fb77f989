"""Chat-template plugins: exact masks, Jinja identical to render(), saved tokenizers, stop tokens, Ollama text.

Every registered template is checked (third-party ones included); the bundled ones also
against the reference text of their model family.
"""

from __future__ import annotations

import pytest

from sft.engine.configuration import load_config
from sft.core.templating import prepare_tokenizer, resolve_template
from sft.core.interfaces import Message
from sft.core.plugins import get_plugin_manager
from sft.core.templating import adds_bos, as_messages, end_of_turn, segments_text
from sft.testing import TINY_CONVERSATION, assert_exact_masking

from datakit import fresh_tokenizer

PM = get_plugin_manager()
TEMPLATES = sorted(PM.registry("chat_template"))

CONVERSATIONS = [
    [Message(*m) for m in TINY_CONVERSATION],
    [Message("user", "Hi"), Message("assistant", "Hello!")],
    # Characters that Jinja, JSON escaping or BPE merges could mangle.
    [Message("user", 'Quote "this" and {{ that }} and {% this %}\\n'),
     Message("assistant", "Tabs\tand\nnewlines,\n\n  indents, ünïcödé — and 'quotes'.")],
]


def _prepared(name, model_dir, *overrides):
    cfg = load_config(overrides=[f"model.name={model_dir}", f"template.name={name}", *overrides], pm=PM)
    tokenizer = fresh_tokenizer(model_dir)
    template = resolve_template(cfg, PM)
    prepare_tokenizer(tokenizer, template, cfg)
    return template, tokenizer


def _jinja(tokenizer, template, messages, generation=False):
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         chat_template=template.jinja(tokenizer), tokenize=False,
                                         add_generation_prompt=generation)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_trains_exactly_the_answers_and_jinja_renders_the_same(name, smollm2_dir):
    template, tokenizer = _prepared(name, smollm2_dir)
    for conversation in CONVERSATIONS:
        assert_exact_masking(template, conversation, tokenizer)
        assert _jinja(tokenizer, template, conversation) == segments_text(template.render(conversation, tokenizer))


@pytest.mark.parametrize("name", TEMPLATES)
def test_generation_prompt_is_what_jinja_renders_with_add_generation_prompt(name, smollm2_dir):
    template, tokenizer = _prepared(name, smollm2_dir)
    for conversation in CONVERSATIONS:
        last_answer = max(i for i, m in enumerate(conversation) if m.role == "assistant")
        prompt = conversation[:last_answer]
        assert template.generation_prompt(prompt, tokenizer) == _jinja(tokenizer, template, prompt, generation=True)


@pytest.mark.parametrize("name", TEMPLATES)
def test_saved_tokenizer_carries_the_template_eot_and_a_distinct_pad(name, smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    template, tokenizer = _prepared(name, smollm2_dir)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    conversation = CONVERSATIONS[0]
    dicts = [{"role": m.role, "content": m.content} for m in conversation]
    assert reloaded.apply_chat_template(dicts, tokenize=False) == segments_text(template.render(conversation, reloaded))
    eot = end_of_turn(template, reloaded)
    assert reloaded.eos_token == eot
    assert len(reloaded(eot, add_special_tokens=False)["input_ids"]) == 1
    assert reloaded.pad_token is not None and reloaded.pad_token_id != reloaded.eos_token_id


@pytest.mark.parametrize("name", TEMPLATES)
def test_stop_tokens_start_with_the_trained_eot_and_ollama_template_is_well_formed(name, smollm2_dir):
    template, tokenizer = _prepared(name, smollm2_dir)
    stops = template.stop_tokens(tokenizer)
    assert stops and len(set(stops)) == len(stops)
    go = template.ollama_template(tokenizer)
    assert ".Messages" in go or ".Prompt" in go
    opened = go.count("{{ if ") + go.count("{{- if ") + go.count("{{ range ") + go.count("{{- range ")
    assert opened == go.count("{{ end }}") + go.count("{{- end }}"), go
    assert "<|" not in stops[0] or stops[0] in go  # a marker-token EOT closes each past answer


# -- the bundled templates against their families' reference texts -----------------------------
REFERENCE = [Message("system", "S"), Message("user", "U"), Message("assistant", "A")]


def test_chatml_matches_smollm2s_own_chat_template(smollm2_dir):
    tokenizer = fresh_tokenizer(smollm2_dir)
    own = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in CONVERSATIONS[0]],
                                        tokenize=False)
    template = PM.get("chat_template", "chatml")
    assert segments_text(template.render(CONVERSATIONS[0], tokenizer)) == own


@pytest.mark.parametrize("name, expected", [
    ("chatml", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"),
    ("llama3", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"),
    ("phi3", "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n<|endoftext|>"),
    ("alpaca", "S\n\n### Instruction:\nU\n\n### Response:\nA</s>\n\n"),
])
def test_bundled_templates_render_their_reference_text(name, expected):
    template = PM.get("chat_template", name)
    assert segments_text(template.render(REFERENCE)) == expected  # no tokenizer: alpaca's EOT is </s>


def test_alpaca_template_uses_the_tinyllama_article_prompt_and_the_tokenizers_eos(smollm2_dir):
    template, tokenizer = _prepared("alpaca", smollm2_dir)
    text = segments_text(template.render([Message("user", "Add 2 and 2."), Message("assistant", "4")], tokenizer))
    assert text == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n### Instruction:\nAdd 2 and 2.\n\n### Response:\n4<|im_end|>\n\n")
    assert template.stop_tokens(tokenizer)[0] == tokenizer.eos_token == "<|im_end|>"


# -- the tokenizer template ---------------------------------------------------------------------
def test_tokenizer_template_uses_the_models_own_template_and_finds_its_eot(smollm2_dir):
    template, tokenizer = _prepared("tokenizer", smollm2_dir)
    assert template.stop_tokens(tokenizer)[0] == "<|im_end|>"
    assert template.jinja(tokenizer) == fresh_tokenizer(smollm2_dir).chat_template
    go = template.ollama_template(tokenizer)
    assert "You are a helpful AI assistant named SmolLM" in go  # its default system prompt
    assert "<|im_start|>assistant\n" in go


@pytest.mark.parametrize("jinja, error", [
    # The turns are written last first: the answer is not where the model would write it.
    ("{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "changes the text of assistant turn 1"),
    # Answers are never closed by a special token: the model could not learn to stop.
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}assistant: {% endif %}", "does not end assistant turn"),
    # Answers are upper-cased: their text cannot be found.
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content']|upper }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "changes the text of assistant turn"),
])
def test_tokenizer_template_refuses_templates_it_cannot_mask_exactly(jinja, error, smollm2_dir):
    from sft.core.errors import SftError

    tokenizer = fresh_tokenizer(smollm2_dir)
    tokenizer.chat_template = jinja
    tokenizer.eos_token = "<|endoftext|>"  # so the answer-closing check has an EOT that is absent
    template = PM.get("chat_template", "tokenizer")
    with pytest.raises(SftError, match=error):
        template.render(as_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]),
                        tokenizer)


def test_tokenizer_template_without_a_chat_template_says_so(smollm2_dir):
    from sft.core.errors import SftError

    tokenizer = fresh_tokenizer(smollm2_dir)
    tokenizer.chat_template = None
    with pytest.raises(SftError, match="has no chat_template; set template.name"):
        PM.get("chat_template", "tokenizer").render([Message("user", "a"), Message("assistant", "b")], tokenizer)


# -- prepare_tokenizer ----------------------------------------------------------------------------
def test_missing_eot_is_added_as_one_special_token(smollm2_dir):
    cfg = load_config(overrides=[f"model.name={smollm2_dir}", "template.name=llama3"], pm=PM)
    tokenizer = fresh_tokenizer(smollm2_dir)
    before = len(tokenizer)
    assert len(tokenizer("<|eot_id|>", add_special_tokens=False)["input_ids"]) > 1
    added = prepare_tokenizer(tokenizer, resolve_template(cfg, PM), cfg)
    assert added == 1 and len(tokenizer) == before + 1
    assert tokenizer("<|eot_id|>", add_special_tokens=False)["input_ids"] == [before]
    assert tokenizer.eos_token == "<|eot_id|>"
    assert prepare_tokenizer(tokenizer, resolve_template(cfg, PM), cfg) == 0  # idempotent


def test_missing_eot_is_an_error_when_asked(smollm2_dir):
    from sft.core.errors import ConfigError

    cfg = load_config(overrides=[f"model.name={smollm2_dir}", "template.name=llama3",
                                 "template.on_missing_eot=error"], pm=PM)
    with pytest.raises(ConfigError, match=r"template.on_missing_eot: the end-of-turn token '<\|eot_id\|>'"):
        prepare_tokenizer(fresh_tokenizer(smollm2_dir), resolve_template(cfg, PM), cfg)


def test_pad_equal_to_eos_is_replaced_by_an_existing_token(smollm2_dir):
    cfg = load_config(overrides=[f"model.name={smollm2_dir}"], pm=PM)
    tokenizer = fresh_tokenizer(smollm2_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert prepare_tokenizer(tokenizer, resolve_template(cfg, PM), cfg) == 0
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template == PM.get("chat_template", "chatml").jinja(tokenizer)


def test_pad_is_added_when_no_existing_token_fits(smollm2_dir):
    cfg = load_config(overrides=[f"model.name={smollm2_dir}"], pm=PM)
    tokenizer = fresh_tokenizer(smollm2_dir)
    tokenizer.unk_token = None
    before = len(tokenizer)
    assert prepare_tokenizer(tokenizer, resolve_template(cfg, PM), cfg) == 1
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == before


# -- template options ---------------------------------------------------------------------------
def test_template_options_are_applied_through_configure_also_from_a_saved_config(sft_plugin_manager, tmp_path):
    from dataclasses import dataclass


    from sft.core import hookimpl
    from sft.core.config import config_to_yaml, opt
    from sft.core.templating import Turn, TurnTemplate

    @dataclass
    class GreeterOptions:
        greeting: str = opt("Hello.", "The system prompt used when a conversation has none.")

    class Greeter(TurnTemplate):
        name = "greeter"
        options = GreeterOptions
        user = Turn("Q: ", "\n")
        assistant = Turn("A: ", "\n")
        system = Turn("", "\n")
        eot = "<|im_end|>"

        def configure(self, options):
            return type("ConfiguredGreeter", (Greeter,), {"default_system": options.greeting})()

    class Plugin:
        @hookimpl
        def register_chat_templates(self, register):
            register(Greeter())

    sft_plugin_manager.register(Plugin(), "greeter")
    cfg = load_config(overrides=["template.name=greeter", "template.greeter.greeting=Hi there."])
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg))
    for config in (cfg, load_config(str(saved))):  # as built, and as a run's config.yaml reads back
        template = resolve_template(config)
        assert segments_text(template.render([Message("user", "x"), Message("assistant", "y")])) == \
            "Hi there.\nQ: x\nA: y<|im_end|>\n"


# -- Ollama -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEMPLATES)
def test_ollama_template_renders_the_generation_prompt_the_model_was_trained_on(name, smollm2_dir):
    from gotemplate import render_go_template

    template, tokenizer = _prepared(name, smollm2_dir)
    for conversation in CONVERSATIONS:
        last_answer = max(i for i, m in enumerate(conversation) if m.role == "assistant")
        prompt = conversation[:last_answer]
        system = next((m.content for m in prompt if m.role == "system"), "")
        # What Ollama passes: .System from the system messages, .Messages with every message.
        data = {"System": system, "Messages": [{"Role": m.role, "Content": m.content} for m in prompt]}
        rendered = render_go_template(template.ollama_template(tokenizer), data)
        expected = template.generation_prompt(prompt, tokenizer)
        # The BOS is llama.cpp's to add (from the GGUF metadata), not the TEMPLATE's; templates that
        # render the model's own Jinja write the tokenizer's bos_token, as apply_chat_template does.
        stripped = [expected[len(bos):] for bos in {getattr(template, "bos", ""), tokenizer.bos_token or ""}
                    if bos and expected.startswith(bos)]
        assert rendered in (expected, *stripped), (
            f"template '{name}': Ollama renders\n{rendered!r}\nbut training/generation uses\n{expected!r}")


@pytest.mark.parametrize("source", ["chatml", "llama3", "phi3", "alpaca"])
def test_tokenizer_template_derives_ollama_text_from_other_families(source, smollm2_dir):
    from gotemplate import render_go_template

    # A model that ships this family's format: its EOT is a token, its chat_template is the family's.
    named, tokenizer = _prepared(source, smollm2_dir)
    if getattr(named, "bos", ""):
        tokenizer.bos_token = named.bos  # and its BOS is written by the template
    template = PM.get("chat_template", "tokenizer")
    assert template.stop_tokens(tokenizer)[0] == named.stop_tokens(tokenizer)[0]
    prompt = CONVERSATIONS[0][:-1]
    data = {"System": prompt[0].content, "Messages": [{"Role": m.role, "Content": m.content} for m in prompt]}
    rendered = render_go_template(template.ollama_template(tokenizer), data)
    expected = named.generation_prompt(prompt, tokenizer)
    # llama.cpp adds the BOS only when the tokenizer does (the GGUF's add_bos_token): this one
    # does not, so the TEMPLATE writes it, as training did.
    if adds_bos(tokenizer):
        expected = expected.removeprefix(getattr(named, "bos", ""))
    assert rendered == expected
    assert_exact_masking(template, CONVERSATIONS[0], tokenizer)
