"""The plugin manager: entry points load one at a time, failures are recorded, names are unique."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from sft.core import ChatTemplate, Segment, hookimpl
from sft.engine.configuration import load_config
from sft.core.errors import ConfigError
from sft.testing import make_plugin_manager


class EchoTemplate(ChatTemplate):
    """A minimal template used only by these tests."""

    name = "echo"
    description = "role: content lines"

    def __init__(self, name: str = "echo"):
        self.name = name

    def render(self, messages, tokenizer=None):
        return [Segment(f"{m.role}: {m.content}\n", m.role == "assistant") for m in messages]

    def generation_prompt(self, messages, tokenizer=None):
        return "".join(s.text for s in self.render(messages)) + "assistant: "

    def stop_tokens(self, tokenizer=None):
        return ["\n"]

    def jinja(self, tokenizer=None):
        return "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"

    def ollama_template(self, tokenizer=None):
        return "{{ .Prompt }}"


class TemplatePlugin:
    def __init__(self, *names: str):
        self.names = names

    @hookimpl
    def register_chat_templates(self, register):
        for name in self.names:
            register(EchoTemplate(name))


def test_in_test_plugin_is_used():
    pm = make_plugin_manager((TemplatePlugin("echo"), "echo-plugin"))
    assert pm.get("chat_template", "echo").name == "echo"
    assert pm.owner("chat_template", "echo") == "echo-plugin"
    cfg = load_config(overrides=["template.name=echo", "export.enabled=[]"], pm=pm)
    assert cfg.template.name == "echo"
    listing = {p.name: p for p in pm.listing()}
    assert listing["echo-plugin"].provides == {"chat_template": ["echo"]}


def test_duplicate_name_names_both_plugins_and_disables_only_the_second():
    pm = make_plugin_manager((TemplatePlugin("twin"), "first-plugin"), (TemplatePlugin("twin"), "second-plugin"))
    assert pm.owner("chat_template", "twin") == "first-plugin"
    message = {p.name: p.error for p in pm.failures()}["second-plugin"]
    assert "'twin'" in message and "first-plugin" in message and "second-plugin" in message


def test_misspelled_hook_is_reported_and_the_rest_keeps_working():
    class Typo:
        @hookimpl
        def register_chat_template(self, register):  # missing the final "s"
            register(EchoTemplate("never"))

    pm = make_plugin_manager((Typo(), "typo-plugin"), (TemplatePlugin("echo"), "good-plugin"))
    failed = {p.name: p.error for p in pm.failures()}
    assert "typo-plugin" in failed
    assert "register_chat_template" in failed["typo-plugin"] and "unknown hook" in failed["typo-plugin"]
    assert "echo" in pm.registry("chat_template")
    assert "never" not in pm.registry("chat_template")


def test_a_plugin_whose_hook_raises_fails_alone():
    class Raises:
        @hookimpl
        def register_chat_templates(self, register):
            register(EchoTemplate("half"))
            raise RuntimeError("boom")

    pm = make_plugin_manager((Raises(), "raising-plugin"), (TemplatePlugin("echo"), "good-plugin"))
    templates = pm.registry("chat_template")
    assert "echo" in templates and "half" not in templates
    assert "boom" in {p.name: p.error for p in pm.failures()}["raising-plugin"]


def test_registering_an_object_of_the_wrong_kind_is_an_error():
    class Wrong:
        @hookimpl
        def register_chat_templates(self, register):
            register(object())

    pm = make_plugin_manager((Wrong(), "wrong-plugin"))
    assert "chatml" in pm.registry("chat_template")
    assert "without a name" in {p.name: p.error for p in pm.failures()}["wrong-plugin"]


def test_plugin_options_schema_is_validated_with_the_core_config():
    @dataclass
    class EchoOptions:
        prefix: str = ">"
        width: int = 80

    class OptionTemplate(EchoTemplate):
        options = EchoOptions

    class Plugin:
        @hookimpl
        def register_chat_templates(self, register):
            register(OptionTemplate("optioned"))

    pm = make_plugin_manager((Plugin(), "options-plugin"))
    cfg = load_config(overrides=["template.name=optioned", "template.optioned.width=10"], pm=pm)
    assert cfg.template.optioned.width == 10
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["template.optioned.widht=10", "template.optioned.prefix=[1]"], pm=pm)
    text = str(info.value)
    assert "template.optioned.widht: unknown key (did you mean 'width'?)" in text
    assert "template.optioned.prefix" in text


# -- installed distributions -----------------------------------------------------------
def _fake_distribution(root: Path, dist: str, module: str, body: str, ep_name: str) -> None:
    """Write an importable module plus a dist-info that declares it under the `sft` group."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[sft]\n{ep_name} = {module}\n")


def _sft(*args: str, pythonpath: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(pythonpath), **env}
    return subprocess.run([sys.executable, "-m", "sft.cli", *args], capture_output=True, text=True, env=environ)


@pytest.fixture
def broken_distribution(tmp_path: Path) -> Path:
    _fake_distribution(tmp_path, "sft-broken", "sft_broken_plugin", "raise ImportError('needs libfoo')\n", "broken")
    return tmp_path


def test_broken_installed_plugin_shows_as_failed_and_cli_still_works(broken_distribution: Path):
    help_result = _sft("--help", pythonpath=broken_distribution)
    assert help_result.returncode == 0, help_result.stderr
    result = _sft("plugins", "--json", pythonpath=broken_distribution)
    assert result.returncode == 0, result.stderr
    listing = {p["name"]: p for p in json.loads(result.stdout)}
    broken = listing["broken"]
    assert broken["status"] == "failed"
    assert broken["distribution"] == "sft-broken" and broken["version"] == "1.2.3"
    assert "ImportError: needs libfoo" in broken["error"]
    assert all(p["status"] == "ok" for name, p in listing.items() if name != "broken")
    table = _sft("plugins", pythonpath=broken_distribution)
    assert table.returncode == 0 and "failed" in table.stdout


