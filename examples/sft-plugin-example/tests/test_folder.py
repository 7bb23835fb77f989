"""The folder publisher sends a real finished run's exports into a folder, with a manifest and a model card."""

import hashlib
import json
import shutil

import pytest
import yaml

from sft.core.errors import SftError
from sft.engine.export import export_run, publish_run

from sft_plugin_example import folder, modelcard


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def exported_run(sft_plugin_manager, tiny_run, tmp_path):
    sft_plugin_manager.register(folder, "folder")
    run = shutil.copytree(tiny_run, tmp_path / "run")
    [result] = export_run(run, ["lora"])
    assert result.ok, result.error
    return run


def test_sft_publish_copies_the_exports_byte_for_byte_with_a_manifest_and_card(exported_run, tmp_path):
    dest = tmp_path / "published"
    records = publish_run(exported_run, "folder", overrides=[f"publish.folder.path={dest}",
                                                             "publish.folder.license=apache-2.0"])
    target = dest / exported_run.name
    assert records["lora"]["ok"] and records["lora"]["where"] == str(target / "lora")
    local = {p.relative_to(exported_run / "exports/lora").as_posix(): p
             for p in (exported_run / "exports/lora").rglob("*") if p.is_file()}
    assert local and sorted(records["lora"]["copied"]) == sorted(local)
    manifest = json.loads((target / "manifest.json").read_text())
    for rel, path in local.items():
        assert sha256(target / "lora" / rel) == sha256(path) == manifest["files"][f"lora/{rel}"]["sha256"]
    front = modelcard.read_front_matter((target / "README.md").read_text())
    assert front["base_model"] == yaml.safe_load((exported_run / "config.yaml").read_text())["model"]["name"]
    assert front["license"] == "apache-2.0" and "chatml" in front["tags"]
    summary = json.loads((exported_run / "summary.json").read_text())
    assert summary["publish"]["folder"]["target"] == str(target)
    assert summary["publish"]["folder"]["exports"]["lora"]["ok"]

    # Again: every byte is already there, nothing is copied.
    again = publish_run(exported_run, "folder", overrides=[f"publish.folder.path={dest}"])
    assert again["lora"]["copied"] == [] and sorted(again["lora"]["kept"]) == sorted(local)


def test_a_folder_that_cannot_be_written_is_refused_and_recorded(exported_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SftError, match="cannot be written"):
        publish_run(exported_run, "folder", overrides=[f"publish.folder.path={blocker / 'out'}"])
    summary = json.loads((exported_run / "summary.json").read_text())
    assert "cannot be written" in summary["publish"]["folder"]["error"]


def test_the_card_says_lora_when_qlora_fell_back_on_cpu():
    config = {"model": {"name": "base", "method": "qlora"}, "template": {"name": "chatml"}, "data": {"dataset": "o/d"}}
    card = modelcard.render_model_card(config, {}, modelcard.ModelCardOptions(), "run", trained_in_4bit=False)
    front = modelcard.read_front_matter(card)
    assert "lora" in front["tags"] and front["datasets"] == ["o/d"] and "| method | `lora` |" in card
