"""Tests of compare.py: the matrix it plans, resuming, the numbers of results.md, a real tiny matrix."""
import argparse
import json
import math
import os
import random
import subprocess

import pytest

import compare
from test_train import run_main


def args_for(tmp_path, **kw):
    base = dict(data="fashion_mnist", models=["vit_mini", "swin_mini"], arms=list(compare.ARMS), seeds=[0, 1, 2],
                epochs=100, subset=1000, holdout=0, jobs=1, label_images=2000, out=str(tmp_path / "runs"),
                results=str(tmp_path / "results.md"), report=True, train_args=compare.REGIME["flags"], argv=[])
    return argparse.Namespace(**{**base, **kw})


def plant(run, finals, mae_tl=0.10, train_loss=0.5, train_mae=None, ghost=None):
    """A finished run's files, as train.py and compare.py leave them (its label errors already measured)."""
    compare.claim(run)
    with open(os.path.join(run["dir"], "log.jsonl"), "w") as f:
        for epoch, top1 in enumerate(finals):
            f.write(json.dumps(dict(epoch=epoch, val_top1=top1, train_loss=train_loss, train_target_mae=train_mae,
                                    train_ghost_rate=ghost)) + "\n")
    compare.write_json(os.path.join(run["dir"], "label_errors_2000.json"),
                       dict(area=0.2, tl=mae_tl, transmix=0.3 if run["model"] == "vit_mini" else None))
    compare.add_wall_time(run, 60.0)


def test_plan_is_the_whole_matrix_pilot_first(tmp_path):
    runs = compare.plan(args_for(tmp_path))
    assert len(runs) == 3 * (7 + 6)  # seeds x (ViT: 7 arms, Swin: no TransMix)
    assert not any(r["arm"] == "transmix" and r["model"] == "swin_mini" for r in runs)
    assert len({r["dir"] for r in runs}) == len(runs)
    vit_runs = [(r["arm"], r["seed"]) for r in runs if r["model"] == "vit_mini"]
    assert vit_runs[:6] == [("none", 0), ("none", 1), ("none", 2), ("area", 0), ("area", 1), ("area", 2)]
    assert vit_runs[6:10] == [("area_pixel", 0), ("deit", 0), ("transmix", 0), ("tl_align", 0)]
    # more seeds: the pilot over the first three, then whole seeds, every arm of a seed together
    five = [(r["arm"], r["seed"]) for r in compare.plan(args_for(tmp_path, models=["vit_mini"], seeds=[7, 8, 9, 10, 11],
                                                                 arms=["none", "area", "tl_align"]))]
    assert five == [("none", 7), ("none", 8), ("none", 9), ("area", 7), ("area", 8), ("area", 9), ("tl_align", 7),
                    ("tl_align", 8), ("tl_align", 9), ("none", 10), ("area", 10), ("tl_align", 10), ("none", 11),
                    ("area", 11), ("tl_align", 11)]
    # a study's more seeds of a few arms come last, whole seeds again, the same commands as the rest
    more = compare.plan(args_for(tmp_path, models=["vit_mini"], seeds=[7, 8, 9], arms=["none", "area", "tl_align"],
                                 more_seeds=(["area", "tl_align"], [8, 12, 13])))
    assert [(r["arm"], r["seed"]) for r in more][9:] == [("area", 12), ("tl_align", 12), ("area", 13),
                                                          ("tl_align", 13)]
    matrix = compare.plan(compare.study_args(args_for(tmp_path), "matrix"))
    assert len(matrix) == 10 * 5 + 18 * 2 and len({r["dir"] for r in matrix}) == len(matrix)
    none = next(r for r in runs if r["arm"] == "none")
    assert "--mix" in none["cmd"] and "--target" not in none["cmd"]
    deit = next(r for r in runs if r["arm"] == "deit")["cmd"]
    assert deit[deit.index("--mix") + 1] == "both" and deit[deit.index("--cutmix-mode") + 1] == "pixel"
    tl_run = next(r for r in runs if r["arm"] == "tl_align")
    assert tl_run["cmd"][tl_run["cmd"].index("--epochs") + 1] == "100" and "--no-augment" in tl_run["cmd"]
    assert "fashion_mnist-e100-n1000" in tl_run["dir"]  # a new budget never meets older runs
    assert tl_run["cmd"][-2:] == ["--output-dir", tl_run["dir"]]


