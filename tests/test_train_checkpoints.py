"""Atomic checkpoints on disk: commit, completeness, incomplete leftovers and rotation (no model needed)."""

from __future__ import annotations

from pathlib import Path

from sft.engine import checkpoints
from sft.engine.checkpoints import COMPLETE, commit_checkpoint, last_complete, rotate, scan, staging_dir


def _write(root: Path, step: int) -> Path:
    """A checkpoint the way the trainer writes it: inside a staging folder, then committed."""
    written = staging_dir(root, step) / f"checkpoint-{step}"
    written.mkdir()
    (written / "adapter_model.safetensors").write_bytes(b"w" * (10 + step))
    (written / "trainer_state.json").write_text('{"global_step": %d}' % step)
    return commit_checkpoint(written, root, step)


def test_commit_renames_into_place_and_marks_complete(tmp_path):
    final = _write(tmp_path, 3)
    assert final == tmp_path / "checkpoint-3"
    assert (final / COMPLETE).is_file()
    assert checkpoints.is_complete(final)
    # The staging folder is gone.
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]


def test_incomplete_checkpoints_are_ignored_with_a_notice(tmp_path):
    _write(tmp_path, 2)
    # Killed between the rename and the marker:
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"half")
    # A file truncated after the marker was written no longer matches the manifest:
    _write(tmp_path, 6)
    (tmp_path / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"x")
    notices: list[str] = []
    last = last_complete(tmp_path, notify=notices.append)
    assert last is not None and last.step == 2
    assert len(notices) == 2 and "checkpoint-4" in notices[0] and "no valid COMPLETE marker" in notices[0]
    truncated = tmp_path / "checkpoint-6" / "adapter_model.safetensors"
    assert f"ignoring damaged checkpoint checkpoint-6: {truncated} is truncated or corrupt" in notices[1]


def test_rotation_keeps_the_newest_complete_one(tmp_path):
    for step in (1, 2, 3, 4):
        _write(tmp_path, step)
    (tmp_path / "checkpoint-5").mkdir()  # incomplete, newer than every complete one: kept
    deleted = rotate(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-2"]
    assert [c.step for c in scan(tmp_path)] == [3, 4, 5]
    # A limit below one still keeps the newest complete checkpoint.
    rotate(tmp_path, keep=0)
    assert [c.step for c in scan(tmp_path) if c.complete] == [4]


def test_recommitting_a_step_replaces_the_old_folder(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()  # an incomplete leftover of the same step
    final = _write(tmp_path, 2)
    assert checkpoints.is_complete(final)
    assert last_complete(tmp_path).step == 2
