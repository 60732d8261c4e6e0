"""What a user can get wrong ends in one line and exit 2 (Ctrl-C: 130), and no run is lost: a reused output
folder, unreadable images in training and in validation, bad arguments, an interrupted run. train.main runs
in the test process as `python train.py` runs it (a process of its own costs ~8 s of imports); the Ctrl-C
test and test_train's first test run the command line itself."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from test_train import FAST, SMALL, run_main, write_folders

HERE = os.path.dirname(os.path.abspath(__file__))


def one_error_line(err, code, expected=2):
    assert code == expected, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def files_of(folder):
    return {name: (folder / name).read_bytes() for name in ("checkpoint.pt", "best.pt", "log.jsonl")}


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--epochs", "1", *FAST, "--output-dir", str(out)]
    assert run_main(capsys, *common)[0] == 0
    before = files_of(out)
    # another data set and model into the same folder: refused before anything is written
    code, _, err = run_main(capsys, *common, "--data", "fashion_mnist", "--mix", "none")
    line = one_error_line(err, code)
    assert f"--output-dir {out} holds a run" in line and "--resume" in line and "--overwrite" in line
    assert files_of(out) == before  # byte for byte
    code, _, err = run_main(capsys, "--epochs", "2", *FAST, "--output-dir", str(out), "--resume",
                            str(out / "checkpoint.pt"))  # continuing it is fine
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]
    code, _, err = run_main(capsys, *common, "--overwrite")  # told to: the old run goes
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0]


def test_without_output_dir_every_run_gets_a_folder_and_runs_latest_the_newest(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ is made where the command runs

    def run():
        code, _, err = run_main(capsys, "--epochs", "1", *FAST)
        assert code == 0, err
        return sorted(d for d in os.listdir(tmp_path / "runs") if d != "latest")

    first = run()
    second = run()  # the README's first command, twice: both runs kept
    assert len(first) == 1 and len(second) == 2 and first[0] in second
    assert all(d.endswith("-synthetic-vit_mini") or "-synthetic-vit_mini+" in d for d in second)
    newest = next(d for d in second if d != first[0])
    assert os.readlink(tmp_path / "runs" / "latest") == newest
    assert (tmp_path / "runs" / "latest" / "best.pt").is_file()


def test_an_output_dir_that_cannot_be_written_is_refused_before_training(tmp_path, capsys):
    # root ignores permission bits: /proc refuses new files to anyone, and a path under a regular file too
    for out, word in (("/proc", "cannot be written"), (str(tmp_path / "file" / "run"), "cannot be written")):
        (tmp_path / "file").write_text("a regular file")
        code, out_text, err = run_main(capsys, "--epochs", "1", *SMALL, "--output-dir", out)
        assert word in one_error_line(err, code) and "epoch" not in out_text


def broken_folders(root, where):
    """A tiny ImageFolder pair with a truncated JPEG and an empty file among `where`'s images."""
    write_folders(root, [3, 3])
    good = (root / where / "c0" / "0.JPEG").read_bytes()
    (root / where / "c0" / "0.JPEG").write_bytes(good[:len(good) // 2])  # truncated
    (root / where / "c1" / "0.JPEG").write_bytes(b"")  # zero bytes
    return good


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_unreadable_training_image_is_named_in_one_line(tmp_path, capsys, workers):
    broken_folders(tmp_path / "data", "train")
    code, _, err = run_main(capsys, "--data", "imagenet", "--data-path", str(tmp_path / "data"), "--model",
                            "vit_mini", "--img-size", "32", "--epochs", "1", "--batch-size", "2", "--repeats", "1",
                            "--workers", workers, "--output-dir", str(tmp_path / "run"))
    line = one_error_line(err, code)
    assert line.startswith("error: image ") and "0.JPEG cannot be read" in line and "--resume" in line
    assert str(tmp_path / "data" / "train") in line


def test_an_unreadable_validation_image_costs_no_training_and_resume_evaluates_first(tmp_path, capsys):
    good = broken_folders(tmp_path / "data", "val")
    argv = ["--data", "imagenet", "--data-path", str(tmp_path / "data"), "--model", "vit_mini",
            "--img-size", "32", "--epochs", "1", "--batch-size", "2", "--repeats", "1", "--workers", "0",
            "--output-dir", str(tmp_path / "run")]
    code, out, err = run_main(capsys, *argv)
    assert "cannot be read" in one_error_line(err, code)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 0 and saved["pending"]["train_loss"] > 0  # trained, kept, not yet evaluated
    assert not (tmp_path / "run" / "log.jsonl").exists()
    (tmp_path / "data" / "val" / "c0" / "0.JPEG").write_bytes(good)  # the user replaces the files
    (tmp_path / "data" / "val" / "c1" / "0.JPEG").write_bytes(good)
    code, out, err = run_main(capsys, *argv, "--resume", str(tmp_path / "run" / "checkpoint.pt"))
    assert code == 0, err
    assert "steps of" in out and "[" not in out.split("steps of")[1].split("\n", 1)[1]  # no training step ran
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0] and records[0]["train_loss"] == saved["pending"]["train_loss"]
    assert "pending" not in torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True) or \
        torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["pending"] is None


