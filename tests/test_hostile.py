"""The hostile user, on every CI run: each class of bad input and fault of issue 13 (LOST, validation, SILENT,
misleading, library errors, umask), attacked through the command lines and loaders as a user would. Every attack must
end NAMED: exit status 2 and one line naming the cause and the fix (or, for the library calls, a ThinkDiffError
saying so), with the user's files intact. RELIABILITY.md gives the tally."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_overrides
from thinkdiff_core import save_aligner, standin
from thinkdiff_core.__main__ import main as core_main
from thinkdiff_core.checkpoints import load_aligner
from thinkdiff_core.errors import (
    ChangedSettingsError,
    CheckpointError,
    ModelFolderError,
    NonFiniteError,
    PromptError,
    ThinkDiffError,
    UnsafeCheckpointError,
)
from thinkdiff_core.images import pil_images_from_tensor

TINY = "train/configs/tiny.yaml"


def one_line_error(capsys, rc: int, *words: str) -> str:
    """The contract of every command line: exit 2, one 'error: ...' line on stderr naming the cause, no traceback."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word.lower() in last.lower(), (word, last)
    return last


@pytest.fixture
def aligner_file(tmp_path):
    return save_aligner(standin.build_aligner(input_dim=3584, output_dim=16), tmp_path / "a.safetensors")


@pytest.fixture
def official_pth(tmp_path, aligner_file):
    state = load_file(aligner_file)
    names = {"linear_in": "mm_projector.0", "linear_out": "mm_projector.2", "norm": "mm_projector.3"}
    model = {f"{names[key.split('.')[0]]}.{key.split('.')[1]}": value for key, value in state.items()}
    torch.save({"model": model}, tmp_path / "x.pth")
    return tmp_path / "x.pth"


# --- LOST: no command destroys its input ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "relative path", "symlink", "hard link"])
def test_convert_never_writes_onto_its_input(official_pth, capsys, monkeypatch, how):
    before = official_pth.read_bytes()
    dst = official_pth
    if how == "relative path":
        monkeypatch.chdir(official_pth.parent)
        dst = Path(".") / ".." / official_pth.parent.name / official_pth.name
    elif how == "symlink":
        dst = official_pth.with_name("link.safetensors")
        dst.symlink_to(official_pth)
    elif how == "hard link":
        dst = official_pth.with_name("hard.safetensors")
        os.link(official_pth, dst)
    rc = core_main(["convert", str(official_pth), str(dst)])
    message = one_line_error(capsys, rc)
    assert "input" in message or "same" in message or ".safetensors" in message
    assert official_pth.read_bytes() == before


def test_a_failed_convert_keeps_the_earlier_output(tmp_path, aligner_file, capsys):
    (tmp_path / "bad.pth").write_bytes(os.urandom(2000))
    before = aligner_file.read_bytes()
    one_line_error(capsys, core_main(["convert", str(tmp_path / "bad.pth"), str(aligner_file)]), "not a PyTorch")
    assert aligner_file.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.safetensors",
        "bad.pth",
    ]


def test_generate_output_onto_an_input_image_is_refused(tmp_path, capsys):
    image = tmp_path / "in.png"
    standin.draw_shape_image("red").save(image)
    before = image.read_bytes()
    args = ["generate", "--vlm", "v", "--flux", "f", "--aligner", "a", "--image", str(image), "--words", "a", "b"]
    one_line_error(capsys, core_main([*args, "--output", str(image)]), "input image")
    assert image.read_bytes() == before


@pytest.mark.parametrize(
    "device, words",
    [("gpu", ("not a device torch knows", "cuda, cuda:1 or cpu")), ("cuda:7", ("CUDA GPU",))],
)
def test_a_device_this_machine_lacks_is_named_before_models_load(tmp_path, capsys, device, words):
    """Used to end in torch's 'Found no NVIDIA driver' (a RuntimeError blamed on a bug) after the models loaded."""
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    image = tmp_path / "in.png"
    standin.draw_shape_image("red").save(image)
    args = ["generate", "--vlm", "v", "--flux", "f", "--aligner", "a", "--image", str(image), "--words", "a", "b"]
    one_line_error(capsys, core_main([*args, "--output", str(tmp_path / "o.png"), "--device", device]), *words)


