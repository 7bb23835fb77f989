"""The docs agree with the code: generated references are current, every key is described, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sft import docgen

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.mark.parametrize("path", sorted(docgen.generate(DOCS)), ids=lambda p: p.name)
def test_generated_docs_are_current(path: Path):
    # Regenerate and compare: a new config key, a changed default or help text, a plugin
    # option or a CLI option that is not in the committed docs fails here.
    expected = docgen.generate(DOCS)[path]
    assert path.exists(), f"{path} is missing: run python -m sft.docgen"
    assert path.read_text() == expected, f"{path} is out of date: run python -m sft.docgen"


def test_every_config_key_is_in_the_reference_with_type_default_and_description():
    text = (DOCS / "configuration.md").read_text()
    keys = docgen.config_keys()
    assert len(keys) > 40
    undocumented = [k.key for k in keys if not k.help.strip()]
    assert not undocumented, f"config fields without help= metadata: {undocumented}"
    for key in keys:
        leaf = key.key.rsplit(".", 1)[-1]
        row = f"| `{leaf}` | `{key.type}` | `{docgen._yaml_value(key.default)}` |"
        assert row in text, f"{key.key}: no row {row!r} in configuration.md"


def test_every_bundled_plugin_option_node_has_a_section():
    text = (DOCS / "configuration.md").read_text()
    pm = docgen._bundled_manager()
    for kind, (_hook, _iface, section) in docgen.KINDS.items():
        for name, obj in pm.registry(kind).items():
            if obj.options is not None:
                assert f"### `{section}.{name}`" in text


def test_check_mode_detects_a_stale_file(tmp_path: Path):
    for path, text in docgen.generate(tmp_path).items():
        path.write_text(text)
    assert docgen.main(["--docs", str(tmp_path), "--check"]) == 0
    (tmp_path / "configuration.md").write_text("stale\n")
    assert docgen.main(["--docs", str(tmp_path), "--check"]) == 1


def test_every_cli_command_is_in_the_cli_reference():
    from sft.cli import cli

    text = (DOCS / "cli.md").read_text()
    for name in cli.commands:
        assert f"## `sft {name}`" in text


def _markdown_files() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(path: Path):
    # A docs page that links a page nobody wrote (or a renamed one) fails here.
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert not broken, f"{path.name} links to missing files: {broken}"


def test_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    pages = [p.name for p in DOCS.glob("*.md") if p.name != "index.md"]
    missing = [p for p in pages if f"({p})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"
