"""Exports never destroy: what an export may replace, the atomic swap, and what interrupted exports leave
(effx.exporters.folder), with a tiny Program and with processes killed at random points."""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import time

import pytest

import effx
from effx.errors import ArtifactError
from effx.exporters import folder
from effx.exporters import onnx as exporter
from effx.testing import tiny_model


@pytest.fixture(scope="module")
def program():
    return effx.transform(tiny_model("llama", layers=1))


def _tree(path):
    return sorted(
        (str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*")
    )


def _user_folder(path):
    path.mkdir()
    (path / "thesis.txt").write_text("three years of work")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("1,2,3")
    return _tree(path)


def test_a_folder_that_is_not_an_artifact_is_refused_and_kept(program, tmp_path):
    target = tmp_path / "mine"
    before = _user_folder(target)
    with pytest.raises(ArtifactError, match="not an effx artifact"):
        exporter.export(program, target)
    assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing left beside it
    _fake_export(target, 1, overwrite=True)  # asked for: replaced
    assert _complete(target) == 1 and not (target / "thesis.txt").exists()


def test_the_current_directory_its_parents_and_files_are_refused(program, tmp_path, monkeypatch):
    work = tmp_path / "project"
    before = _user_folder(work)
    monkeypatch.chdir(work)
    for target in (".", "..", str(work), str(tmp_path), "sub/.."):
        for overwrite in (False, True):
            with pytest.raises(ArtifactError, match="current directory"):
                exporter.export(program, target, overwrite=overwrite)
    with pytest.raises(ArtifactError, match="is a file"):
        exporter.export(program, "thesis.txt", overwrite=True)
    with pytest.raises(ArtifactError, match="above the current directory"):
        folder.check_target("/")
    assert _tree(work) == before


def test_cli_refuses_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from effx import cli

    work = tmp_path / "w"
    before = _user_folder(work)
    monkeypatch.chdir(work)
    monkeypatch.setattr(effx.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["export", "--model", "smollm2-135m", "."]) == 1
    assert "current directory" in capsys.readouterr().err
    assert cli.main(["export", "--model", "smollm2-135m", str(work)]) == 1
    assert cli.main(["export", "--model", "smollm2-135m", "sub"]) == 1
    assert "--force" in capsys.readouterr().err
    assert _tree(work) == before


def test_an_artifact_or_an_empty_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "art"
    target.mkdir()
    _fake_export(target, 1)  # an empty folder
    (target / "stale.onnx").write_text("from an older export")
    _fake_export(target, 2)
    assert _complete(target) == 2 and not (target / "stale.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_failed_export_leaves_the_old_artifact_as_it_was(program, tmp_path, monkeypatch):
    target = tmp_path / "art"
    _fake_export(target, 1)
    before = _tree(target)
    stage_export = importlib.import_module("effx.exporters.onnx_stage")
    real, seen = stage_export.export_onnx, []

    def failing(gm, *args, **kw):
        seen.append(gm)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(gm, *args, **kw)

    monkeypatch.setattr(stage_export, "export_onnx", failing)
    with pytest.raises(KeyboardInterrupt):
        exporter.export(program, target)
    assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_without_an_atomic_exchange_the_old_artifact_is_moved_aside_then_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "_exchange", lambda a, b: False)
    target = tmp_path / "art"
    _fake_export(target, 1)
    (target / "stale.txt").write_text("x")
    _fake_export(target, 2)
    assert _complete(target) == 2 and not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_leftovers_of_killed_exports_are_recovered_or_removed(tmp_path):
    target = tmp_path / "art"
    dead = _dead_pid()
    half = tmp_path / f".art.effx-new-{dead}-abc"
    half.mkdir()
    (half / "layer.0.onnx").write_text("half")
    aside = tmp_path / f".art.effx-old-{dead}-def"
    aside.mkdir()
    (aside / "plan.json").write_text("{}")
    live = tmp_path / f".art.effx-new-{os.getpid()}-ghi"  # an export still running: left alone
    live.mkdir()
    mine = tmp_path / ".art.effx-new-notapid"  # not a name effx writes: left alone
    mine.mkdir()
    folder._recover(target)
    assert (target / "plan.json").read_text() == "{}"  # the old artifact put back
    assert not half.exists() and not aside.exists() and live.exists() and mine.exists()


def _fake_export(target, generation: int, overwrite: bool = False) -> None:
    """What an export does to the folders, with a fake artifact of 8 files written slowly."""
    with folder.replacing(target, overwrite=overwrite) as tmp:
        for i in range(8):
            (tmp / f"layer.{i}.onnx").write_text(str(generation))
            time.sleep(0.001)
        (tmp / "plan.json").write_text(json.dumps({"generation": generation}))


def _complete(target) -> int:
    """The generation of the complete artifact at ``target`` (assertion error if it is not one)."""
    assert folder.is_artifact(target), sorted(os.listdir(target.parent))
    generation = json.loads((target / "plan.json").read_text())["generation"]
    assert all((target / f"layer.{i}.onnx").read_text() == str(generation) for i in range(8))
    return generation


@pytest.mark.parametrize("exchange", [True, False])
def test_exports_killed_at_random_points_leave_a_complete_artifact(tmp_path, monkeypatch, exchange):
    """20 exports (each replacing the last) killed with SIGKILL at random points: the path always holds a
    complete artifact, old or new, and the next export cleans up what the killed one left."""
    if not exchange:
        monkeypatch.setattr(folder, "_exchange", lambda a, b: False)
    target = tmp_path / "art"
    _fake_export(target, 0)
    rng = random.Random(0)
    for generation in range(1, 21):
        pid = os.fork()
        if pid == 0:  # the exporting process: replaces the artifact over and over until killed
            try:
                for g in range(generation * 1000, generation * 1000 + 1000):
                    _fake_export(target, g)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not target.exists():  # killed between the two renames of the fallback: the next export restores
            folder._recover(target)
        _complete(target)
    _fake_export(target, 99)
    assert _complete(target) == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
