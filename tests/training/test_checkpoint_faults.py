"""Checkpoint writes that fail: a full disk is named as such, and the last complete checkpoint stays usable."""

import shutil
from collections import namedtuple

import pytest

from tests.training.test_resume_plan import _config, train_records
from wrpo_nemo.pipeline import run
from wrpo_nemo.training import checkpoint as ckpt

Usage = namedtuple("Usage", "total used free")


def test_a_save_failing_on_a_full_disk_says_so_and_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save
    calls = []

    def save(state, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second save (step 4): torch's zip writer on a full disk
            real_save(state, path, *args, **kwargs)
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 704 vs 598")
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", save)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(ckpt.CheckpointSaveError) as raised:
        run(_config(tmp_path, max_steps=6))
    message = str(raised.value)
    assert "step_0000004" in message and "the disk is full" in message and "1 MiB free" in message
    assert "step_0000002, is intact" in message and "unexpected pos 704 vs 598" in message
    root = ckpt.checkpoint_root(tmp_path / "sft")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "sft")] == ["step_0000002"]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "a staging folder was left behind"

    # The disk has room again: the run resumes from step 2 and finishes.
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", shutil.disk_usage)
    assert run(_config(tmp_path, max_steps=6))["sft"].steps == 6


def test_old_checkpoints_are_renamed_before_deletion_and_hidden_leftovers_are_never_listed(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    for name in ("step_0000002", "step_0000004", ".step_0000006.partial", ".step_0000001.deleting-abcd1234"):
        (root / name / "weights").mkdir(parents=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000004"]
    from wrpo_nemo.checkpoint.atomic import remove_tree

    renamed = []
    real_rename = ckpt.os.rename if hasattr(ckpt, "os") else None
    import os

    def spy(src, dst):
        renamed.append((str(src), str(dst)))
        return os.replace(src, dst)

    import wrpo_nemo.checkpoint.atomic as atomic

    original = atomic.os.rename
    atomic.os.rename = spy
    try:
        remove_tree(root / "step_0000002")
    finally:
        atomic.os.rename = original
    assert real_rename is None or callable(real_rename)
    assert renamed and renamed[0][0].endswith("step_0000002") and ".step_0000002.deleting-" in renamed[0][1]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000004"]


@pytest.mark.parametrize("damaged", ["__0_0.distcp", "common.pt"])
def test_a_damaged_newest_checkpoint_is_reported_by_file_and_the_previous_one_resumes_exactly(
    tmp_path, damaged, capsys, uninterrupted
):
    straight = uninterrupted(6)
    split = tmp_path / "split"
    run(_config(split, max_steps=6))
    # As if step 6's checkpoint had been damaged after step 4's was complete (metrics.jsonl is cut back).
    newest = ckpt.list_checkpoints(split / "sft")[-1]
    target = newest / "weights" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    done = ckpt.read_trainer_state(ckpt.list_checkpoints(split / "sft")[-2])
    assert done["step"] == 4
    result = run(_config(split, max_steps=6))["sft"]
    out = capsys.readouterr().out
    assert f"checkpoint {newest} cannot be resumed from" in out and str(target) in out
    assert result.steps == 6
    assert train_records(split) == train_records(straight)


def test_when_no_checkpoint_loads_the_error_names_each_damaged_file(tmp_path):
    from wrpo_nemo.errors import InputError

    run(_config(tmp_path, max_steps=4))
    for path in ckpt.list_checkpoints(tmp_path / "sft"):
        target = path / "weights" / "common.pt"
        target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(
        InputError, match=r"no checkpoint of this stage can be resumed from.*step_0000004.*common\.pt"
    ):
        run(_config(tmp_path, max_steps=4))


def test_a_run_folder_moved_elsewhere_resumes(tmp_path, uninterrupted):
    straight = uninterrupted(4)
    before = tmp_path / "before"
    run(_config(before, max_steps=4))
    shutil.rmtree(ckpt.list_checkpoints(before / "sft")[-1])  # as if stopped after step 2's checkpoint
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(before, moved)
    result = run(_config(moved, max_steps=4))["sft"]
    assert result.steps == 4
    assert train_records(moved) == train_records(straight)