def test_the_regime_is_what_train_py_runs():
    """The regime's flags reach train.py as intended: CutMix the only augmentation, the calibrated warm-up;
    the calibration study validates on held-out training images."""
    import train
    run = dict(data="fashion_mnist", model="vit_mini", arm="tl_align", seed=3, epochs=100, subset=1000, holdout=0,
               dir="d")
    args = train.get_args(compare.train_command(run, compare.REGIME["flags"])[1:])
    assert (args.augment, args.drop_path, args.warmup_epochs, args.eval_every) == (False, 0.0, 5.0, 25)
    assert (args.mix, args.target, args.cutmix_mode, args.subset, args.epochs) == ("cutmix", "tl_align", "grid",
                                                                                  1000, 100)
    assert (args.smoothing, args.weight_decay, args.batch_size, args.holdout) == (0.1, 0.05, 128, None)
    study = compare.study_args(argparse.Namespace(out="results"), "calibration")
    for run in compare.plan(study):
        args = train.get_args(run["cmd"][1:])
        assert (args.data, args.holdout, args.subset, args.epochs, args.eval_every, args.augment) == \
            ("fashion_mnist_small", 10000, 1000, 100, 25, False)
        assert (args.mix, args.target) == {"none": ("none", "tl_align"), "area": ("cutmix", "area"),
                                           "oracle": ("cutmix", "oracle")}[run["arm"]] and args.seed in range(5)
    # the matrix: the calibrated regime on the test set, with seeds the calibration never used
    matrix = compare.study_args(argparse.Namespace(out="results"), "matrix")
    calibration = compare.study_args(argparse.Namespace(out="results"), "calibration")
    assert (matrix.data, matrix.subset, matrix.epochs, matrix.train_args) == \
        (calibration.data, calibration.subset, calibration.epochs, calibration.train_args)
    assert not set(matrix.seeds) & set(calibration.seeds) and len(matrix.seeds) >= 10
    for run in compare.plan(matrix):
        args = train.get_args(run["cmd"][1:])
        assert (args.data, args.holdout, args.subset, args.epochs) == ("fashion_mnist_small", None, 1000, 100)


def test_a_run_cut_short_resumes_and_a_finished_one_is_skipped(tmp_path):
    run = compare.plan(args_for(tmp_path, models=["vit_mini"], arms=["area"], seeds=[0], epochs=3))[0]
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
    args = args_for(tmp_path, models=["vit_mini"], arms=["area"], seeds=[0], epochs=1)
    compare.claim(compare.plan(args)[0])
    compare.claim(compare.plan(args)[0])  # the same command: fine
    other = compare.plan(args_for(tmp_path, **{**vars(args), "train_args": ["--lr", "0.1"]}))[0]
    with pytest.raises(SystemExit, match="another command"):
        compare.claim(other)
    mine = compare.plan(args)[0]
    plant(mine, [50.0])
    assert compare.finished(mine) and not compare.finished(other)  # all its epochs, but not other's command
    spelt = compare.plan(args_for(tmp_path, **{**vars(args), "out": f"{tmp_path}/./runs/"}))[0]
    assert spelt["dir"] != mine["dir"] and compare.finished(spelt)  # the same folder, spelt otherwise
    compare.write_json(os.path.join(mine["dir"], "cmd.json"), other["cmd"])
    assert not compare.finished(mine)  # finished by another command: neither reported nor skipped
    with pytest.raises(SystemExit, match="another command"):
        compare.execute([mine], args)
    os.remove(os.path.join(mine["dir"], "cmd.json"))  # a whole log, its command unknown: never run over
    with pytest.raises(SystemExit, match="command is not known"):
        compare.execute([mine], args)
    assert compare.records(mine) and not os.path.exists(os.path.join(mine["dir"], "cmd.json"))


