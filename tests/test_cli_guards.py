"""`video-r2 fit` never writes into another run's directory unless told to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from video_r2.cli import refuse_existing_run

REPO = Path(__file__).resolve().parents[1]


def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "demo-sft"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"old weights")
    (run / "config.yaml").write_text("old: config\n")
    return run


def test_a_new_or_empty_directory_is_fine(tmp_path):
    refuse_existing_run(str(tmp_path / "missing"), None, False)
    (tmp_path / "empty").mkdir()
    refuse_existing_run(str(tmp_path / "empty"), None, False)


def test_another_runs_directory_is_refused_and_left_intact(tmp_path):
    run = old_run(tmp_path)
    with pytest.raises(SystemExit, match=r"already holds a run .*--ckpt_path .*--overwrite_run true"):
        refuse_existing_run(str(run), None, False)
    # A checkpoint of some other run does not make this directory ours to write into.
    with pytest.raises(SystemExit, match="already holds a run"):
        refuse_existing_run(str(run), str(tmp_path / "elsewhere" / "last.ckpt"), False)
    assert (run / "config.yaml").read_text() == "old: config\n"
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"old weights"


def test_resuming_the_run_itself_is_allowed(tmp_path):
    run = old_run(tmp_path)
    refuse_existing_run(str(run), str(run / "checkpoints" / "last.ckpt"), False)
    assert (run / "config.yaml").is_file()


def test_overwrite_run_deletes_the_old_run_first(tmp_path):
    run = old_run(tmp_path)
    refuse_existing_run(str(run), None, True)
    assert not run.exists()  # nothing of the old run is left to mix with the new one


@pytest.mark.slow
def test_fit_cli_refuses_a_second_run_into_the_same_directory(tiny_demo, tmp_path):
    data = tiny_demo / "data"
    command = [
        sys.executable, "-m", "video_r2.cli", "fit", "--config", str(REPO / "configs/demo/sft.yaml"),
        "--model.init_args.backbone.name_or_path", str(tiny_demo / "model"),
        "--data.processor_path", str(tiny_demo / "model"),
        "--data.data_path", str(data / "video-r2-sft-dataset.json"), "--data.video_folder", str(data / "videos"),
        "--data.subtitles_folder", str(data / "subtitles"), "--data.val_data_path", "null",
        "--data.batch_size", "2", "--data.num_workers", "0", "--trainer.max_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.default_root_dir", str(tmp_path / "runs"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    run = tmp_path / "runs" / "demo-sft"
    config = (run / "config.yaml").read_text()
    exported = (run / "hf" / "final" / "adapter_model.safetensors").read_bytes()

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode != 0
    assert "already holds a run" in second.stderr + second.stdout
    assert (run / "config.yaml").read_text() == config
    assert (run / "hf" / "final" / "adapter_model.safetensors").read_bytes() == exported
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))


@pytest.mark.parametrize("where", ["backbone", "inside_backbone", "parent_of_backbone"])
def test_an_export_dir_over_the_starting_model_is_refused_before_anything_is_built(tiny_demo, tmp_path, where):
    import shutil

    from video_r2.model import ModelConfig
    from video_r2.sft import SFTModule
    from video_r2.stage import ExportArgs

    backbone = tmp_path / "models" / "start"
    shutil.copytree(tiny_demo / "model", backbone)
    export = {"backbone": backbone, "inside_backbone": backbone / "hf", "parent_of_backbone": backbone.parent}[where]
    before = {p: p.read_bytes() for p in backbone.rglob("*") if p.is_file()}
    module = SFTModule(backbone=ModelConfig(name_or_path=str(backbone)), export=ExportArgs(dir=str(export)))
    with pytest.raises(ValueError, match=r"export.dir .* overlaps the backbone \(and reference\) directory"):
        module.configure_model()
    assert module.model is None  # refused before the model was loaded
    assert {p: p.read_bytes() for p in before} == before
