"""Tests of train.py: the default run, checkpoints and resume, error paths, the two-process run (CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = ["--subset", "256", "--batch-size", "64", "--log-every", "1000"]


def run_cli(*args, cwd=HERE):
    """Run a command in a fresh process; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_default_run_one_short_epoch(tmp_path):
    code, out, err = run_cli("train.py", "--epochs", "1", *SMALL, "--output-dir", str(tmp_path))
    assert code == 0, err
    assert "val top-1" in out and "done: best val top-1" in out
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    for key in ("epoch", "train_loss", "val_top1", "val_top5", "lr", "epoch_time_s", "img_per_s",
                "label_mae_area", "label_mae_tl", "label_mae_transmix"):
        assert key in record
    assert 0 <= record["val_top1"] <= record["val_top5"] <= 100
    assert 0 <= record["label_mae_tl"] < 0.5 and 0 <= record["label_mae_area"] < 0.5
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # loads without running code
    assert ckpt["epoch"] == 0 and ckpt["args"]["model"] == "vit_mini"
    assert torch.load(tmp_path / "best.pt", weights_only=True)["val_top1"] == record["val_top1"]
    code, out, err = run_cli("train.py", "--eval", "--resume", str(tmp_path / "best.pt"))
    assert code == 0 and f"top-1 {record['val_top1']:.2f}%" in out, err


class Killed(Exception):
    """Stands for the process being killed."""


def test_resume_continues_exactly(tmp_path, monkeypatch):
    common = ["--epochs", "2", *SMALL, "--drop-path", "0.1", "--mix", "both"]
    train.main(common + ["--output-dir", str(tmp_path / "straight")])

    save = train.save_atomic

    def save_then_die(obj, path):  # killed right after the first epoch's checkpoint is written
        save(obj, path)
        if path.endswith("checkpoint.pt"):
            raise Killed

    monkeypatch.setattr(train, "save_atomic", save_then_die)
    with pytest.raises(Killed):
        train.main(common + ["--output-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(train, "save_atomic", save)
    assert weights(tmp_path / "resumed" / "checkpoint.pt").keys()
    with open(tmp_path / "resumed" / "log.jsonl", "a") as f:  # as if killed after logging epoch 1
        f.write(json.dumps({"epoch": 1, "train_loss": -1.0}) + "\n")
    train.main(common + ["--output-dir", str(tmp_path / "resumed"),
                         "--resume", str(tmp_path / "resumed" / "checkpoint.pt")])
    a, b = weights(tmp_path / "straight" / "checkpoint.pt"), weights(tmp_path / "resumed" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [(tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("straight", "resumed")]
    assert [json.loads(l)["train_loss"] for l in logs[0]] == [json.loads(l)["train_loss"] for l in logs[1]]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    train.save_atomic({"model": {"w": torch.ones(3)}}, path)

    def torn_save(obj, f):  # half a file, then the process dies
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half written")
        raise Killed

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(Killed):
        train.save_atomic({"model": {"w": torch.zeros(3)}}, path)
    assert torch.equal(train.load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path)
    train.main(["--epochs", "1", *SMALL, "--output-dir", out])
    before = (tmp_path / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(train.tl, "soft_cross_entropy", lambda logits, target: logits.sum() * float("nan"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--epochs", "2", *SMALL, "--output-dir", out, "--resume", out + "/checkpoint.pt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: non-finite loss") and "\n" not in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("case", ["missing_data", "missing_ckpt", "corrupt_ckpt", "wrong_ckpt", "bad_size",
                                  "imagenet_no_path"])
def test_user_errors_exit_2_with_one_line(tmp_path, case):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "args": {"model": "deit_t"}}, wrong)
    args = {
        "missing_data": ["--data", "cifar10", "--data-path", str(tmp_path / "nowhere")],
        "missing_ckpt": ["--resume", str(tmp_path / "nothing.pt")],
        "corrupt_ckpt": ["--resume", str(corrupt)],
        "wrong_ckpt": ["--resume", str(wrong)],
        "bad_size": ["--model", "swin_t"],  # 32 px synthetic images: 8x8 tokens, window 7
        "imagenet_no_path": ["--data", "imagenet"],
    }[case]
    code, out, err = run_cli("train.py", *args, *SMALL, "--epochs", "1", "--output-dir", str(tmp_path / "run"))
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    named = {"missing_data": "nowhere", "missing_ckpt": "nothing.pt", "corrupt_ckpt": "corrupt.pt",
             "wrong_ckpt": "wrong.pt", "bad_size": "window", "imagenet_no_path": "--data-path"}[case]
    assert named in err


def test_two_process_gloo_run(tmp_path):
    code, out, err = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                             "--epochs", "1", "--subset", "256", "--batch-size", "32", "--output-dir", str(tmp_path))
    assert code == 0, err[-3000:]
    assert "128 x 2" not in out and "4 steps of 32 x 2" in out  # each rank trains on its half
    assert out.count("done: best val top-1") == 1  # logging on rank 0 only
    record = json.loads((tmp_path / "log.jsonl").read_text())
    # validation gathered across ranks: accuracies are multiples of 1/2000 of the whole val set
    assert abs(record["val_top1"] * 20 - round(record["val_top1"] * 20)) < 1e-6