def test_the_smoothing_floor_is_the_entropy_of_the_smoothed_target(tmp_path):
    run = compare.plan(args_for(tmp_path, models=["vit_mini"], arms=["none"], seeds=[0]))[0]
    eps, k, floor = compare.smoothing_floor(run)
    assert (eps, k) == (0.1, 10) and abs(floor - (0.91 * math.log(1 / 0.91) + 0.09 * math.log(100))) < 1e-12
    run["cmd"] += ["--smoothing", "0"]
    assert compare.smoothing_floor(run) == (0.0, 10, 0.0)  # a one-hot target: a floor of 0, not -0


def test_the_commit_named_is_marked_changed_by_code_only_never_by_the_studys_records(tmp_path, monkeypatch):
    def git(*argv):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "results").mkdir()
    for name in ("train.py", "results/invocations.json"):
        (tmp_path / name).write_text("[]")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "code and records")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    monkeypatch.setattr(compare, "HERE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "invocations.json").write_text("[{}]")  # what the study itself writes
    assert compare.git_commit("results") == head
    assert compare.git_commit(str(tmp_path.parent)) == head + "+changes"  # records kept elsewhere: all counts
    (tmp_path / "train.py").write_text("[1]")
    assert compare.git_commit("results") == head + "+changes"
    monkeypatch.setattr(compare, "HERE", str(tmp_path / "results"))  # not a checkout: git fails
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-such-git"))
    assert compare.git_commit("results") == "unknown"


def test_student_t_quantiles_by_closed_forms():
    """df = 1 is Cauchy, t = tan(pi (p - 1/2)); df = 2 has t = (2p - 1) / sqrt(2 p (1 - p)); large df is normal."""
    assert abs(compare.t_quantile(0.975, 1) - math.tan(0.475 * math.pi)) < 1e-6
    assert abs(compare.t_quantile(0.975, 2) - 0.95 / math.sqrt(2 * 0.975 * 0.025)) < 1e-6
    assert abs(compare.t_quantile(0.975, 10000) - 1.959964) < 1e-3


def test_report_numbers(tmp_path):
    args = args_for(tmp_path, models=["vit_mini"], epochs=2)
    finals = {"none": [40.0, 45.0, 44.0], "area": [50.0, None, 54.0], "area_pixel": [50.0, 51.0, 55.0],
              "deit": [49.0, 50.0, 53.0], "transmix": [51.0, 52.0, 55.0], "tl_align": [53.0, 54.0, 58.0],
              "oracle": [55.0, 56.0, 59.0]}
    runs = compare.plan(args)
    for run in reversed(runs):  # planted out of order: pairing must go by seed, not by position
        final = finals[run["arm"]][run["seed"]]
        if final is not None:  # area's seed 1 never finished
            train_mae = {"none": None, "oracle": 0.0}.get(run["arm"], 0.15 + 0.01 * run["seed"])
            plant(run, [final + 1, final], mae_tl=0.1 + 0.01 * run["seed"], train_mae=train_mae,  # the first
                  ghost=None if train_mae is None else train_mae)                             # epoch is higher
    compare.log_invocation(args, runs, 600.0)
    compare.report([(runs, args)], args.results)
    text = open(args.results).read()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["area"][:2] == ["2: 0, 2", "52.00 ± 2.83"]  # the final epoch, never the best one
    # paired over seeds 0 and 2: tl_align - area = 3, 4; mean 3.5, 95% half-width 12.706 * 0.707 / sqrt 2
    assert rows["tl_align"][2] == "+3.50 ± 6.35 (no difference), 2 pairs"
    assert rows["none"][2] == "-10.00 ± 0.00 (lower), 2 pairs"  # 40-50, 44-54
    assert rows["deit"][2] == "-1.00 ± 0.00 (lower), 2 pairs" and rows["area"][2] == ""
    assert rows["tl_align"][3:5] == ["0.160 ± 0.010", "0.160 ± 0.010"]  # training target MAE and ghost rate
    assert rows["none"][3:5] == ["", ""] and rows["oracle"][3] == "0.000 ± 0.000"
    assert rows["tl_align"][6] == "0.1100 ± 0.0100"  # TL-Align MAE of the final models
    assert rows["tl_align"][8] == "-0.0900 ± 0.0248 (closer)"  # -0.1, -0.09, -0.08: 4.303 * 0.01 / sqrt 3
    # share of the oracle's gain over seeds 0 and 2 (area's seed 1 never finished): tl_align (3 + 4) / (5 + 5);
    # the oracle gains 5 on both seeds, so the interval is tl_align's own, 3.5 ± 6.35, divided by 5
    assert "tl_align +0.70, 95% interval [-0.57, +1.97] (2 seeds)" in text
    assert "transmix +0.20, 95% interval [+0.20, +0.20] (2 seeds)" in text
    assert "deit -0.20, 95% interval [-0.20, -0.20]" in text
    figure = tmp_path / "figures" / "targets_fashion_mnist-e2-n1000_vit_mini.png"
    assert figure.stat().st_size > 10000 and f"](figures/{figure.name})" in text
    assert "**Pilot, CutMix (area target) − no mixing:** +10.00 ± 0.00 (higher) points" in text
    assert "(label smoothing 0.1 over 10 classes puts its floor at 0.500)" in text  # 0.91 and nine 0.01s
    assert "Wall time of the matrix: 10 min" in text and "--target area --seed S --epochs 2" in text


def test_share_of_the_oracles_gain_and_its_fieller_interval():
    stats = lambda finals: [dict(seed=seed, final=f) for seed, f in enumerate(finals)]
    area = stats([50.0] * 10)
    oracle = stats([51.0 + seed % 3 for seed in range(10)])  # gains 1, 2, 3
    half = stats([50.0 + (1 + seed % 3) / 2 for seed in range(10)])  # exactly half of each: no doubt at all
    share = compare.share_of_gain(half, area, oracle)
    assert share["seeds"] == 10 and all(abs(share[k] - 0.5) < 1e-9 for k in ("point", "low", "high"))
    # the oracle gains 2 on every seed: the interval is the arm's own t-interval divided by 2
    steady = stats([52.0] * 3)
    arm = stats([51.0, 52.0, 53.0])  # gains 1, 2, 3: 2 ± 4.303 / sqrt 3
    share = compare.share_of_gain(arm, stats([50.0] * 3), steady)
    half_width = compare.t_quantile(0.975, 2) / math.sqrt(3)
    assert abs(share["low"] - (2 - half_width) / 2) < 1e-9 and abs(share["high"] - (2 + half_width) / 2) < 1e-9
    # the oracle's gain not clearly above 0: any share fits; not above 0 at all: no share; one seed: nothing
    weak = stats([50.0 + (1 if seed % 2 else -0.9) for seed in range(10)])
    share = compare.share_of_gain(half, area, weak)
    assert share["point"] is not None and share["low"] is None and share["high"] is None
    assert compare.share_of_gain(half, area, stats([49.0] * 10))["point"] is None
    noise = stats([50.3 - 0.1 - 0.2] * 10)  # area's 50.0 up to float rounding (7e-15): no gain
    assert compare.share_of_gain(half, area, noise)["point"] is None
    assert compare.share_of_gain(half[:1], area, oracle) is None


@pytest.mark.parametrize("seeds", [3, 10])
def test_the_share_interval_covers_the_true_share_95_percent_of_the_time(seeds):
    """Per-seed gains drawn normal and correlated, the true share 0.3 of an oracle gain of 1.5 whose spread
    leaves it clearly above 0 (bounded intervals): over 2,000 matrices the interval holds 0.3 in 93-97% of
    them (0.95 +- 4 standard errors). The percentile bootstrap it replaced held it in about 70% at 3 seeds."""
    rng, hits, unbounded = random.Random(seeds), 0, 0
    for _ in range(2000):
        oracle, arm = [], []
        for seed in range(seeds):
            o = rng.gauss(0, 1)
            oracle.append(dict(seed=seed, final=1.5 + 0.3 * o))
            arm.append(dict(seed=seed, final=0.45 + 0.6 * (0.5 * o + math.sqrt(0.75) * rng.gauss(0, 1))))
        share = compare.share_of_gain(arm, [dict(seed=s, final=0.0) for s in range(seeds)], oracle)
        unbounded += share["low"] is None
        hits += share["low"] is None or share["low"] <= 0.3 <= share["high"]
    assert unbounded < 100 and 0.93 <= hits / 2000 <= 0.97, (unbounded, hits / 2000)


def test_a_share_is_undefined_when_the_oracle_does_not_beat_area(tmp_path):
    args = args_for(tmp_path, models=["vit_mini"], arms=["area", "oracle", "tl_align"], seeds=[0, 1], epochs=1)
    for run in compare.plan(args):
        plant(run, [{"area": 50.0, "oracle": 50.0, "tl_align": 51.0}[run["arm"]]])
    lines, _ = compare.table(compare.plan(args), 2000, {})
    assert "tl_align undefined: the oracle does not beat area (mean gain +0.00 points, 2 seeds)" in "\n".join(lines)


def test_tiny_matrix_end_to_end_then_nothing_to_do(tmp_path, capsys):
    """compare.main in this process (its runs are train.py processes), twice: the second has nothing to do."""
    argv = ["--data", "synthetic", "--models", "vit_mini", "--arms", "none", "tl_align", "--seeds", "0", "--epochs",
            "1", "--subset", "128", "--label-images", "64", "--out", str(tmp_path / "runs"), "--results",
            str(tmp_path / "results.md"), "--", "--batch-size", "64", "--no-augment"]
    assert run_main(capsys, *argv, main=compare.main)[0] == 0
    text = (tmp_path / "results.md").read_text()
    assert "| none | 1: 0 |" in text and "| tl_align | 1: 0 |" in text
    code, out, _ = run_main(capsys, *argv, main=compare.main)
    assert code == 0 and "2 already finished, 0 to run" in out
    assert compare.signal.getsignal(compare.signal.SIGTERM) is not compare.interrupt  # put back as it was
    assert [i["argv"].split()[-1] for i in compare.read_json(tmp_path / "runs" / "invocations.json", [])] == \
        ["--no-augment"] * 2 and "--results" not in open(tmp_path / "runs" / "invocations.json").read()


def test_user_errors_end_in_one_line(tmp_path, capsys):
    common = ["--models", "vit_mini", "--arms", "area", "--seeds", "0", "1", "--jobs", "1", "--out",
              str(tmp_path / "runs"), "--results", str(tmp_path / "results.md"), "--"]

    code, _, err = run_main(capsys, *common, "--data-path", str(tmp_path / "nowhere"), main=compare.main)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "1 run(s) failed" in err and "nowhere" in err  # train.py's own line
    started = [d for d, _, files in os.walk(tmp_path / "runs") if "train.out" in files]
    assert len(started) == 1 and started[0].endswith("seed0")  # after the failure, seed 1 never started
    code, _, err = run_main(capsys, *common, "--seed", "3", main=compare.main)
    assert code == 2 and "--seed is set by compare.py itself" in err


def test_a_short_run_of_the_regime(tmp_path):
    """The regime's own flags on its data set, two epochs of 256 images (uncompiled: compiling takes a minute)."""
    import train
    run = dict(data="fashion_mnist", model="vit_mini", arm="tl_align", seed=0, epochs=2, subset=256, holdout=64,
               dir=str(tmp_path))  # validation on 64 held-out images: the run's course, not its figures
    run["cmd"] = compare.train_command(run, [f for f in compare.REGIME["flags"] if f != "--compile"])
    compare.claim(run)
    train.main(run["cmd"][1:])
    logs = compare.records(run)
    assert [r["epoch"] for r in logs] == [0, 1] and compare.finished(run)
    assert logs[0]["val_top1"] is None and 0 < logs[1]["val_top1"] <= 100  # evaluated at the end only
    assert logs[1]["label_mae_tl"] is not None  # Fashion-MNIST has masks: the label errors are measured


def test_calibration_report_reads_every_evaluated_epoch_and_says_whether_the_regime_counts(tmp_path):
    args = compare.study_args(args_for(tmp_path), "calibration")
    args.epochs, args.seeds = 4, [0, 1, 2]
    runs = compare.plan(args)
    assert all("--holdout" in r["cmd"] and "-holdout10000" in r["dir"] for r in runs)
    top1 = {"none": [10, 20, 30, 40], "area": [12, 24, 33, 45], "oracle": [13, 24, 35, 50]}
    for run in runs:
        compare.claim(run)
        with open(os.path.join(run["dir"], "log.jsonl"), "w") as f:
            for epoch in range(4):  # evaluated at epochs 2 and 4; seed s adds s / 2 to each figure
                top = top1[run["arm"]][epoch] + run["seed"] * (1 + (run["arm"] == "oracle")) / 2 \
                    if epoch % 2 else None
                f.write(json.dumps(dict(epoch=epoch, val_top1=top, train_loss=1.0,
                                        train_target_mae=None if run["arm"] == "none" else 0.2,
                                        train_ghost_rate=None if run["arm"] == "none" else 0.25)) + "\n")
        compare.add_wall_time(run, 60.0)
    lines = compare.calibration_table(runs, args)
    text = "\n".join(lines)
    assert "| arm | seeds | epoch 2 | epoch 4 |" in text
    assert "| none | 3: 0–2 | 20.50 ± 0.50 | 40.50 ± 0.50 |  |  | 1.0 |" in text  # no CutMix pairs: no target error
    assert "| area | 3: 0–2 | 24.50 ± 0.50 | 45.50 ± 0.50 | 0.200 ± 0.000 | 0.250 ± 0.000 | 1.0 |" in text
    assert "| area − none (3 seeds) | +4.00 ± 0.00 (higher) | +5.00 ± 0.00 (higher) |" in text
    # oracle − area: 0, 0.5, 1 at epoch 2 (mean 0.5, interval 4.303 * 0.5 / sqrt 3 = 1.24: holds 0); 5, 5.5, 6
    assert "| oracle − area (3 seeds) | +0.50 ± 1.24 (no difference) | +5.50 ± 1.24 (higher) |" in text
    assert "**The regime counts** (CutMix beats no mixing and the oracle beats area, both intervals above 0) " \
           "at epoch 4 of the 2 evaluated epochs" in text
    early = [r for r in runs if r["arm"] != "oracle" or r["seed"] == 0]  # one oracle seed: no interval yet
    assert "**Not decided yet** (7 of 7 runs finished)" in "\n".join(compare.calibration_table(early, args))
    with open(os.path.join(runs[-1]["dir"], "log.jsonl"), "w") as f:  # a run still going: no verdict yet
        f.write(json.dumps(dict(epoch=0, val_top1=None, train_loss=1.0)) + "\n")
    assert "**Not decided yet** (8 of 9 runs finished)" in "\n".join(compare.calibration_table(runs, args))
