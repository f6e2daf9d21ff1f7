"""The command line: --help everywhere, one-line errors without tracebacks."""
import subprocess
import sys

import pytest

from cellnet.cli import build_parser, main

COMMANDS = [["synth"], ["import"], ["prepare"], ["train", "segmentation"], ["train", "cellularity"],
            ["train", "gbt"], ["evaluate"], ["export"], ["predict"], ["slide"], ["bench"], ["demo"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0
    assert "usage: cellnet" in capsys.readouterr().out


def test_import_help_explains_the_formats(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["import", "--help"])
    assert "stromal" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("argv, needle", [
    (["prepare", "--data", "{tmp}/missing", "--out", "{tmp}/out"], "missing: no such dataset folder"),
    (["train", "segmentation", "--data", "{tmp}/missing", "--run", "{tmp}/run"], "missing: no such dataset folder"),
    (["evaluate", "--data", "{tmp}", "--runs", "{tmp}", "--out", "{tmp}/o"], "not a cellnet run folder"),
    (["export", "--run", "{tmp}", "--out", "{tmp}/sm"], "not a cellnet run folder"),
    (["export", "--run", "{tmp}", "--run", "{tmp}", "--weights", "1", "--out", "{tmp}/sm"],
     "--weights '1': 1 weight(s) for 2 --run(s)"),
    (["evaluate", "--data", "{tmp}", "--runs", "{tmp}", "--out", "{tmp}/o", "--tta", "d4", "--ensemble"],
     "not a cellnet run folder"),
    (["predict", "--model", "{tmp}", "--input", "{tmp}", "--out", "{tmp}/p.csv"], "empty folder"),
])
def test_user_errors_are_one_line(argv, needle, tmp_path, capsys):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_console_script_exit_code_and_no_tensorflow_chatter(tmp_path):
    """Only the error line: no absl/TF INFO lines, no cuInit line on a CPU-only machine."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", "cellnet.cli", "prepare", "--data", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cellnet prepare: error: {tmp_path / 'nope'}: no such dataset folder"], result.stderr


def test_a_file_in_the_way_of_an_output_folder_is_named(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    assert main(["synth", "--small", "--out", str(blocker / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cellnet synth: error: {blocker}: is a file, not a folder (in the way of {blocker / 'x'})"
    assert blocker.read_text() == "mine"


def test_an_error_inside_a_progress_bar_starts_on_a_new_line(capsys):
    from tqdm import tqdm

    from cellnet.errors import emit

    bar = tqdm(range(10), file=__import__("sys").stderr)
    next(iter(bar))
    emit("cellnet prepare: error: x.tif: unreadable")
    err = capsys.readouterr().err
    bar.close()
    assert "\ncellnet prepare: error: x.tif: unreadable\n" in err


def test_help_never_imports_tensorflow():
    """``--help`` of every command answers from the parser alone (no TensorFlow, no NumPy)."""
    script = (
        "import sys\n"
        "from cellnet.cli import build_parser\n"
        f"for command in {COMMANDS!r}:\n"
        "    try:\n"
        "        build_parser().parse_args([*command, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'numpy', 'pandas', 'cv2') if m in sys.modules)\n"
        "print('heavy:', heavy, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stderr


def test_preset_choices_come_from_the_presets_table(capsys):
    from cellnet.training.presets import PRESETS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "segmentation", "--help"])
    out = capsys.readouterr().out
    for name in PRESETS["segmentation"]:
        assert name in out


def test_a_flag_of_another_task_is_refused(tmp_path, capsys):
    code = main(["train", "cellularity", "--data", str(tmp_path), "--run", str(tmp_path / "r"),
                 "--seg", str(tmp_path / "seg"), "--arch", "xception"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "cellnet train cellularity: error: --arch: does not apply to the cascade task"


@pytest.mark.parametrize("argv, field, value", [
    (["train", "segmentation", "--unit", "torchvision"], "unit", "torchvision"),
    (["train", "cellularity", "--unit", "authors"], "unit", "authors"),
    (["train", "cellularity", "--seg", "S", "--unit", "authors"], "unit", "authors"),
    (["train", "segmentation", "--disc", "12.5"], "disc", 12.5),
    (["train", "cellularity", "--regression-activation", "linear"], "regression_activation", "linear"),
    (["train", "cellularity", "--seg", "S", "--regression-activation", "linear"], "regression_activation", "linear"),
])
def test_train_flags_reach_the_run_config(argv, field, value, tmp_path):
    from cellnet.training.config import make_config

    args = build_parser().parse_args([*argv, "--data", str(tmp_path), "--run", str(tmp_path / "r")])
    task = "cascade" if args.task == "cellularity" and args.seg else args.task
    given = {k: v for k, v in vars(args).items() if k not in ("command", "task", "quiet")}
    cfg = make_config(task, **given).resolve()
    assert getattr(cfg, field) == value


def test_unit_defaults_to_preact_and_prepare_disc_to_15(tmp_path):
    from cellnet.training.config import make_config

    cfg = make_config("segmentation", data=str(tmp_path), run=str(tmp_path / "r")).resolve()
    assert cfg.unit == "preact" and cfg.disc is None
    assert build_parser().parse_args(["prepare", "--data", "d", "--out", "o"]).disc == 15.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "segmentation", "--data", "d", "--run", "r", "--unit", "resnet"])


def test_group_by_reaches_prepare_and_training(tmp_path):
    from cellnet.training.config import make_config

    assert build_parser().parse_args(["prepare", "--data", "d", "--out", "o", "--group-by", "site"]).group_by == "site"
    args = build_parser().parse_args(["train", "gbt", "--data", "d", "--run", "r", "--seg", "s", "--group-by", "patient"])
    given = {k: v for k, v in vars(args).items() if k not in ("command", "task", "quiet")}
    assert make_config("gbt", **given).group_by == "patient"


@pytest.mark.parametrize("flags, expected", [
    ([], None),
    (["--stain-aug"], {"hed_scale": 0.05, "hed_shift": 0.05, "brightness": 0.1, "contrast": 0.1,
                       "blur_sigma": 1.0, "blur_prob": 0.3, "noise": 0.02}),
    (["--stain-aug", "--hed", "0.2", "--blur", "0"], {"hed_scale": 0.2, "hed_shift": 0.2, "brightness": 0.1,
                                                     "contrast": 0.1, "blur_sigma": 0.0, "blur_prob": 0.3,
                                                     "noise": 0.02}),
    (["--noise", "0.05"], {"hed_scale": 0.0, "hed_shift": 0.0, "brightness": 0.0, "contrast": 0.0,
                           "blur_sigma": 0.0, "blur_prob": 0.0, "noise": 0.05}),
])
def test_stain_flags_build_the_stain_augmentation(flags, expected, tmp_path):
    from cellnet.training.config import make_config
    from cellnet.training.tasks import _stain

    args = build_parser().parse_args(["train", "segmentation", "--data", "d", "--run", "r", *flags])
    given = {k: v for k, v in vars(args).items() if k not in ("command", "task", "quiet")}
    stain = _stain(make_config("segmentation", **given).resolve())
    assert (stain.as_kwargs() if stain else None) == expected


def test_impossible_stain_settings_are_one_line_before_any_run(tmp_path, capsys):
    code = main(["train", "segmentation", "--data", str(tmp_path), "--run", str(tmp_path / "r"), "--hed", "1.5"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "cellnet train segmentation: error: --hed: expected < 1, got 1.5"
    assert not (tmp_path / "r").exists()


def test_presets_choose_the_regression_output_and_classification_refuses_it(tmp_path):
    from cellnet.errors import CellnetError
    from cellnet.training.config import make_config

    common = dict(data=str(tmp_path), run=str(tmp_path / "r"))
    assert make_config("cellularity", preset="paper", **common).resolve().regression_activation == "linear"
    assert make_config("cascade", preset="paper", seg="s", **common).resolve().regression_activation == "linear"
    assert make_config("cellularity", preset="cpu", **common).resolve().regression_activation == "sigmoid"
    with pytest.raises(CellnetError, match="^--regression-activation: does not apply to --head classification"):
        make_config("cellularity", head="classification", regression_activation="linear", **common)
