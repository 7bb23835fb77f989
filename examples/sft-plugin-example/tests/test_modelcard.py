"""The modelcard exporter writes a Hub model card for a real finished run."""

import shutil

import yaml

from sft.core.export import export_run

from sft_plugin_example import modelcard


def test_modelcard_describes_the_run(sft_plugin_manager, tiny_run, tmp_path):
    sft_plugin_manager.register(modelcard, "modelcard")
    run = shutil.copytree(tiny_run, tmp_path / "run")
    [result] = export_run(run, ["modelcard"], ["export.modelcard.license=apache-2.0"])
    assert result.ok, result.error
    text = (run / "exports" / "modelcard" / "README.md").read_text()
    front = modelcard.read_front_matter(text)
    assert front["base_model"] == yaml.safe_load((run / "config.yaml").read_text())["model"]["name"]
    assert front["license"] == "apache-2.0" and "chatml" in front["tags"]
    assert "## Hyperparameters" in text and "| LoRA r | `4` |" in text
    assert (run / "adapter" / "README.md").read_text() == text


def test_modelcard_says_lora_when_qlora_fell_back_on_cpu():
    config = {"model": {"name": "base", "method": "qlora"}, "template": {"name": "chatml"}, "data": {"dataset": "o/d"}}
    card = modelcard.render_model_card(config, {}, modelcard.ModelCardOptions(), "run", trained_in_4bit=False)
    front = modelcard.read_front_matter(card)
    assert "lora" in front["tags"] and front["datasets"] == ["o/d"] and "| method | `lora` |" in card
