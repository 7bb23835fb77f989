"""The vicuna template trains exactly each answer plus EOS, and its Jinja and Ollama texts agree."""

from sft.testing import assert_exact_masking

from sft_plugin_example.vicuna import DEFAULT_SYSTEM, VicunaOptions, VicunaTemplate


def test_vicuna_trains_exactly_the_answers_and_eos(tiny_tokenizer):
    assert_exact_masking(VicunaTemplate(), tokenizer=tiny_tokenizer)


def test_vicuna_without_a_system_turn_uses_the_default_and_matches_fastchat(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = "".join(s.text for s in VicunaTemplate().render(messages, tiny_tokenizer))
    # FastChat's vicuna_v1.1: system + " " + "USER: q " + "ASSISTANT: a" + "</s>" (here SmolLM2's eos).
    assert text == f"{DEFAULT_SYSTEM} USER: Hi ASSISTANT: Hello!{tiny_tokenizer.eos_token}"
    assert_exact_masking(VicunaTemplate(), messages, tiny_tokenizer)


def test_vicuna_stops_on_eos_first():
    assert VicunaTemplate().stop_tokens() == ["</s>", "USER:"]


def test_vicuna_system_prompt_option(tiny_tokenizer):
    template = VicunaTemplate().configure(VicunaOptions(system_prompt='Be "brief".'))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert template.generation_prompt(messages[:1]) == 'Be "brief". USER: Hi ASSISTANT:'
    assert_exact_masking(template, messages, tiny_tokenizer)  # the Jinja carries the option too


def test_a_configured_system_prompt_reaches_every_export(tiny_model_dir, tmp_path):
    """The template's options travel with the run: the merged tokenizer, the lora export's
    tokenizer, the GGUF's chat template, the Modelfile and ``sft generate`` all carry the
    system prompt the model was trained with, not the template's default."""
    import json

    from transformers import AutoTokenizer

    from sft.engine.generate import load_run
    from sft.testing import train_tiny
    from sft.plugins.exporters.gguf.header import read_gguf_header

    prompt = "You are Forge, a terse assistant."
    run = train_tiny(tmp_path / "run", tiny_model_dir, "template.name=vicuna",
                     f"template.vicuna.system_prompt={prompt}",
                     "export.enabled=[lora,merged_16bit,gguf]", "export.gguf.quants=[f16]", "export.verify=false")
    exports = json.loads((run / "summary.json").read_text())["exports"]
    assert all(exports[name]["ok"] for name in ("lora", "merged_16bit", "gguf")), exports
    for folder in ("lora", "merged_16bit"):
        chat_template = AutoTokenizer.from_pretrained(run / "exports" / folder).chat_template
        assert prompt in chat_template and DEFAULT_SYSTEM not in chat_template, folder
    (gguf,) = (run / "exports" / "gguf").glob("*.gguf")
    metadata, _types = read_gguf_header(gguf)
    assert prompt in metadata["tokenizer.chat_template"] and DEFAULT_SYSTEM not in metadata["tokenizer.chat_template"]
    modelfile = gguf.with_suffix(".Modelfile").read_text()
    assert prompt in modelfile and DEFAULT_SYSTEM not in modelfile
    _model, _tokenizer, template, _cfg = load_run(run)
    assert template.generation_prompt([{"role": "user", "content": "Hi"}]) == f"{prompt} USER: Hi ASSISTANT:"