def test_extract_vision_never_writes_into_its_source(tmp_path, capsys):
    source = standin.build_blip2_vision(tmp_path / "blip2", full_blip2_layout=True)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    target = next(source.glob("*.safetensors"))
    one_line_error(capsys, core_main(["extract-vision", str(source), str(target)]), "inside")
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_resume_repairs_torn_metrics_falls_back_past_a_damaged_checkpoint_and_removes_leftovers(
    tiny_train_data, tiny_features, tmp_path, caplog
):
    """A torn last metrics line (full disk), a truncated newest checkpoint, a pruned-half folder without
    progress.json and a temp folder of a killed save, all at once: resume uses the previous checkpoint."""
    from thinkdiff_train.train_aligner import main

    run = tmp_path / "run"
    args = ["--config", TINY, "--output-dir", str(run), *tiny_overrides(tiny_train_data, checkpoint_every=2)]
    assert main([*args, "--max-steps", "4"]) == 0
    newest = run / "checkpoints" / "checkpoint-0000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    (run / "checkpoints" / "checkpoint-0000001").mkdir()  # pruning deletes progress.json first, then a kill
    (run / "checkpoints" / "checkpoint-0000001" / "optimizer.bin").write_bytes(b"x")
    (run / "checkpoints" / ".tmp-checkpoint-0000006").mkdir()
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "lo')
    assert main([*args, "--max-steps", "5", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5][: len(steps)] and steps[-1] == 5 and steps.count(4) <= 1
    assert "checkpoint-0000004 cannot be read back" in caplog.text and "torn" in caplog.text
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ".tmp-checkpoint-0000006" not in names and "checkpoint-0000001" not in names


def test_a_damaged_newest_checkpoint_is_set_aside_so_pruning_keeps_the_good_ones(
    tiny_train_data, tiny_features, tmp_path, caplog
):
    """After a resume falls back past a damaged checkpoint, that one is renamed damaged-checkpoint-N (kept, not
    counted): it can no longer stand as 'the newest' while pruning deletes the good ones around it."""
    from thinkdiff_train.train_aligner import main

    run = tmp_path / "run"
    args = ["--config", TINY, "--output-dir", str(run), *tiny_overrides(tiny_train_data, keep_checkpoints=2)]
    assert main([*args, "--set", "checkpoint_every=2", "--max-steps", "4"]) == 0
    newest = run / "checkpoints" / "checkpoint-0000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    assert main([*args, "--set", "checkpoint_every=1", "--max-steps", "3", "--resume"]) == 0
    assert "renamed to damaged-checkpoint-0000004" in caplog.text
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["checkpoint-0000002", "checkpoint-0000003", "damaged-checkpoint-0000004"], names
    caplog.clear()
    assert main([*args, "--set", "checkpoint_every=1", "--max-steps", "4", "--resume"]) == 0
    assert "cannot be read back" not in caplog.text  # the next resume starts from step 3 directly


def test_leftover_cleanup_completes_a_whole_temp_checkpoint_and_spares_what_it_cannot_read(tmp_path):
    """A kill between removing checkpoint-N and renaming its whole temp folder: the temp folder is renamed into
    place, not deleted. A progress.json that cannot be read (here a folder in its place: a real OSError that is not
    'missing') is an error naming it, and nothing is removed. A user's own '.notes.tmp' is not a temp file of ours."""
    from thinkdiff_train.checkpointing import ResumeError, RunFolder, remove_leftovers

    run = RunFolder(tmp_path / "run")
    whole = run.checkpoints / ".tmp-checkpoint-0000006"
    whole.mkdir(parents=True)
    (whole / "model.safetensors").write_bytes(b"weights")
    (whole / "progress.json").write_text(json.dumps({"step": 6}))
    (run.root / ".notes.tmp").write_text("mine")
    assert remove_leftovers(run) == []
    assert (run.checkpoints / "checkpoint-0000006" / "model.safetensors").read_bytes() == b"weights"
    assert (run.root / ".notes.tmp").read_text() == "mine"

    unreadable = run.checkpoints / "checkpoint-0000008"
    (unreadable / "progress.json").mkdir(parents=True)
    with pytest.raises(ResumeError, match="cannot read .*checkpoint-0000008.*progress.json.*left as it is"):
        remove_leftovers(run)
    assert unreadable.is_dir() and (run.checkpoints / "checkpoint-0000006").is_dir()


# --- validation before expensive work -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, words",
    [
        ("learning_rate=-1e-4", ("learning_rate", "> 0")),
        ("learning_rate=0", ("learning_rate",)),
        ("weight_decay=-0.05", ("weight_decay", "negative")),
        ("max_steps=0", ("max_steps", "at least 1")),
        ("log_every=0", ("log_every",)),
        ("checkpoint_every=0", ("checkpoint_every",)),
        ("batch_size=0", ("batch_size",)),
        ("top_p=1.5", ("top_p",)),
        ("beta2=1.0", ("beta2",)),
        ("temperature=0", ("temperature",)),
        ("learning_rate=.nan", ("learning_rate",)),
        ("warmup_steps=-3", ("warmup_steps",)),
        ("batch_size=four", ("batch_size",)),
        ("seed={a", ("--set",)),
        ("lerning_rate=1e-4", ("did you mean",)),
    ],
)
def test_bad_config_values_are_named_before_anything_loads(capsys, override, words):
    from thinkdiff_train.train_aligner import main

    one_line_error(capsys, main(["--config", TINY, "--set", override]), *words)