BAD_ARGUMENTS = {  # arguments -> what the one line names
    "log_every_0": (["--log-every", "0"], "--log-every 0"),
    "drop_path_1": (["--drop-path", "1"], "--drop-path 1.0: must be in [0, 1)"),
    "drop_path_above_1": (["--drop-path", "1.5"], "--drop-path 1.5"),
    "smoothing_1": (["--smoothing", "1"], "--smoothing 1.0"),
    "smoothing_negative": (["--smoothing", "-0.1"], "--smoothing -0.1"),
    "weight_decay_negative": (["--weight-decay", "-1"], "--weight-decay -1.0"),
    "warmup_negative": (["--warmup-epochs", "-1"], "--warmup-epochs -1.0"),
    "clip_negative": (["--clip-grad", "-1"], "--clip-grad -1.0"),
    "seed_negative": (["--seed", "-1"], "--seed -1"),
    "mps_missing": (["--device", "mps"], "--device mps"),
    "unknown_device": (["--device", "xla"], "--device xla"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_end_in_one_line(tmp_path, capsys, case):
    if case == "mps_missing" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")  # never on the CPU machines the tests run on
    argv, named = BAD_ARGUMENTS[case]
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--epochs", "1", *SMALL, "--output-dir", str(tmp_path / "run"), *argv])
    assert named in one_error_line(capsys.readouterr().err, exit_info.value.code)
    assert not (tmp_path / "run").exists()  # refused before anything is made


def test_under_torchrun_the_one_line_names_the_rank(tmp_path, capsys, monkeypatch):
    """Every process of a torchrun launch prints its error: the line says which (refused before any process
    group is made, so one process stands for rank 1 of 2)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--epochs", "1", *SMALL, "--output-dir", str(tmp_path / "run"), "--smoothing", "1"])
    assert one_error_line(capsys.readouterr().err, exit_info.value.code).startswith("error (rank 1): --smoothing 1.0")


def test_one_class_is_refused_and_fp16_on_a_cpu_is_warned(tmp_path, capsys, monkeypatch):
    write_folders(tmp_path / "one", [2])
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", "imagenet", "--data-path", str(tmp_path / "one"), "--output-dir", str(tmp_path / "r")])
    assert "at least 2" in one_error_line(capsys.readouterr().err, exit_info.value.code)

    class FirstStep(Exception):  # the warning comes before training, which is what is slow: stop there
        pass

    monkeypatch.setattr(train, "train_step", lambda *a, **k: (_ for _ in ()).throw(FirstStep))
    with pytest.raises(FirstStep):
        train.main(["--epochs", "1", *SMALL, "--amp", "fp16", "--output-dir", str(tmp_path / "fp16")])
    assert "warning: --amp fp16 on a CPU runs ~8x slower" in capsys.readouterr().out


def test_ctrl_c_ends_in_one_line_that_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    argv = ["--epochs", "50", *FAST, "--output-dir", str(out)]
    # SIGINT's default action restored: a test run in the background of a non-interactive shell inherits it
    # ignored, and Python then installs no KeyboardInterrupt handler
    p = subprocess.Popen([sys.executable, "train.py", *argv], cwd=HERE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (out / "log.jsonl").exists() and time.time() < deadline:  # the first epoch is saved
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    line = one_error_line(err, p.returncode, expected=130)
    assert line == (f"interrupted: the last checkpoint is {out}/checkpoint.pt; continue exactly with: python "
                    f"train.py {' '.join(argv)} --resume {out}/checkpoint.pt")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] >= 0  # whole
