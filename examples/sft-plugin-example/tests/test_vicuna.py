"""The vicuna template trains exactly each answer plus EOS, and its Jinja and Ollama texts agree."""

from sft.core.testing import assert_exact_masking

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
