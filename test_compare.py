"""Tests of compare.py: the matrix it plans, resuming, the numbers of results.md, a real tiny matrix."""
import argparse
import json
import os
import subprocess
import sys

import compare

HERE = os.path.dirname(os.path.abspath(__file__))


def args_for(tmp_path, **kw):
    base = dict(data=compare.DATASETS, models=compare.MODELS, targets=compare.TARGETS, seeds=[0, 1, 2],
                epochs=None, subset=None, jobs=1, out=str(tmp_path / "runs"), results=str(tmp_path / "results.md"),
                report=True, train_args=[])
    return argparse.Namespace(**{**base, **kw})


def plant(run, finals, mae_tl=0.10):
    """A finished run's files, as train.py and compare.py leave them."""
    os.makedirs(run["dir"], exist_ok=True)
    with open(os.path.join(run["dir"], "log.jsonl"), "w") as f:
        for epoch, top1 in enumerate(finals):
            f.write(json.dumps(dict(epoch=epoch, val_top1=top1, label_mae_area=0.2, label_mae_tl=mae_tl,
                                    label_mae_transmix=None)) + "\n")
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
    plant(run, [10.0, 20.0, 30.0])
    assert compare.finished(run) and compare.wall_time(run) == 120.0  # both attempts counted


def test_report_numbers(tmp_path):
    args = args_for(tmp_path, data=["synthetic"], models=["vit_mini"], targets=["area", "transmix", "tl_align"],
                    epochs=2)
    runs = compare.plan(args)
    finals = {"area": [50.0, 52.0, 54.0], "transmix": [51.0, 52.0, 55.0], "tl_align": [53.0, 54.0, 58.0]}
    for run in runs:
        final = finals[run["target"]][run["seed"]]
        plant(run, [final + 1, final], mae_tl=0.1 + 0.01 * run["seed"])  # best is the first epoch
    compare.report(runs, args, 600.0)
    text = open(args.results).read()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["area"][:3] == ["3", "52.00 ± 2.00", "53.00 ± 2.00"]
    # paired by seed: tl_align - area = 3, 2, 4; larger than the seed spread (std 2.52 of tl_align)
    assert rows["tl_align"][3] == "+3.00 ± 1.00 (better)"
    assert rows["transmix"][3] == "+0.67 ± 0.58 (within the seed spread)"
    assert rows["tl_align"][5] == "0.1100 ± 0.0100" and rows["tl_align"][6] == ""  # TL-Align MAE; no TransMix
    assert "Wall time of the matrix: 10 min" in text and "--target T --seed S --epochs 2" in text


def test_tiny_matrix_end_to_end_then_nothing_to_do(tmp_path):
    cmd = [sys.executable, "compare.py", "--data", "synthetic", "--models", "vit_mini", "--targets", "none",
           "tl_align", "--seeds", "0", "--epochs", "1", "--subset", "128", "--out", str(tmp_path / "runs"),
           "--results", str(tmp_path / "results.md"), "--", "--batch-size", "64"]
    first = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    text = (tmp_path / "results.md").read_text()
    assert "| none | 1 |" in text and "| tl_align | 1 |" in text
    second = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "2 already finished, 0 to run" in second.stdout


def test_a_failing_run_stops_the_matrix_with_one_line(tmp_path):
    cmd = [sys.executable, "compare.py", "--data", "fashion_mnist", "--models", "vit_mini", "--targets", "area",
           "--seeds", "0", "1", "--jobs", "1", "--out", str(tmp_path / "runs"), "--results",
           str(tmp_path / "results.md"), "--", "--data-path", str(tmp_path / "nowhere")]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "1 run(s) failed" in p.stderr and "nowhere" in p.stderr  # train.py's own line, and seed 1 not started