def test_bad_config_files_are_named(tmp_path, capsys):
    from thinkdiff_train.train_aligner import main

    (tmp_path / "bad.yaml").write_text("batch_size: [1,\n")
    one_line_error(capsys, main(["--config", str(tmp_path / "bad.yaml")]), "YAML")
    one_line_error(capsys, main(["--config", str(tmp_path)]), "could not be read")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--size", "0"], ("--size", "16")),
        (["--size", "8"], ("--size",)),
        (["--size", "1000"], ("multiple of 16",)),
        (["--steps", "0"], ("--steps",)),
        (["--guidance", "nan"], ("--guidance",)),
        (["--output", "out.xyz"], ("extension",)),
        (["--output", "IS_A_FILE/out.png"], ("not writable",)),
        (["--output", "DIR"], ("folder",)),
    ],
)
def test_generate_flags_are_checked_before_any_model_loads(tmp_path, capsys, flags, words):
    (tmp_path / "IS_A_FILE").write_text("x")
    (tmp_path / "DIR").mkdir()
    flags = [str(tmp_path / flag) if flag in ("IS_A_FILE/out.png", "DIR", "out.xyz") else flag for flag in flags]
    args = ["generate", "--vlm", str(tmp_path / "no-vlm"), "--flux", "f", "--mode", "text", "--prompt", "a cat"]
    one_line_error(capsys, core_main([*args, *flags]), *words)
    assert not (tmp_path / "thinkdiff.png").exists()


# --- no silent wrong result -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_folders(tmp_path_factory):
    """A good tiny qwen2_vl folder and three bad ones: T5 weights inside, no vision tower, a truncated weight file."""
    root = tmp_path_factory.mktemp("vlm_folders")
    good = standin.build_qwen2vl(root / "good")
    t5 = standin.build_t5(root / "t5")
    folders = {}
    for name in ("t5_weights", "no_vision", "truncated", "bad_config"):
        folders[name] = root / name
        shutil.copytree(good, folders[name])
    weights = next(folders["t5_weights"].glob("*.safetensors"))
    weights.unlink()
    shutil.copy(next(t5.glob("*.safetensors")), folders["t5_weights"] / "model.safetensors")
    weights = next(folders["no_vision"].glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "visual" not in k}, weights, metadata={"format": "pt"})
    weights = next(folders["truncated"].glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:5000])
    (folders["bad_config"] / "config.json").write_text('{"model_type": "qwen2_vl", ')
    return folders