def test_disable_autoload_loads_only_bundled_plugins(broken_distribution: Path):
    result = _sft("plugins", "--json", pythonpath=broken_distribution, SFT_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing and all(p["distribution"] == "sft-forge" for p in listing)


def test_strict_mode_turns_failures_into_errors(broken_distribution: Path):
    result = _sft("plugins", pythonpath=broken_distribution, SFT_STRICT_PLUGINS="1")
    assert result.returncode != 0
    assert "broken" in result.stderr


def test_installed_plugin_with_misspelled_hook_is_listed_as_failed(tmp_path: Path):
    body = """
        from sft.core import hookimpl

        @hookimpl
        def register_exporter(register):
            pass
    """
    _fake_distribution(tmp_path, "sft-typo", "sft_typo_plugin", body, "typo")
    result = _sft("plugins", "--json", pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    typo = {p["name"]: p for p in json.loads(result.stdout)}["typo"]
    assert typo["status"] == "failed" and "register_exporter" in typo["error"]


#: A third party's `chatml` with another end-of-turn token, beside a name of its own.
CLASHING_PLUGIN = """
    from sft.core import hookimpl
    from sft.plugins.templates.chatml import ChatML


    class EvilChatML(ChatML):
        eot = "<|evil|>"


    class Parrot(EvilChatML):
        name = "parrot"


    @hookimpl(trylast={trylast})
    def register_chat_templates(register):
        register(EvilChatML())
        register(Parrot())
"""

#: Loads the plugins with the third party's folder before or after site-packages (where sft-forge is).
PROBE = """
import json, sys
from importlib import metadata
(sys.path.insert(0, sys.argv[1]) if sys.argv[2] == "before" else sys.path.append(sys.argv[1]))
from sft.core.plugins import get_plugin_manager
pm = get_plugin_manager()
print(json.dumps({
    "order": [ep.dist.name for ep in metadata.entry_points(group="sft") if ep.dist.name in ("sft-forge", "sft-evil")],
    "chatml": [pm.owner("chat_template", "chatml"), pm.get("chat_template", "chatml").stop_tokens()],
    "parrot": pm.owner("chat_template", "parrot"),
    "listing": {p.name: p.to_json() for p in pm.listing()},
}))
"""


@pytest.mark.parametrize("trylast", [False, True])
@pytest.mark.parametrize("order", ["before", "after"])
def test_a_third_party_chatml_never_replaces_the_bundled_one(tmp_path: Path, order: str, trylast: bool):
    _fake_distribution(tmp_path, "sft-evil", "sft_evil_plugin", CLASHING_PLUGIN.format(trylast=trylast), "evil")
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), order], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout)
    first = "sft-evil" if order == "before" else "sft-forge"
    assert probe["order"][0] == first  # the entry points really come in this order
    assert probe["chatml"] == ["templates.chatml", ["<|im_end|>"]]
    evil = probe["listing"]["evil"]
    # Only the clashing registration is dropped: the rest of the third party keeps working.
    assert evil["status"] == "ok" and evil["provides"] == {"chat_template": ["parrot"]} and probe["parrot"] == "evil"
    line = ("chat template 'chatml' of plugin 'evil' (sft-evil 1.2.3) is left out: the name is sft's own "
            "(plugin 'templates.chatml' (sft-forge 0.1.0) keeps it); rename it in that plugin")
    assert evil["clashes"] == [line]
    assert result.stderr.count(line) == 1  # a notice, once


def test_a_clash_with_sft_is_shown_by_sft_plugins_and_two_third_parties_still_refuse(tmp_path: Path):
    _fake_distribution(tmp_path, "sft-evil", "sft_evil_plugin", CLASHING_PLUGIN.format(trylast=False), "evil")
    parrot_only = """
        from sft.core import hookimpl
        from sft_evil_plugin import Parrot


        @hookimpl
        def register_chat_templates(register):
            register(Parrot())
    """
    _fake_distribution(tmp_path, "sft-echo", "sft_echo_plugin", parrot_only, "echo")
    table = _sft("plugins", pythonpath=tmp_path)
    assert table.returncode == 0, table.stderr
    evil = next(line for line in table.stdout.splitlines() if line.startswith("evil "))
    assert evil.endswith("ok; chat template 'chatml' of plugin 'evil' (sft-evil 1.2.3) is left out: the name is "
                         "sft's own (plugin 'templates.chatml' (sft-forge 0.1.0) keeps it); rename it in that plugin")
    assert "[sft] chat template 'chatml' of plugin 'evil'" in table.stderr
    listing = {p["name"]: p for p in json.loads(_sft("plugins", "--json", pythonpath=tmp_path).stdout)}
    # Between two third parties the first one (by sys.path order) keeps the name; the second is disabled.
    second = "echo" if listing["evil"]["status"] == "ok" else "evil"
    assert listing[second]["status"] == "failed"
    assert ("chat_template 'parrot' is registered by both plugin" in listing[second]["error"]
            and "(sft-evil 1.2.3)" in listing[second]["error"] and "(sft-echo 1.2.3)" in listing[second]["error"])


def test_cli_listing_does_not_import_heavy_libraries():
    code = textwrap.dedent(
        """
        import sys
        from click.testing import CliRunner
        from sft.cli import cli
        for args in (["--help"], ["plugins"], ["plugins", "--json"]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, result.output
        heavy = [m for m in ("torch", "transformers", "wandb", "peft", "trl", "llama_cpp") if m in sys.modules]
        print("HEAVY", heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
