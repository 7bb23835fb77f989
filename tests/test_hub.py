"""Pushing exports to the Hugging Face Hub (plugins/publishers/hub/), against the loopback Hub of tests/hubstub.py.

The client is the real huggingface_hub. ``sft push`` and ``sft run`` run as subprocesses with
``HF_ENDPOINT`` pointing at the stub and the token in ``HF_TOKEN``, as a user runs them (the
endpoint is read when huggingface_hub is imported); the end-to-end ``sft run --push-to-hub``
trains in this process, with huggingface_hub's constants patched the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hubstub import HubStub

from sft.plugins.publishers.hub.pusher import TAG
from sft.testing import make_plugin_manager, run_sft, tiny_overrides

TOKEN = "hf_sftLoopbackToken4f9c2e7a1b"
READ_TOKEN = "hf_sftReadOnlyToken0d3b8a"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def hub():
    with HubStub(tokens={TOKEN: ("alice", "write"), READ_TOKEN: ("alice", "read")}, orgs=("acme",)) as stub:
        yield stub


def hub_env(hub: HubStub, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    """The environment of a user whose Hub is the stub: no stored login, the token (if any) in HF_TOKEN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    # Xet is another upload protocol the stub does not speak; LFS is what huggingface_hub falls back to.
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def sft(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test kit's tiny run with lora, merged_16bit and gguf (q8_0) exports on disk (unverified, for speed)."""
    from sft.engine.export import export_run

    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("hub") / "run"))
    results = export_run(run, ["lora", "merged_16bit", "gguf"], ["export.verify=false"], pm=make_plugin_manager())
    assert all(r.ok for r in results), [r.error for r in results]
    return run