@pytest.mark.parametrize(
    "name, words",
    [
        ("t5_weights", ("lack", "other tensors", "encoder.block")),
        ("no_vision", ("vision tower", "model.visual")),
        ("truncated", ("truncated",)),
        ("bad_config", ("config.json",)),
    ],
)
def test_a_vlm_folder_whose_weights_do_not_fit_is_refused(vlm_folders, name, words):
    from thinkdiff_core.vlm_loader import load_vlm

    with pytest.raises(ModelFolderError) as caught:
        load_vlm(vlm_folders[name], dtype=torch.float32)
    assert str(vlm_folders[name]) in str(caught.value) or vlm_folders[name].name in str(caught.value)
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_a_weight_index_naming_files_outside_its_folder_is_refused(vlm_folders, tmp_path):
    from thinkdiff_core.vlm_loader import check_model_folder

    folder = tmp_path / "escape"
    shutil.copytree(vlm_folders["no_vision"].parent / "good", folder)
    (tmp_path / "outside.safetensors").write_bytes(b"")
    index = {"weight_map": {"model.norm.weight": "../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match=r"outside its folder.*\.\./outside"):
        check_model_folder(folder)


@pytest.mark.parametrize(
    "error, kind, words, not_words",
    [
        (
            ImportError("requires the accelerate library: pip install accelerate"),
            "MissingDependencyError",
            ("accelerate", "Install it"),
            ("truncated",),
        ),
        (
            ValueError("`low_cpu_mem_usage` is not compatible with this option"),
            "ThinkDiffError",
            ("low_cpu_mem_usage", "settings"),
            ("truncated", "corrupt"),
        ),
        (
            RuntimeError("CUDA error: an illegal memory access was encountered"),
            "ThinkDiffError",
            ("illegal memory access",),
            ("truncated", "corrupt"),
        ),
        (
            RuntimeError("Error(s) in loading state_dict: size mismatch for lm_head.weight"),
            "ModelFolderError",
            ("size mismatch", "Download"),
            (),
        ),
        (OSError(28, "No space left on device"), "ModelFolderError", ("No space left", "free space"), ("corrupt",)),
    ],
)
def test_a_from_pretrained_failure_is_blamed_on_its_real_cause(tmp_path, error, kind, words, not_words):
    """Only weight-shaped failures are reported as a damaged download (a missing package or a CUDA fault is not)."""
    from thinkdiff_core.vlm_loader import _load_error

    named = _load_error(tmp_path / "Qwen2-VL-7B-Instruct", error)
    assert type(named).__name__ == kind
    assert "\n" not in str(named)
    for word in words:
        assert word in str(named), str(named)
    for word in not_words:
        assert word not in str(named), str(named)


def test_a_blip2_folder_without_the_vision_tower_is_refused(tmp_path):
    from thinkdiff_core.vision import load_vision_encoder

    folder = standin.build_blip2_vision(tmp_path / "blip2", full_blip2_layout=True)
    weights = next(folder.glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "encoder.layers.0." not in k}, weights)
    with pytest.raises(ModelFolderError, match="lacks .* vision tower"):
        load_vision_encoder(folder, dtype=torch.float32)


@pytest.mark.parametrize("dtype, words", [(torch.int8, "int8"), (torch.bool, "bool"), (None, "NaN")])
def test_aligner_weights_that_cannot_be_an_aligner_are_refused(aligner_file, dtype, words):
    state = load_file(aligner_file)
    if dtype is None:
        state["linear_out.weight"][0, 0] = float("nan")
    else:
        state["linear_in.weight"] = state["linear_in.weight"].to(dtype)
    save_file(state, aligner_file, metadata={"thinkdiff.variant": "lvlm"})
    with pytest.raises(CheckpointError, match=words):
        load_aligner(aligner_file)


def test_an_all_nan_image_is_refused_not_turned_black():
    with pytest.raises(PromptError, match="NaN"):
        pil_images_from_tensor(torch.full((1, 8, 8, 3), float("nan")))


def test_nan_features_stop_training_with_no_export(tiny_train_data, tiny_features, tmp_path, capsys):
    from thinkdiff_train.train_aligner import main

    features = shutil.copytree(tiny_features, tmp_path / "features")
    for shard in features.glob("shard-*.safetensors"):
        state = load_file(shard)
        state["features"][:] = float("nan")
        save_file(state, shard)
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_train_data, features_dir=features)
    rc = main(["--config", TINY, "--output-dir", str(run), "--max-steps", "2", *overrides])
    one_line_error(capsys, rc, "NaN")
    assert not (run / "aligner.safetensors").exists() and not (run / "checkpoints").exists()


def test_a_nan_loss_stops_training_with_no_export(tiny_train_data, tiny_features, tmp_path, capsys):
    """An overflowing learning rate: the loss and gradients go inf/NaN, the run stops at the next logged step."""
    from thinkdiff_train.train_aligner import main

    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_train_data, learning_rate=1e30, warmup_steps=0, log_every=3, checkpoint_every=3)
    rc = main(["--config", TINY, "--output-dir", str(run), "--max-steps", "6", *overrides])
    one_line_error(capsys, rc, "NaN/inf", "nothing was exported")
    assert not (run / "aligner.safetensors").exists()


