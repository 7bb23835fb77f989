"""The ``gpu`` extra resolves together with the project's own pins (issue 14), checked cheaply on PyPI.

A full ``pip install --dry-run --ignore-installed ".[gpu]"`` resolves ~95 packages and takes
over a minute, too long for every CI run (docs/benchmarks.md gives the command and what it
picked). This checks what can conflict: the requirements of the extra's pinned packages
(unsloth, unsloth_zoo, as PyPI publishes them) against the project's dependencies and the
extra, package by package, over the versions PyPI's simple index lists (what pip reads,
PEP 691 JSON and PEP 658 metadata, or the two wheels where an index lacks the latter).
"""

from __future__ import annotations

import io
import json
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: Where a conflict would stop pip: the libraries both sft and Unsloth constrain.
SHARED = ("transformers", "datasets", "trl", "torch", "peft", "accelerate", "bitsandbytes", "unsloth-zoo")
#: A CUDA training machine (what the extra is for): Linux x86-64, CPython 3.12.
CUDA_HOST = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux",
             "platform_machine": "x86_64", "python_version": "3.12", "python_full_version": "3.12.3"}


def _get(url: str, accept: str = "*/*") -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()
    except urllib.error.HTTPError:
        raise  # PyPI answered: a missing release is a failure, not an offline machine
    except (urllib.error.URLError, TimeoutError) as exc:  # no network: nothing can be checked here
        pytest.skip(f"PyPI is not reachable ({exc})")


def _index(name: str) -> dict:
    """PyPI's simple index of ``name`` as JSON (PEP 691): the files and versions pip sees."""
    return json.loads(_get(f"https://pypi.org/simple/{canonicalize_name(name)}/",
                           "application/vnd.pypi.simple.v1+json"))


def _requires(name: str, version: str) -> list[str]:
    """``Requires-Dist`` of a release's wheel, from its PEP 658 metadata file (what pip reads)."""
    wheels = [f for f in _index(name)["files"]
              if f["filename"].endswith(".whl") and f"-{version}-" in f["filename"]]
    assert wheels, f"{name} {version}: no wheel on PyPI"
    wheel = wheels[0]
    if wheel.get("core-metadata") or wheel.get("dist-info-metadata"):
        metadata = _get(wheel["url"] + ".metadata").decode()
    else:  # an index without PEP 658 files: read METADATA out of the wheel itself (unsloth's is 31 MB)
        with zipfile.ZipFile(io.BytesIO(_get(wheel["url"]))) as archive:
            metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]


def _versions(name: str) -> list[Version]:
    index = _index(name)
    yanked = {f["filename"] for f in index["files"] if f.get("yanked")}
    return [Version(v) for v in index["versions"]
            if any(f"-{v}" in f["filename"] and f["filename"] not in yanked for f in index["files"])]


def _applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate({**CUDA_HOST, "extra": ""})


def test_the_gpu_extra_resolves_with_the_project_pins():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    gpu = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    requirements = [Requirement(r) for r in project["dependencies"]] + gpu
    for req in gpu:
        pins = [s.version for s in req.specifier if s.operator == "=="]
        if pins:
            requirements += [Requirement(r) for r in _requires(req.name, pins[0])]
    combined: dict[str, SpecifierSet] = {}
    for req in requirements:
        if _applies(req):
            name = canonicalize_name(req.name)
            combined[name] = combined.get(name, SpecifierSet()) & req.specifier
    assert {"unsloth", "unsloth-zoo", "bitsandbytes"} <= set(combined)
    chosen = {}
    for name in SHARED:
        fitting = sorted(combined[name].filter(_versions(name)))
        assert fitting, f"{name}: no release satisfies {combined[name]}"
        chosen[name] = fitting[-1]
    # What the suite then runs on (tests/gpu runs on exactly these on the GPU machine).
    assert chosen["transformers"] == Version("5.17.0")
    assert chosen["datasets"] < Version("5")
    assert chosen["trl"] == Version("1.14.2")


def test_checkpointing_is_switched_off_by_the_name_the_installed_transformers_knows():
    """The gpu extra caps transformers at 5.17, whose TrainingArguments has no
    ``activation_checkpointing`` (5.18 renamed ``gradient_checkpointing``): passing the new name
    there raised TypeError before training could start."""
    import dataclasses

    from trl import SFTConfig

    from sft.engine.trainer import _checkpointing_argument

    @dataclasses.dataclass
    class Transformers517Arguments:
        gradient_checkpointing: bool = True

    assert _checkpointing_argument(Transformers517Arguments) == "gradient_checkpointing"
    name = _checkpointing_argument(SFTConfig)
    assert name in {f.name for f in dataclasses.fields(SFTConfig)}
    assert getattr(SFTConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, **{name: False}), name) is False
