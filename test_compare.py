"""Tests of compare.py: the matrix it plans, resuming, the numbers of results.md, a real tiny matrix."""
import argparse
import json
import os
import subprocess
import sys

import pytest

import compare

HERE = os.path.dirname(os.path.abspath(__file__))


def args_for(tmp_path, **kw):
    base = dict(data=compare.DATASETS, models=compare.MODELS, targets=compare.TARGETS, seeds=[0, 1, 2],
                epochs=None, subset=None, jobs=1, label_images=2000, out=str(tmp_path / "runs"),
                results=str(tmp_path / "results.md"), report=True, train_args=[])
    return argparse.Namespace(**{**base, **kw})


def plant(run, finals, mae_tl=0.10):
    """A finished run's files, as train.py and compare.py leave them (its label errors already measured)."""
    os.makedirs(run["dir"], exist_ok=True)
    with open(os.path.join(run["dir"], "log.jsonl"), "w") as f:
        for epoch, top1 in enumerate(finals):
            f.write(json.dumps(dict(epoch=epoch, val_top1=top1)) + "\n")
    compare.write_json(os.path.join(run["dir"], "label_errors_2000.json"),
                       dict(area=0.2, tl=mae_tl, transmix=0.3 if run["target"] != "none" else None))
    compare.add_wall_time(run, 60.0)


def test_plan_is_the_whole_matrix(tmp_path):
    runs = compare.plan(args_for(tmp_path))
    assert len(runs) == 3 * 2 * (4 + 3)  # seeds x data sets x (ViT: 4 targets, Swin: no TransMix)
    assert not any(r["target"] == "transmix" and r["model"] == "swin_mini" for r in runs)
    assert len({r["dir"] for r in runs}) == len(runs)
    none = next(r for r in runs if r["target"] == "none")
    assert "--mix" in none["cmd"] and "--target" not in none["cmd"]
    fm = next(r for r in runs if r["data"] == "fashion_mnist" and r["target"] == "tl_align")
    epochs, subset = compare.BUDGET["fashion_mnist"]
    assert fm["cmd"][fm["cmd"].index("--epochs") + 1] == str(epochs)
    assert f"fashion_mnist-e{epochs}-n{subset}" in fm["dir"]  # a new budget never meets older runs
    assert fm["cmd"][-2:] == ["--output-dir", fm["dir"]]


def test_a_run_cut_short_resumes_and_a_finished_one_is_skipped(tmp_path):
    run = compare.plan(args_for(tmp_path, data=["synthetic"], models=["vit_mini"], targets=["area"], seeds=[0],
                                epochs=3))[0]
    assert "--resume" not in compare.command_now(run)
    plant(run, [10.0])  # one epoch of three logged, and its checkpoint
    open(os.path.join(run["dir"], "checkpoint.pt"), "wb").close()
    assert not compare.finished(run)
    assert compare.command_now(run)[-2:] == ["--resume", os.path.join(run["dir"], "checkpoint.pt")]
    plant(run, [10.0, 10.0, 30.0])
    with open(os.path.join(run["dir"], "log.jsonl"), "w") as f:  # epoch 0 twice is not three epochs
        f.write("".join(json.dumps(dict(epoch=e, val_top1=1.0)) + "\n" for e in (0, 0, 1)))
    assert not compare.finished(run)
    plant(run, [10.0, 20.0, 30.0])
    assert compare.finished(run) and compare.wall_time(run) == 180.0  # every attempt counted


def test_runs_of_another_command_are_not_reused(tmp_path):
    args = args_for(tmp_path, data=["synthetic"], models=["vit_mini"], targets=["area"], seeds=[0], epochs=1)
    compare.claim(compare.plan(args)[0])
    compare.claim(compare.plan(args)[0])  # the same command: fine
    other = compare.plan(args_for(tmp_path, **{**vars(args), "train_args": ["--lr", "0.1"]}))[0]
    with pytest.raises(SystemExit, match="another command"):
        compare.claim(other)


def test_report_numbers(tmp_path):
    args = args_for(tmp_path, data=["synthetic"], models=["vit_mini"], epochs=2)
    finals = {"none": [40.0, 45.0, 44.0], "area": [50.0, None, 54.0], "transmix": [51.0, 52.0, 55.0],
              "tl_align": [53.0, 54.0, 58.0]}
    runs = compare.plan(args)
    for run in reversed(runs):  # planted out of order: pairing must go by seed, not by position
        final = finals[run["target"]][run["seed"]]
        if final is not None:  # area's seed 1 never finished
            plant(run, [final + 1, final], mae_tl=0.1 + 0.01 * run["seed"])  # best is the first epoch
    compare.log_invocation(args, runs, 600.0)
    compare.report(runs, args)
    text = open(args.results).read()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["area"][:3] == ["2", "52.00 ± 2.83", "53.00 ± 2.83"]
    # paired over seeds 0 and 2: tl_align - area = 3, 4; beyond the spread max(2.65, 2.83, 0.71)
    assert rows["tl_align"][3] == "+3.50 ± 0.71 (higher)"
    assert rows["none"][3] == "-10.00 ± 0.00 (lower)"  # 40-50, 44-54
    assert rows["transmix"][4] == "+1.00 ± 0.00 (within the seed spread)"
    assert rows["tl_align"][6] == "0.1100 ± 0.0100" and rows["none"][7] == ""  # TL-Align MAE; no TransMix
    assert rows["tl_align"][8] == "-0.0900 ± 0.0100 (closer)"
    assert "Wall time of the matrix: 10 min" in text and "--target T --seed S --epochs 2" in text


def test_tiny_matrix_end_to_end_then_nothing_to_do(tmp_path):
    cmd = [sys.executable, "compare.py", "--data", "synthetic", "--models", "vit_mini", "--targets", "none",
           "tl_align", "--seeds", "0", "--epochs", "1", "--subset", "128", "--label-images", "64",
           "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results.md"), "--", "--batch-size", "64"]
    first = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    text = (tmp_path / "results.md").read_text()
    assert "| none | 1 |" in text and "| tl_align | 1 |" in text
    second = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "2 already finished, 0 to run" in second.stdout


def test_user_errors_end_in_one_line(tmp_path):
    common = [sys.executable, "compare.py", "--data", "fashion_mnist", "--models", "vit_mini", "--targets", "area",
              "--seeds", "0", "1", "--jobs", "1", "--out", str(tmp_path / "runs"), "--results",
              str(tmp_path / "results.md"), "--"]
    p = subprocess.run(common + ["--data-path", str(tmp_path / "nowhere")], cwd=HERE, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "1 run(s) failed" in p.stderr and "nowhere" in p.stderr  # train.py's own line
    started = [d for d, _, files in os.walk(tmp_path / "runs") if "train.out" in files]
    assert len(started) == 1 and started[0].endswith("seed0")  # after the failure, seed 1 never started
    p = subprocess.run(common + ["--seed", "3"], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--seed is set by compare.py itself" in p.stderr