def test_resume_with_settings_that_change_the_result_is_refused(tiny_train_data, tiny_features, tmp_path, capsys):
    from thinkdiff_train.train_aligner import main

    run = tmp_path / "run"
    args = ["--config", TINY, "--output-dir", str(run), *tiny_overrides(tiny_train_data, checkpoint_every=2)]
    assert main([*args, "--max-steps", "2"]) == 0
    changed = ["--set", "seed=7", "--set", "learning_rate=1e-3", "--set", "batch_size=3"]
    rc = main([*args, "--max-steps", "3", "--resume", *changed])
    one_line_error(capsys, rc, "seed 42 -> 7", "learning_rate", "global_batch 4 -> 3", "--allow-changed-settings")


def test_extraction_rerun_with_another_samples_per_shard_is_refused(tiny_train_data, tiny_features, tmp_path):
    from thinkdiff_train.config import load_config
    from thinkdiff_train.extract_features import extract

    features = shutil.copytree(tiny_features, tmp_path / "features")
    (features / "shard-000002.json").unlink()  # an interrupted extraction
    values = tiny_overrides(tiny_train_data, features_dir=features, samples_per_shard=5)[1::2]
    with pytest.raises(ChangedSettingsError, match="samples_per_shard 8 -> 5"):
        extract(load_config(TINY, values), allow_changed_settings=True)


# --- misleading messages --------------------------------------------------------------------------------------


def test_random_bytes_named_pth_are_not_called_a_code_running_pickle(tmp_path):
    (tmp_path / "r.pth").write_bytes(os.urandom(3000).replace(b"\x80", b"\x00", 1).lstrip(b"PK\x80") or b"x")
    with pytest.raises(CheckpointError) as caught:
        load_aligner(tmp_path / "r.pth")
    assert not isinstance(caught.value, UnsafeCheckpointError) and "not a PyTorch checkpoint" in str(caught.value)


# --- library errors become one line ---------------------------------------------------------------------------


def test_library_errors_in_every_command_line_are_one_line(tiny_train_data, tmp_path, capsys):
    from thinkdiff_train.extract_features import main as extract_main
    from thinkdiff_train.make_tiny_data import main as tiny_main
    from thinkdiff_train.train_aligner import main as train_main

    (tmp_path / "file").write_text("x")
    one_line_error(capsys, tiny_main(["--out", str(tmp_path / "file" / "sub")]))  # an OSError (not a directory)
    broken = shutil.copytree(tiny_train_data / "models" / "t5", tmp_path / "t5")
    next(broken.glob("*.safetensors")).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    rc = train_main(["--config", TINY, *tiny_overrides(tiny_train_data, t5_path=broken)])
    one_line_error(capsys, rc, "t5_path")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(os.urandom(3000))
    rc = extract_main(["--config", TINY, *tiny_overrides(tiny_train_data, train_data=tmp_path / "shards" / "a.tar")])
    one_line_error(capsys, rc, "tar")
    (tmp_path / "img.png").write_bytes(os.urandom(500))
    args = [
        "generate",
        "--vlm",
        "v",
        "--flux",
        "f",
        "--mode",
        "text",
        "--prompt",
        "x",
        "--image",
        str(tmp_path / "img.png"),
    ]
    one_line_error(capsys, core_main([*args, "--output", str(tmp_path / "o.png")]), "could not be read")


def test_a_real_full_disk_while_logging_is_named_and_resume_repairs_it(tiny_train_data, tiny_features, tmp_path):
    """metrics.jsonl on a tiny tmpfs filled while the run logs (needs root for mount; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        from thinkdiff_core.errors import library_error_message

        (mount / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # its first page, before the disk fills
        with pytest.raises(OSError) as caught:
            with (mount / "filler").open("wb") as handle:
                while True:
                    handle.write(b"\0" * 65536)
        assert "no space left" in library_error_message(caught.value)
        from thinkdiff_train.checkpointing import keep_metrics_up_to

        with pytest.raises(OSError):
            with (mount / "metrics.jsonl").open("a") as handle:
                handle.write('{"step": 1, "loss": 2.0}\n' * 400)
        (mount / "filler").unlink()
        keep_metrics_up_to(mount / "metrics.jsonl", 1)  # the torn tail goes, complete rows stay
        rows = [json.loads(line) for line in (mount / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(row == {"step": 1, "loss": 2.0} for row in rows)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# --- files keep the user's umask ------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_keep_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_aligner(standin.build_aligner(input_dim=8, output_dim=16), tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_every_error_class_here_is_a_thinkdiff_error():
    for error in (ChangedSettingsError, NonFiniteError, ModelFolderError, CheckpointError, PromptError):
        assert issubclass(error, ThinkDiffError)