@pytest.fixture
def run_dir(exported: Path, tmp_path: Path) -> Path:
    """A private copy of the exported run (its summary's paths still name the original; sft push maps them)."""
    return Path(shutil.copytree(exported, tmp_path / "run"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name != "README.md"}


def assert_token_nowhere(run: Path, *texts: str, token: str = TOKEN) -> None:
    for path in run.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"the token is written in {path}"
    for text in texts:
        assert token not in text


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_push_lands_the_exports_byte_for_byte_with_private_repos_and_model_cards(run_dir: Path, hub: HubStub,
                                                                               tmp_path: Path) -> None:
    res = sft("push", run_dir, "--repo", "tiny", f"publish.hub.base_model={BASE}", env=hub_env(hub, tmp_path / "hf"))
    assert res.returncode == 0, res.stderr

    # One repo per export kind, named as Unsloth users expect; private by default.
    layout = {"lora": "alice/tiny-lora", "merged_16bit": "alice/tiny", "gguf": "alice/tiny-GGUF"}
    assert set(hub.repos) == set(layout.values())
    assert all(repo.private for repo in hub.repos.values())
    for name, repo_id in layout.items():
        remote = hub.repos[repo_id].files()
        local = local_files(run_dir / "exports" / name)
        assert local, name
        for path, data in local.items():
            assert sha256(remote[path]) == sha256(data), f"{repo_id}/{path} differs from the local export"
        assert sha256(remote["loss.png"]) == sha256((run_dir / "loss.png").read_bytes())
        assert ".sft-merged.json" not in remote  # sft's own bookkeeping stays home
        card = hub.repos[repo_id].card()
        assert card["base_model"] == BASE
        assert {"sft-forge", "chatml"} <= set(card["tags"])
        assert card["pipeline_tag"] == "text-generation"
        record = summary(run_dir)["publish"]["hub"]["exports"][name]
        assert record["ok"] and record["repo"] == repo_id and record["private"] is True
        assert sorted(record["uploaded"]) == sorted([*local, "loss.png", "README.md"])

    cards = {name: hub.repos[repo_id].card() for name, repo_id in layout.items()}
    assert cards["lora"]["library_name"] == "peft" and "quantized_by" not in cards["lora"]
    assert cards["merged_16bit"]["library_name"] == "transformers"
    assert cards["gguf"]["library_name"] == "gguf" and cards["gguf"]["quantized_by"] == "alice"
    gguf_card = hub.repos["alice/tiny-GGUF"].files()["README.md"].decode()
    gguf_name = next(p for p in local_files(run_dir / "exports" / "gguf") if p.endswith(".gguf"))
    assert "llama-cli -hf alice/tiny-GGUF:Q8_0" in gguf_card and "ollama run hf.co/alice/tiny-GGUF:Q8_0" in gguf_card
    assert "ollama create" in gguf_card and gguf_name.replace(".gguf", ".Modelfile") in gguf_card
    assert "![Training loss](loss.png)" in gguf_card and "r=4, alpha=8" in gguf_card
    # training.packing=auto did not pack the tiny run's rows: the card says what happened, not what was asked.
    [schedule] = [line for line in gguf_card.splitlines() if "max length" in line]
    assert summary(run_dir)["packed"] is False and "packed" not in schedule

    # The token went to the Hub in the Authorization header, and nowhere in the run directory or the logs.
    assert TOKEN in hub.authorizations
    assert_token_nowhere(run_dir, res.stdout, res.stderr)


def test_a_connection_cut_mid_push_then_sft_push_completes_and_skips_what_is_there(run_dir: Path, hub: HubStub,
                                                                                   tmp_path: Path) -> None:
    env = hub_env(hub, tmp_path / "hf")
    hub.cut_commit("alice/cut")  # merged_16bit's commit: its blobs are up, the connection drops before the answer
    res = sft("push", run_dir, "--repo", "alice/cut", env=env)
    assert res.returncode == 1
    retry = re.search(r"Retry with: (sft publish .*)", res.stderr).group(1)
    assert retry == f"sft publish {run_dir} --to hub --exporter merged_16bit"  # the repo is the run's last target
    pushes = summary(run_dir)["publish"]["hub"]["exports"]
    assert not pushes["merged_16bit"]["ok"] and pushes["lora"]["ok"] and pushes["gguf"]["ok"]
    assert "model.safetensors" not in hub.repos["alice/cut"].files()  # nothing committed there
    weights = (run_dir / "exports/merged_16bit/model.safetensors").read_bytes()
    assert sha256(weights) in hub.lfs  # ... but its bytes had arrived
    assert (run_dir / "exports/merged_16bit/model.safetensors").is_file()  # nothing lost locally

    puts, commits = len(hub.requests("PUT")), {r: len(repo.commits) for r, repo in hub.repos.items()}
    res = sft(*retry.split()[1:5], env=env)  # sft publish RUN --to hub: every export, to the last push's repo
    assert res.returncode == 0, res.stderr
    assert len(hub.requests("PUT")) == puts  # no blob was sent again
    assert {r: len(repo.commits) for r, repo in hub.repos.items()} == {**commits, "alice/cut": 1}
    pushes = summary(run_dir)["publish"]["hub"]["exports"]
    assert pushes["lora"]["uploaded"] == [] and "adapter_model.safetensors" in pushes["lora"]["skipped"]
    assert pushes["gguf"]["uploaded"] == [] and pushes["gguf"]["commit"] is None
    assert "model.safetensors" in pushes["merged_16bit"]["uploaded"]
    assert sha256(hub.repos["alice/cut"].files()["model.safetensors"]) == sha256(weights)
    assert_token_nowhere(run_dir, res.stdout, res.stderr)


def test_a_repo_sft_did_not_make_needs_force_and_keeps_its_files(run_dir: Path, hub: HubStub, tmp_path: Path) -> None:
    env = hub_env(hub, tmp_path / "hf")
    # TRL tags its cards "sft" too: only sft-forge marks a repo sft made.
    theirs = hub.add_repo("alice/theirs-lora", {"README.md": b"---\ntags: [trl, sft]\n---\n# someone's\n", "notes.txt": b"keep"})
    res = sft("push", run_dir, "--exporter", "lora", "--repo", "theirs", env=env)
    assert res.returncode == 1
    assert "was not made by sft" in res.stderr and "--force" in res.stderr
    # The retry sft prints is one that can go through: it says force (issue 31).
    retry = re.search(r"Retry with: (sft publish .*)", res.stderr).group(1)
    assert retry == f"sft publish {run_dir} --to hub --exporter lora publish.hub.force=true"
    assert sorted(theirs.files()) == [".gitattributes", "README.md", "notes.txt"] and not theirs.commits

    # Forced, onto a branch of theirs (created from main).
    res = sft("push", run_dir, "--exporter", "lora", "--repo", "theirs", "--force", "publish.hub.revision=sft", env=env)
    assert res.returncode == 0, res.stderr
    assert sorted(theirs.files()) == [".gitattributes", "README.md", "notes.txt"]  # main untouched
    pushed = theirs.files("sft")
    assert pushed["notes.txt"] == b"keep"  # sft adds and replaces, never deletes
    assert pushed["adapter_model.safetensors"] == (run_dir / "exports/lora/adapter_model.safetensors").read_bytes()
    assert TAG in theirs.card("sft")["tags"] and summary(run_dir)["publish"]["hub"]["exports"]["lora"]["revision"] == "sft"


def test_a_bad_token_fails_before_training(tiny_model_dir: Path, hub: HubStub, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = tiny_overrides(out, tiny_model_dir) + ["export.enabled=[lora]"]
    res = sft("run", *overrides, "--push-to-hub", "alice/never", env=hub_env(hub, tmp_path / "hf", token="hf_wrong"))
    assert res.returncode == 1
    assert "token was refused" in res.stderr and "training did not start" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()  # no run directory, no training
    assert hub.requests("GET", "/api/whoami-v2") and not hub.repos


@pytest.mark.parametrize("token, message", [(None, "no Hugging Face token: set HF_TOKEN"), (READ_TOKEN, "read-only")])
def test_a_missing_or_read_only_token_is_refused_before_training(token, message, tmp_path, hub, monkeypatch) -> None:
    from huggingface_hub import constants

    from sft.engine.configuration import load_config
    from sft.core.errors import SftError
    from sft.engine.publish import Publishing

    patch_hub(monkeypatch, hub, tmp_path, token)
    pm = make_plugin_manager()
    cfg = load_config(overrides=["export.enabled=[lora,gguf]", "publish.hub.repo_id=x"], pm=pm)
    assert list(cfg.publish.enabled) == ["hub"]  # setting the repo turns the hub publisher on
    with pytest.raises(SftError, match=f"training did not start.*\n  - hub: .*{message}"):
        Publishing(cfg, pm).preflight(list(cfg.export.enabled))
    assert constants.ENDPOINT == hub.endpoint


def test_the_token_cannot_be_put_in_the_config() -> None:
    from sft.engine.configuration import load_config
    from sft.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"publish.hub.token: unknown key"):
        load_config(overrides=["publish.hub.repo_id=alice/x", "publish.hub.token=hf_abc"], pm=make_plugin_manager())


def test_an_old_export_push_section_reads_as_the_hub_publisher_with_a_notice(tmp_path: Path, capsys) -> None:
    """Runs made before publishers were a plugin kind keep working: their config.yaml's export.push."""
    from sft.engine.configuration import load_config

    old = tmp_path / "config.yaml"
    old.write_text("export:\n  enabled: [lora]\n  push:\n    repo_id: alice/old\n    private: false\n")
    cfg = load_config(str(old), pm=make_plugin_manager())
    assert cfg.publish.hub.repo_id == "alice/old" and cfg.publish.hub.private is False
    assert list(cfg.publish.enabled) == ["hub"] and "push" not in cfg.export
    assert ("read export.push.repo_id as publish.hub.repo_id, export.push.private as publish.hub.private: "
            "the export.push section moved to publish.hub") in capsys.readouterr().err
    # Without a repo, the old section turns nothing on.
    cfg = load_config(overrides=["export.push.private=false"], pm=make_plugin_manager())
    assert list(cfg.publish.enabled) == [] and cfg.publish.hub.private is False


def patch_hub(monkeypatch: pytest.MonkeyPatch, hub: HubStub, tmp_path: Path, token: str | None = TOKEN) -> None:
    """Point the huggingface_hub already imported in this process at the stub (it read HF_ENDPOINT at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)


def test_sft_run_push_to_hub_exits_1_naming_the_retry_which_then_completes(tiny_model_dir: Path, hub: HubStub,
                                                                          tmp_path: Path, monkeypatch,
                                                                          sft_plugin_manager) -> None:
    patch_hub(monkeypatch, hub, tmp_path)
    out = tmp_path / "run"
    hub.cut_commit("alice/e2e-lora")
    res = run_sft("run", *tiny_overrides(out, tiny_model_dir), "export.enabled=[lora]", "--push-to-hub", "e2e", check=False)
    assert res.exit_code == 1, res.output
    assert (out / "exports/lora/adapter_model.safetensors").is_file()  # the export is safe on disk
    assert f"Retry with: sft publish {out} --to hub --exporter lora\n" in res.output
    assert "repo_id: e2e" in (out / "config.yaml").read_text()

    res = run_sft("push", out, "--exporter", "lora")  # the repo comes from the run's config.yaml
    remote = hub.repos["alice/e2e-lora"].files()
    for path, data in local_files(out / "exports/lora").items():
        assert sha256(remote[path]) == sha256(data)
    record = summary(out)["publish"]["hub"]["exports"]["lora"]
    assert record["ok"] and record["private"] is True and "tokenizer.json" in record["uploaded"]
    assert_token_nowhere(out, res.output)


def test_the_python_apis_push_is_sft_push(run_dir: Path, hub: HubStub, tmp_path: Path, monkeypatch,
                                          sft_plugin_manager) -> None:
    """``run.push(...)`` in a notebook goes through sft push's machinery (the publish fan-out)."""
    import sft

    patch_hub(monkeypatch, hub, tmp_path)
    records = sft.load(run_dir).push("alice/api", exporters=["lora"])
    assert records["lora"]["ok"] and summary(run_dir)["publish"]["hub"]["exports"]["lora"]["ok"]
    [repo] = [name for name in hub.repos if name.startswith("alice/api")]
    remote = hub.repos[repo].files()
    for path, data in local_files(run_dir / "exports/lora").items():
        assert sha256(remote[path]) == sha256(data)


def test_a_run_pushed_before_publishers_were_a_kind_pushes_again_to_its_repo(run_dir: Path, hub: HubStub,
                                                                             tmp_path: Path) -> None:
    """An older run kept its resolved repo in summary.json's ``hub`` record: sft push finds it there."""
    record = summary(run_dir)
    record["hub"] = {"repo_id": "alice/legacy", "pushes": {}}
    (run_dir / "summary.json").write_text(json.dumps(record))
    res = sft("push", run_dir, "--exporter", "lora", env=hub_env(hub, tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    assert "adapter_model.safetensors" in hub.repos["alice/legacy-lora"].files()
    assert summary(run_dir)["publish"]["hub"]["target"] == "alice/legacy"


# -- issue 31: a run folder someone sent you is data -------------------------------------------------
SECRET_BYTES = b"-----BEGIN OPENSSH PRIVATE KEY----- 7f3a9c"


def _sent_anywhere(hub: HubStub, data: bytes) -> bool:
    blobs = list(hub.lfs.values()) + [f for repo in hub.repos.values() for branch in repo.branches.values()
                                      for f in branch.values()]
    return any(data in blob for blob in blobs) or any(data.decode() in json.dumps(repo.commits, default=str)
                                                       for repo in hub.repos.values())


def _edit_config(run_dir: Path, **dotted: object) -> None:
    """Change the run's config.yaml as a sender would (keys with '__' for dots)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    for key, value in dotted.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    """A home folder beside the run with what must never leave it."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/id_ed25519").write_bytes(SECRET_BYTES)
    (home / "credentials").write_bytes(SECRET_BYTES + b" aws_secret_access_key")
    return home


def _plant(run_dir: Path, secrets: Path, how: str) -> str:
    """Make the received run reach ``secrets`` one way; return the path sft must name."""
    lora = run_dir / "exports/lora"
    if how == "absolute path in summary.json":
        record = summary(run_dir)
        record["exports"]["lora"]["paths"].append(str(secrets / ".ssh"))
        (run_dir / "summary.json").write_text(json.dumps(record))
        return str(secrets / ".ssh")
    if how == "file link in exports":
        (lora / "notes.txt").symlink_to(secrets / "credentials")
        return str(lora / "notes.txt")
    if how == "folder link in exports":
        (lora / "keys").symlink_to(secrets / ".ssh")
        return str(lora / "keys")
    if how == "exports is a link":
        shutil.move(run_dir / "exports", secrets / "exports")
        shutil.copy(secrets / "credentials", secrets / "exports/lora/credentials")
        (run_dir / "exports").symlink_to(secrets / "exports")
        return str(run_dir / "exports")
    assert how == "loss plot is a link"
    (run_dir / "loss.png").unlink()
    (run_dir / "loss.png").symlink_to(secrets / ".ssh/id_ed25519")
    return str(run_dir / "loss.png")


@pytest.mark.parametrize("how", ["absolute path in summary.json", "file link in exports", "folder link in exports",
                                 "exports is a link", "loss plot is a link"])
def test_a_received_run_pushes_nothing_from_outside_it(run_dir: Path, hub: HubStub, tmp_path: Path, secrets: Path,
                                                       how: str) -> None:
    named = _plant(run_dir, secrets, how)
    res = sft("push", run_dir, "--exporter", "lora", "--repo", "leak", env=hub_env(hub, tmp_path / "hf"))
    assert res.returncode == 1, res.stderr
    line = next(line for line in res.stderr.splitlines() if named in line)
    assert ("a symbolic link" in line and "follows no link" in line) or "outside" in line, line
    assert "Traceback" not in res.stderr
    assert not _sent_anywhere(hub, SECRET_BYTES)
    assert not any(repo.commits for repo in hub.repos.values())  # nothing at all was committed
    if how != "loss plot is a link":  # checked before the publisher starts: not even the token is sent
        assert not hub.requests("GET", "/api/whoami-v2") and not hub.repos


def test_a_received_run_cannot_make_a_repo_public_or_force_one(run_dir: Path, hub: HubStub, tmp_path: Path) -> None:
    env = hub_env(hub, tmp_path / "hf")
    theirs = hub.add_repo("alice/mine-lora", {"README.md": b"# my own model\n", "notes.txt": b"keep"})
    _edit_config(run_dir, publish__hub__repo_id="shared", publish__hub__private=False, publish__hub__force=True)
    res = sft("push", run_dir, "--exporter", "lora", env=env)
    assert res.returncode == 0, res.stderr
    assert (f"publish.hub.private=false comes from {run_dir / 'config.yaml'}, which cannot choose it for you: using "
            f"true; to confirm it add publish.hub.private=false (sft push: --public)") in res.stderr
    assert "publish.hub.force=true comes from" in res.stderr
    assert hub.repos["alice/shared-lora"].private is True
    # force was not taken from the folder either: a repo sft did not make stays untouched.
    res = sft("push", run_dir, "--exporter", "lora", "--repo", "mine", env=env)
    assert res.returncode == 1 and "was not made by sft" in res.stderr and not theirs.commits

    res = sft("push", run_dir, "--exporter", "lora", "--repo", "open", "--public", env=env)
    assert res.returncode == 0, res.stderr
    assert hub.repos["alice/open-lora"].private is False and "publish.hub.private=false comes from" not in res.stderr


def test_a_received_config_that_reads_the_environment_sends_nothing(run_dir: Path, hub: HubStub, tmp_path: Path) -> None:
    env = {**hub_env(hub, tmp_path / "hf"), "SFT_SECRET": "s3cr3t-value-91"}
    _edit_config(run_dir, publish__hub__commit_message="${training.generation_prompt}",
                 training__generation_prompt="${oc.env:SFT_SECRET}")
    res = sft("push", run_dir, "--exporter", "lora", "--repo", "card", env=env)
    assert res.returncode == 2
    assert "training.generation_prompt: '${oc.env:SFT_SECRET}' reads the environment" in res.stderr
    assert "s3cr3t-value-91" not in res.stderr + res.stdout and not hub.repos
    assert not _sent_anywhere(hub, b"s3cr3t-value-91")


@pytest.mark.parametrize("repo, message", [("a b", "'a b' is not a Hub repo id"),
                                           ("alice/x..y", "'alice/x..y' is not a Hub repo id: Cannot have -- or .."),
                                           ("a" * 94, "the lora export's repo '" + "a" * 94 + "-lora' is not a Hub repo id")])
def test_a_repo_id_the_hub_refuses_fails_validate_naming_the_key(repo, message, tiny_model_dir, hub, tmp_path,
                                                                 monkeypatch, sft_plugin_manager) -> None:
    patch_hub(monkeypatch, hub, tmp_path)
    res = run_sft("validate", *tiny_overrides(tmp_path / "run", tiny_model_dir), "export.enabled=[lora,gguf]",
                  f"publish.hub.repo_id={repo}", check=False)
    assert res.exit_code == 1
    [line] = [line for line in res.output.splitlines() if "publish.hub.repo_id" in line]
    assert f"hub: publish.hub.repo_id: {message}" in line
    assert not hub.requests("GET", "/api/whoami-v2")  # found without the network
