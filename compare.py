"""No mixing, CutMix's area target (box on the patch grid and on pixels), DeiT's Mixup/CutMix switch,
TransMix and TL-Align side by side, paired by seed, in a regime where CutMix pays: the evidence of
paper Sec. 4 at a CPU's budget.

    python compare.py --study all          # the studies of results.md, resumable, records in results/
    python compare.py --study calibration  # one of them
    python compare.py --study all --report # only rewrite results.md from the records on disk
    python compare.py --arms none area --seeds 0 1 2      # an ad-hoc matrix, in runs/compare/
    python compare.py --seeds 0 1 2 --data cifar100 --subset 0 --epochs 300 -- --device cuda   # a GPU budget

The regime (REGIME): 1,000 training images, 100 epochs, CutMix the only augmentation (no crop or flip, no
drop path): small enough that a 0.68M-parameter ViT memorises its data without mixing (on Fashion-MNIST: no
mixing 71.3% with its training loss at the smoothing floor, CutMix 77.3%), so that CutMix's regularisation has
something to fix. A comparison of targets also needs a regime where the target matters: STUDIES first
calibrates one on held-out training images (none, area and the oracle target, which knows the visible
object shares: it must beat area, or no target can), then runs the matrix on fresh seeds. The arms
(ARMS) are train.py flag sets; every run is `python train.py ...` in its own directory,
OUT/<data>-e<epochs>-n<subset>[-holdout<N>]/<model>/<arm>/seed<seed>, which keeps the command that made it
(cmd.json): another command never reuses its runs. Resumable: a finished run (all its epochs in log.jsonl)
is not run again, and a run cut short continues from its checkpoint. A study's small records (cmd.json,
log.jsonl, wall.json, label_errors_*.json; never checkpoints) are committed under results/, so that any
machine can rewrite results.md (--report) and skips what is done.

results.md, per study and model. A calibration (held-out data): top-1 at every evaluated epoch, the paired
differences CutMix − none and oracle − area with 95% intervals, and whether the regime counts. A matrix
(test set): the pilot (no mixing against CutMix), then per arm the final top-1 (mean and std over seeds)
and its paired difference to the area target with a 95% interval; the error and ghost-label rate of
the targets each arm trained on; the label errors of the final models (the mean absolute error of the
area, TL-Align and TransMix shares of image 1 against the visible-foreground truth,
truth.target_shares); each method's share of the oracle's gain, (arm − area) / (oracle − area), with a
Fieller interval over seeds; a figure of final top-1 against the training target's error
(figures/targets_*.png); the commands, seeds, commit and wall time. Only the final epoch is reported:
picking the best epoch would select on the test set.
"""
import argparse
import functools
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time

import torch

import data
import train
import truth
import visualize
import vit

HERE = os.path.dirname(os.path.abspath(__file__))
# The regime: data set, training images (0 = all), epochs, and the train.py flags that make CutMix the only
# augmentation; 5 warm-up epochs of 100; the validation set evaluated every 25 epochs.
REGIME = dict(data="fashion_mnist", subset=1000, epochs=100,
              flags=["--batch-size", "128", "--lr", "1e-3", "--no-augment", "--drop-path", "0", "--warmup-epochs", "5",
                     "--eval-every", "25", "--compile"])
# name: the train.py flags of the arm. CutMix's box is drawn on the patch grid (the official TL-Align code)
# unless the name says pixel; DeiT's switch uses timm's pixel box, as DeiT does.
ARMS = {
    "none":       ["--mix", "none"],
    "area":       ["--mix", "cutmix", "--target", "area"],
    "area_pixel": ["--mix", "cutmix", "--target", "area", "--cutmix-mode", "pixel"],
    "deit":       ["--mix", "both", "--target", "area", "--cutmix-mode", "pixel"],
    "transmix":   ["--mix", "cutmix", "--target", "transmix"],
    "tl_align":   ["--mix", "cutmix", "--target", "tl_align"],
    "oracle":     ["--mix", "cutmix", "--target", "oracle"],  # the upper reference: needs object masks
}
PILOT = ["none", "area"]  # run first: the matrix means something only if CutMix pays in the regime
PILOT_SEEDS = 3
# The studies that results.md reports, in order: `python compare.py --study NAME` runs one, `--study all` all.
# calibration: on the last 10,000 training images (--holdout), never the test set, so that choosing the regime
# and its budget does not tune on the evaluation data; seeds apart from the matrix's.
# Both studies run one regime: small garments on clutter, the regime's budget and flags (uncompiled).
SMALL_GARMENTS = dict(data="fashion_mnist_small", models=["vit_mini"], epochs=100, subset=1000,
                      train_args=[f for f in REGIME["flags"] if f != "--compile"])
STUDIES = {
    "calibration": dict(**SMALL_GARMENTS, arms=["none", "area", "oracle"], seeds=[0, 1, 2, 3, 4], holdout=10000,
                        history="It was planned with seeds 0–2; seeds 3 and 4 were added after those three had "
                                "left CutMix − none undecided (+2.09 ± 2.62 at epoch 100)."),
    # matrix: the calibrated regime on the test set, with fresh seeds
    "matrix": dict(**SMALL_GARMENTS, arms=["none", "area", "oracle", "tl_align", "transmix"],
                   seeds=list(range(100, 110)), holdout=0, more_seeds=(["area", "tl_align"], list(range(110, 128))),
                   history="Seeds 110–127 of area and tl_align were added after the ten seeds of every arm (110–119 "
                           "first, 120–127 once those had run), to narrow the interval of TL-Align − area (the aim: "
                           "±0.3 points) whatever its value. Its runs ran at commits whose training code differs "
                           "only in how train.py reads torchrun's environment, which a one-process run does not "
                           "use."),
}
MODELS = ["vit_mini", "swin_mini"]
# flags of train.py that compare.py sets itself, per run
OWN_FLAGS = {"--data", "--model", "--target", "--mix", "--cutmix-mode", "--seed", "--epochs", "--subset",
             "--holdout", "--output-dir", "--resume", "--overwrite"}


def train_command(run, extra):
    """The train.py command line of one run (a dict with data, model, arm, seed, epochs, subset, dir)."""
    cmd = ["train.py", "--data", run["data"], "--model", run["model"], *ARMS[run["arm"]], "--seed", str(run["seed"]),
           "--epochs", str(run["epochs"])]
    if run["subset"]:
        cmd += ["--subset", str(run["subset"])]
    if run["holdout"]:
        cmd += ["--holdout", str(run["holdout"])]
    return cmd + extra + ["--output-dir", run["dir"]]


def plan(args):
    """Every run of the matrix, in the order they are started: the pilot's arms over the first PILOT_SEEDS
    seeds, then every other run seed by seed, so that a partial matrix soon answers the pilot and then
    grows by whole seeds, every arm paired; then a study's more_seeds (arms, seeds), if it has them: more
    seeds of a few arms, to narrow their paired difference."""
    runs = []
    more_arms, more_seeds = extra_seeds(args)
    for model in args.models:
        first = args.seeds[:PILOT_SEEDS]
        order = [(arm, seed) for arm in args.arms if arm in PILOT for seed in first]
        order += [(arm, seed) for seed in args.seeds for arm in args.arms if (arm, seed) not in order]
        order += [(arm, seed) for seed in more_seeds for arm in more_arms if (arm, seed) not in order]
        for arm, seed in order:
            if arm == "transmix" and vit.PRESETS[model]["family"] != "vit":
                continue  # TransMix reads the class token's attention
            run = dict(data=args.data, model=model, arm=arm, seed=seed, epochs=args.epochs, subset=args.subset,
                       holdout=args.holdout)
            run["dir"] = os.path.join(args.out, regime_name(args), model, arm, f"seed{seed}")
            run["cmd"] = train_command(run, args.train_args)
            runs.append(run)
    return runs


def extra_seeds(args):
    """(arms, seeds): a study's more seeds of a few arms, beyond the seeds of every arm; none unless it has them."""
    return getattr(args, "more_seeds", None) or ([], [])


def regime_name(args):
    """The folder of a regime's runs: data, epochs, training images and, for a calibration, held-out images."""
    return f"{args.data}-e{args.epochs}-n{args.subset}" + (f"-holdout{args.holdout}" if args.holdout else "")


def study_args(args, name):
    """args with a study's data, models, arms, seeds, budget and train.py flags in place of its own."""
    return argparse.Namespace(**{**vars(args), **STUDIES[name], "study": name})


def records(run):
    """The epoch records of a run's log.jsonl ([] if it has none yet)."""
    path = os.path.join(run["dir"], "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def made_by_plan(run):
    """Whether the run's folder holds this run's command (cmd.json). Its --output-dir is where the folder was
    found, however it is spelt (results/x, ./results/x, an absolute path): only the rest must be equal."""
    made_by = read_json(os.path.join(run["dir"], "cmd.json"), None)
    without_dir = lambda cmd: cmd[:cmd.index("--output-dir")] + cmd[cmd.index("--output-dir") + 2:]
    return made_by is not None and "--output-dir" in made_by and without_dir(made_by) == without_dir(run["cmd"])


def finished(run):
    """All its epochs logged, by this run's command: a folder another command made is never counted."""
    return made_by_plan(run) and [r["epoch"] for r in records(run)] == list(range(run["epochs"]))


def claim(run):
    """Make the run's directory this command's, or refuse if another command, or a run whose command is not
    known (a log without cmd.json), holds it."""
    os.makedirs(run["dir"], exist_ok=True)
    path = os.path.join(run["dir"], "cmd.json")
    if os.path.exists(path):
        if not made_by_plan(run):
            raise SystemExit(f"error: {run['dir']} holds a run of another command (see its cmd.json); "
                             f"use another --out, or delete that directory to run it anew")
    elif records(run):
        raise SystemExit(f"error: {run['dir']} holds a run whose command is not known (a log.jsonl without "
                         f"cmd.json); use another --out, or delete that directory to run it anew")
    else:
        write_json(path, run["cmd"])


def command_now(run):
    """The command that takes a run to its end: from its checkpoint if an earlier attempt left one; anew,
    replacing what it left (train.py refuses a folder holding a run unless told), if it left no checkpoint."""
    checkpoint = os.path.join(run["dir"], "checkpoint.pt")
    if os.path.exists(checkpoint):
        return run["cmd"] + ["--resume", checkpoint]
    return run["cmd"] + (["--overwrite"] if os.path.exists(os.path.join(run["dir"], "log.jsonl")) else [])


def read_json(path, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def wall_time(run):
    """Seconds spent running this run, over all the attempts that made it."""
    return read_json(os.path.join(run["dir"], "wall.json"), {"seconds": 0.0})["seconds"]


def add_wall_time(run, seconds):
    write_json(os.path.join(run["dir"], "wall.json"), {"seconds": wall_time(run) + seconds})


def name_of(run):
    return f"{run['model']} {run['arm']} seed {run['seed']}"


def last_line(run):
    """The last line train.py printed (its one-line error, if it failed)."""
    path = os.path.join(run["dir"], "train.out")
    lines = [line.strip() for line in open(path) if line.strip()] if os.path.exists(path) else []
    return lines[-1] if lines else "no output"


def execute(runs, args):
    """Run what is not finished, `args.jobs` at a time; returns the runs that failed. On any exit the
    runs in flight are stopped, with their time counted: the next call continues them."""
    todo = [r for r in runs if not finished(r)]
    for run in todo:
        claim(run)
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run, {args.jobs} at a time")
    env = dict(os.environ)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    running, failed, started, done = [], [], time.time(), 0
    try:
        while todo or running:
            while todo and len(running) < args.jobs and not failed:
                run = todo.pop(0)
                script, *flags = command_now(run)  # train.py beside this file; paths relative to the caller's
                out = open(os.path.join(run["dir"], "train.out"), "a")
                proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), *flags], env=env, stdout=out,
                                        stderr=subprocess.STDOUT)
                running.append((run, proc, out, time.time()))
            time.sleep(0.5)
            for item in [i for i in running if i[1].poll() is not None]:
                run, proc, out, t0 = item
                running.remove(item)
                out.close()
                add_wall_time(run, time.time() - t0)
                done += 1
                if proc.returncode == 0 and finished(run):
                    print(f"[{done}/{done + len(todo) + len(running)}] {name_of(run)}: top-1 "
                          f"{records(run)[-1]['val_top1']:.2f}% ({wall_time(run) / 60:.1f} min; "
                          f"{(time.time() - started) / 60:.0f} min so far)", flush=True)
                else:
                    failed.append(run)
                    print(f"failed: {name_of(run)} (exit {proc.returncode}): {last_line(run)}", flush=True)
            if failed:
                todo = []  # let the running ones finish, start nothing new
    finally:
        for run, proc, out, t0 in running:  # interrupted: stop them, keep their time
            proc.terminate()
            proc.wait()
            out.close()
            add_wall_time(run, time.time() - t0)
    return failed


# ----------------------------------------------------------------------------- label errors of the final models

def label_errors(run, images, val_sets):
    """MAE of each target's share of image 1 against the truth, for the run's final model, on `images`
    validation images, one box per 8 pairs (truth.target_shares). Kept in the run's directory."""
    path = os.path.join(run["dir"], f"label_errors_{images}.json")
    if os.path.exists(path):
        return read_json(path, None)
    if not os.path.exists(os.path.join(run["dir"], "checkpoint.pt")):  # records copied without the model
        return dict(area=None, tl=None, transmix=None)
    model, args = visualize.load(os.path.join(run["dir"], "checkpoint.pt"))
    if run["data"] not in val_sets:
        val_sets[run["data"]] = data.load_small(run["data"], args.get("data_path"), train=False)
    errors = truth.share_errors(visualize.shares(model, val_sets[run["data"]], images, args["cutmix_alpha"],
                                              args["cutmix_mode"]))
    write_json(path, errors)
    return errors


# ----------------------------------------------------------------------------- the report

@functools.lru_cache
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t distribution with df degrees of freedom (p > 1/2), by bisection on
    its CDF, which is integrated from the density with Simpson's rule: the standard library has no t."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t, n=2000):  # 1/2 + the integral of the density from 0 to t
        h = t / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_std(values, digits=2):
    """'m ± s' over seeds ('m' for one seed, '' for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def interval(diffs):
    """(mean, half-width of its 95% t-interval) of paired differences; half-width None for one seed."""
    m = statistics.mean(diffs)
    if len(diffs) < 2:
        return m, None
    return m, t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def verdict(diffs, digits=2, words=("higher", "lower")):
    """A paired difference as 'mean ± 95% half-width (word)': the word says which way the interval lies,
    or 'no difference' when it holds 0."""
    if not diffs:
        return ""
    m, half = interval(diffs)
    if half is None:
        return f"{m:+.{digits}f} (one seed)"
    word = "no difference" if abs(m) <= half else words[m < 0]
    return f"{m:+.{digits}f} ± {half:.{digits}f} ({word})"


def training_errors(run):
    """(mean training-target MAE, mean ghost rate) over a run's epochs, None where it logged none."""
    logs = records(run)
    mae = [r["train_target_mae"] for r in logs if r.get("train_target_mae") is not None]
    ghost = [r["train_ghost_rate"] for r in logs if r.get("train_ghost_rate") is not None]
    return (statistics.mean(mae) if mae else None), (statistics.mean(ghost) if ghost else None)


def summarize(run, label_images, val_sets):
    """The figures of one finished run."""
    last = records(run)[-1]
    train_mae, ghost = training_errors(run)
    return dict(seed=run["seed"], final=last["val_top1"], train_loss=last["train_loss"], wall=wall_time(run),
                train_mae=train_mae, ghost=ghost, **label_errors(run, label_images, val_sets))


def seed_spans(seeds):
    """Seeds as 'a–b, c': runs of consecutive seeds joined."""
    spans = []
    for seed in sorted(seeds):
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def seed_list(stats):
    """The seeds of a row: 'n: a–b, c'."""
    return f"{len(stats)}: {seed_spans(s['seed'] for s in stats)}"


def paired(stats, base):
    """(arm, base) summaries of the seeds both have."""
    base = {s["seed"]: s for s in base}
    return [(s, base[s["seed"]]) for s in stats if s["seed"] in base]


def share_of_gain(stats, area, oracle):
    """An arm's share of the oracle's gain over area, (arm - area) / (oracle - area) in final top-1, over the
    seeds all three finished, with Fieller's 95% interval for a ratio of paired means: the shares R for which
    the per-seed differences (arm - area) - R (oracle - area) have a mean that a t-test does not reject at 5%.
    It covers 95% for any number of seeds when the per-seed gains are normal (a percentile bootstrap over 10
    seeds covers about 89%, over 3 about 70%). A dict of point, low, high and seeds, or None below 2 seeds;
    point None when the oracle does not beat area on average (no gain to share); low and high None when the
    oracle's own gain is not clearly above 0 (its 95% interval holds 0): then the share can be anything."""
    area, oracle = {s["seed"]: s["final"] for s in area}, {s["seed"]: s["final"] for s in oracle}
    gains = [(s["final"] - area[s["seed"]], oracle[s["seed"]] - area[s["seed"]]) for s in stats
             if s["seed"] in area and s["seed"] in oracle]
    n = len(gains)
    if n < 2:
        return None
    arm_gains, oracle_gains = zip(*gains)
    arm_gain, oracle_gain = statistics.mean(arm_gains), statistics.mean(oracle_gains)
    result = dict(point=None, low=None, high=None, seeds=n, oracle_gain=oracle_gain)
    if oracle_gain <= 1e-9:  # top-1 differences are whole hundredths: below that is float noise, not a gain
        return result
    result["point"] = arm_gain / oracle_gain
    # (mean_a - R mean_o)^2 <= t^2 / n * var(a - R o), a quadratic A R^2 - 2 B R + C <= 0
    q = t_quantile(0.975, n - 1) ** 2 / n
    var_a, var_o = statistics.variance(arm_gains), statistics.variance(oracle_gains)
    cov = statistics.covariance(arm_gains, oracle_gains)
    A, B, C = oracle_gain ** 2 - q * var_o, arm_gain * oracle_gain - q * cov, arm_gain ** 2 - q * var_a
    if A > 0:  # the oracle's gain is clearly above 0: the set is the interval between the roots
        root = math.sqrt(max(B * B - A * C, 0.0))  # >= 0 in exact arithmetic: R = point satisfies the inequality
        result["low"], result["high"] = (B - root) / A, (B + root) / A
    return result


def smoothing_floor(run):
    """(smoothing, classes, the lowest training loss a run without mixing can reach): the entropy of its
    label-smoothed one-hot target, 1 - eps + eps / k on the class and eps / k on each of the k - 1 others."""
    args = train.get_args(run["cmd"][1:])
    eps, k = args.smoothing, data.DATASETS[args.data]["num_classes"]
    entropy = sum(count * p * math.log(1 / p) for p, count in ((1 - eps + eps / k, 1), (eps / k, k - 1)) if p > 0)
    return eps, k, entropy


def table(runs, label_images, val_sets):
    """The pilot's lines, the markdown table of one model, and each arm's share of the oracle's gain, from
    its finished runs."""
    by_arm = {}
    for run in runs:
        if finished(run):
            by_arm.setdefault(run["arm"], []).append(summarize(run, label_images, val_sets))
    pilot = []
    if by_arm.get("none") and by_arm.get("area"):
        pairs = paired(by_arm["area"], by_arm["none"])
        gain = verdict([a["final"] - n["final"] for a, n in pairs])
        smoothing, classes, floor = smoothing_floor(runs[0])
        pilot = [f"**Pilot, CutMix (area target) − no mixing:** {gain}"
                 f" points of final test top-1 over {len(pairs)} paired seeds (mean ± 95% interval); no mixing "
                 f"ends at a training loss of {mean_std([n['train_loss'] for _, n in pairs], 3)} (label smoothing "
                 f"{smoothing:g} over {classes} classes puts its floor at {floor:.3f}).", ""]
    lines = ["| arm | seeds | final top-1 (%) | − area (paired) | train target MAE | ghost rate | label MAE: area | "
             "TL-Align | TransMix | TL-Align − area MAE | min/run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        stats = by_arm.get(arm)
        if not stats:
            continue
        pairs = paired(stats, by_arm.get("area", []))
        vs_area = "" if arm == "area" or not pairs else (f"{verdict([s['final'] - a['final'] for s, a in pairs])}, "
                                                         f"{len(pairs)} pair{'s' * (len(pairs) > 1)}")
        # the same pairs and boxes for every model of an arm: the MAE difference is paired within a run
        tl_gain = verdict([s["tl"] - s["area"] for s in stats if s["tl"] is not None], 4, ("farther", "closer"))
        lines.append(f"| {arm} | {seed_list(stats)} | {mean_std([s['final'] for s in stats])} | {vs_area} | "
                     f"{mean_std([s['train_mae'] for s in stats], 3)} | {mean_std([s['ghost'] for s in stats], 3)} | "
                     f"{mean_std([s['area'] for s in stats], 4)} | {mean_std([s['tl'] for s in stats], 4)} | "
                     f"{mean_std([s['transmix'] for s in stats], 4)} | {tl_gain} | "
                     f"{statistics.mean(s['wall'] for s in stats) / 60:.1f} |")
    shares = []
    for arm in ARMS:
        if arm in ("none", "area", "oracle") or not by_arm.get(arm):
            continue
        share = share_of_gain(by_arm[arm], by_arm.get("area", []), by_arm.get("oracle", []))
        if share is None:
            continue
        if share["point"] is None:
            shares.append(f"{arm} undefined: the oracle does not beat area (mean gain {share['oracle_gain']:+.2f} "
                          f"points, {share['seeds']} seeds), so there is no gain to share")
        elif share["low"] is None:
            shares.append(f"{arm} {share['point']:+.2f}, 95% interval unbounded: the oracle's own gain over area "
                          f"is not clearly above 0 ({share['seeds']} seeds)")
        else:
            shares.append(f"{arm} {share['point']:+.2f}, 95% interval [{share['low']:+.2f}, {share['high']:+.2f}] "
                          f"({share['seeds']} seeds)")
    if shares:
        lines += ["", "**Share of the oracle's gain**, (arm − area) / (oracle − area) in final top-1 over the seeds "
                      "of all three, with Fieller's 95% interval for a ratio of paired means (a percentile bootstrap "
                      "over this few seeds would cover less than 95%; 0 means no part of the oracle's gain, 1 all "
                      "of it): " + "; ".join(shares) + "."]
    return pilot + lines, by_arm


def targets_figure(by_arm, path):
    """Final top-1 against the training target's error, one point per run, coloured by arm; no mixing,
    which has no target, as a band (mean ± std)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    if by_arm.get("none"):
        tops = [s["final"] for s in by_arm["none"]]
        m, sd = statistics.mean(tops), statistics.stdev(tops) if len(tops) > 1 else 0.0
        ax.axhspan(m - sd, m + sd, color="0.85", label="none (no mixing,\nno target): mean ± std")
        ax.axhline(m, color="0.5", lw=1)
    for arm, stats in by_arm.items():
        points = [(s["train_mae"], s["final"]) for s in stats if s["train_mae"] is not None]
        if points:
            ax.scatter(*zip(*points), label=arm, s=22, alpha=0.8, color=f"C{list(ARMS).index(arm)}")
    errors = [s["train_mae"] for stats in by_arm.values() for s in stats if s["train_mae"] is not None]
    ax.set_xlim(-0.01, max(errors + [0.2]) * 1.1)  # from 0, the oracle's error, whatever has run so far
    ax.margins(y=0.25)
    ax.set_xlabel("training target's mean |share of image 1 − visible share|")
    ax.set_ylabel("final test top-1 (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the plot: it hides no run
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def invocations(args, runs):
    """The compare.py commands that ran any of these runs, and their wall time in all."""
    dirs = {r["dir"] for r in runs}
    return [i for i in read_json(os.path.join(args.out, "invocations.json"), []) if dirs & set(i["dirs"])]


def log_invocation(args, runs, seconds):
    path = os.path.join(args.out, "invocations.json")
    os.makedirs(args.out, exist_ok=True)
    entries = read_json(path, [])
    argv = args.argv
    if "--results" in argv:  # where the report went, a path of that machine: not part of what ran
        i = argv.index("--results")
        argv = argv[:i] + argv[i + 2:]
    entries.append(dict(argv=shlex.join(["python", "compare.py", *argv]), seconds=seconds,
                        dirs=[r["dir"] for r in runs], commit=git_commit(records=args.out)))
    write_json(path, entries)


def git_commit(records):
    """The commit of the code that runs (with '+changes' if the tree differs from it), or 'unknown'. The
    studies' records folder is not code: the records a study writes there must not mark its own code changed."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
        records = os.path.relpath(os.path.abspath(records), HERE)
        outside = records.startswith(os.pardir)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
                               + ([] if outside else [f":(exclude){records}"]), cwd=HERE, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def eval_epochs(runs):
    """The epochs at which every finished run was evaluated (1-based), in order."""
    common = None
    for run in runs:
        if finished(run):
            evaluated = {r["epoch"] + 1 for r in records(run) if r.get("val_top1") is not None}
            common = evaluated if common is None else common & evaluated
    return sorted(common or [])


def calibration_table(runs, args):
    """A held-out study: per arm the accuracy at each evaluated epoch, the training targets' errors, and
    the paired differences that decide whether the regime counts (CutMix > none, oracle > area)."""
    epochs = eval_epochs(runs)
    by_arm = {}
    for run in runs:
        if finished(run):
            logs = {r["epoch"] + 1: r["val_top1"] for r in records(run)}
            mae, ghost = training_errors(run)
            by_arm.setdefault(run["arm"], []).append(dict(seed=run["seed"], top1=logs, mae=mae, ghost=ghost,
                                                          wall=wall_time(run)))
    head = " | ".join(f"epoch {e}" for e in epochs)
    lines = ["Held-out top-1 (%) by epoch, mean ± std over seeds; the training targets' mean error against the "
             "visible object shares and ghost-label rate, averaged over epochs:", "",
             f"| arm | seeds | {head} | train target MAE | ghost rate | min/run |",
             "|---|---|" + "---|" * len(epochs) + "---|---|---|"]
    for arm in ARMS:
        stats = by_arm.get(arm)
        if stats:
            lines.append(f"| {arm} | {seed_list(stats)} | " + " | ".join(mean_std([s['top1'][e] for s in stats])
                                                                 for e in epochs) +
                         f" | {mean_std([s['mae'] for s in stats], 3)} | {mean_std([s['ghost'] for s in stats], 3)}"
                         f" | {statistics.mean(s['wall'] for s in stats) / 60:.1f} |")
    lines += ["", "Paired differences (points, mean ± 95% interval over seeds):", "",
              f"| difference | {head} |", "|---|" + "---|" * len(epochs)]
    # decided once every planned run has finished: a verdict on the first seeds would be read as final
    n_done = sum(map(finished, runs))
    counts, decided = set(epochs), n_done == len(runs)
    for arm, base in (("area", "none"), ("oracle", "area")):
        pairs = paired(by_arm.get(arm, []), by_arm.get(base, []))
        decided &= len(pairs) > 1
        if not pairs:
            counts = set()
            continue
        diffs = {e: [a["top1"][e] - b["top1"][e] for a, b in pairs] for e in epochs}
        counts &= {e for e in epochs if len(pairs) > 1 and verdict(diffs[e]).endswith("(higher)")}
        lines.append(f"| {arm} − {base} ({len(pairs)} seed{'s' * (len(pairs) > 1)}) | "
                     + " | ".join(verdict(diffs[e]) for e in epochs) + " |")
    if not decided:
        verdict_line = (f"**Not decided yet** ({n_done} of {len(runs)} runs finished): the regime counts if CutMix "
                        "beats no mixing and the oracle beats area, both with a 95% interval above 0, once every "
                        "run has finished (at least 2 seeds of each pair).")
    elif counts:
        verdict_line = ("**The regime counts** (CutMix beats no mixing and the oracle beats area, both intervals "
                        f"above 0) at epoch{'s' * (len(counts) > 1)} {', '.join(map(str, sorted(counts)))} of the "
                        f"{len(epochs)} evaluated epochs (each tested at 95%, with no correction for looking at "
                        "several).")
    else:
        verdict_line = ("**The regime does not count** at any evaluated epoch: CutMix does not beat no mixing, or "
                        "the oracle does not beat area, with an interval above 0.")
    lines += ["", verdict_line]
    return lines


def command_template(runs, args):
    """A line with the train.py command of a group's runs, ARM and S in place of the arm's flags and seed."""
    run = runs[0]
    template = dict(run, arm="area", seed="S", dir=os.path.join(os.path.dirname(os.path.dirname(run["dir"])),
                                                                 "ARM", "seedS"))
    arms = {arm: ARMS[arm] for arm in dict.fromkeys(r["arm"] for r in runs)}
    return (f"Each run is `python {shlex.join(train_command(template, args.train_args))}` with the arm's flags in "
            f"place of `{shlex.join(ARMS['area'])}`: " +
            "; ".join(f"{arm}: `{shlex.join(flags)}`" for arm, flags in arms.items()) + ".")


def section(runs, args, figure_dir=None):
    """The lines of results.md for one plan of runs: a calibration (held-out data) or a matrix (test set),
    whose figure goes to figure_dir."""
    groups, val_sets = {}, {}
    for run in runs:
        groups.setdefault(run["model"], []).append(run)
    ran = invocations(args, runs)
    n_done = sum(finished(r) for r in runs)
    subset = "all" if not args.subset else f"the first {args.subset:,}"
    name = getattr(args, "study", None) or ("calibration" if args.holdout else "matrix")
    commits = sorted({i["commit"] for i in ran if "commit" in i}) or ["unknown"]  # the first runs kept none
    more_arms, more_seeds = extra_seeds(args)
    seeds = seed_spans(args.seeds) + (f" ({' and '.join(more_arms)} also {seed_spans(more_seeds)})"
                                      if more_seeds else "")
    status = (f"{n_done} of {len(runs)} runs finished, seeds {seeds}, code at commit "
              f"{', '.join(commits)}. Wall time of the {name}: {sum(i['seconds'] for i in ran) / 60:.0f} min, run "
              f"by: " + "; ".join(f"`{i['argv']}` ({i['seconds'] / 60:.0f} min)" for i in ran) + "." if ran else
              f"Not started: seeds {seeds}, {len(runs)} runs.")
    out = [f"## {name.capitalize()}: {args.data}, {subset} training images, {args.epochs} epochs", "", status, "",
           f"The regime: {args.data}, {subset} training images, {args.epochs} epochs, train.py's recipe for the "
           f"data set with `{' '.join(args.train_args)}`. Every arm of a seed starts from the same "
           f"initialisation and sees the same data order." + (f" {args.history}" if getattr(args, "history", None)
                                                              else ""), ""]
    if args.holdout:
        out += [f"Validation on the last {args.holdout:,} training images (`--holdout`), never the test set.", ""]
        for model, group in groups.items():
            out += [f"### {model}", "", command_template(group, args), ""] + calibration_table(group, args) + [""]
        return out
    out += ["How to read the tables:",
            "- *final top-1*: on the whole test set after the last epoch, mean ± standard deviation over seeds.",
            "- *− area (paired)*: the difference to the area target (CutMix, box on the patch grid) of the same "
            "seed, mean ± the half-width of its 95% t-interval over seeds, and the number of seeds paired. "
            "*no difference* when the interval holds 0.",
            f"- *label MAE*: on {args.label_images} test images mixed in CutMix pairs (one random box per 8 "
            f"pairs, the same for every run), the mean absolute error of each target's share of image 1 "
            f"against the true share (visible foreground pixels of image 1 over all visible foreground "
            f"pixels), for the final model of each run: *area* is CutMix's lam, *TL-Align* the aligned label "
            f"(the class token's; Swin: the mean token's), *TransMix* its attention lam. They are measured on "
            f"every run, whatever it trained with, with the run's own box (on the patch grid, or on pixels for "
            f"area_pixel and deit: their area MAE differs for that reason). *TL-Align − area MAE* below 0 "
            f"means the aligned label is closer to the truth (mean ± 95% interval over seeds).",
            "- *train target MAE*, *ghost rate*: what the run trained on, averaged over its epochs (train.py "
            "logs them on data with object masks): the mean |share of image 1 − visible share| over the pairs "
            "where some object shows, and the share of those pairs whose target gives 0.1 or more to an "
            "image none of whose object shows. Empty for no mixing, which has no mixed target.",
            "- *min/run*: wall time of one run, on a machine shared with whatever else ran (--jobs, tests).", ""]
    for model, group in groups.items():
        lines, by_arm = table(group, args.label_images, val_sets)
        out += [f"### {model}", "", command_template(group, args), ""] + lines + [""]
        if figure_dir and any(s["train_mae"] is not None for stats in by_arm.values() for s in stats):
            name = f"targets_{regime_name(args)}_{model}.png"
            os.makedirs(figure_dir, exist_ok=True)
            targets_figure(by_arm, os.path.join(figure_dir, name))
            out += [f"![final top-1 against the training target's error, one point per run]"
                    f"({os.path.basename(figure_dir)}/{name})", ""]
    return out


def report(plans, path):
    """Write results.md (path) from the finished runs of each (runs, args) in plans, one section each, and
    a matrix's figure beside it, in figures/."""
    out = ["# Results: no mixing, CutMix's area target, the oracle target, TransMix and TL-Align side by side",
           "", f"On {platform.machine()} with {os.cpu_count()} CPU threads, torch {torch.__version__}.", ""]
    figure_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "figures")
    for runs, args in plans:
        out += section(runs, args, figure_dir)
    with open(path, "w") as f:
        f.write("\n".join(out))
    print(f"wrote {path}")


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=REGIME["data"], choices=[n for n in data.DATASETS if n != "imagenet"])
    p.add_argument("--models", nargs="+", default=MODELS[:1], choices=MODELS)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=REGIME["epochs"])
    p.add_argument("--subset", type=int, default=REGIME["subset"], help="training images per run, 0 = all")
    p.add_argument("--holdout", type=int, default=0,
                   help="validate on the last N training images, not the test set: to calibrate a regime")
    p.add_argument("--jobs", type=int, default=1 if torch.cuda.is_available() else 2,
                   help="runs at a time (default: 2 on a CPU, one thread each; 1 on a GPU)")
    p.add_argument("--label-images", type=int, default=2000, help="test images of the label errors")
    p.add_argument("--study", choices=[*STUDIES, "all"],
                   help="run a study of STUDIES (all: each in order) in results/ and report them all in results.md, "
                        "in place of --data, --models, --arms, --seeds, --epochs, --subset, --holdout and train.py flags")
    p.add_argument("--out", default=None, help="directory of the runs (default: results with --study, else "
                                               "runs/compare)")
    p.add_argument("--results", default=None, help="the report (default: results.md with --study, else "
                                                   "OUT/results.md)")
    p.add_argument("--report", action="store_true", help="only write results.md from the runs on disk")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: train.py flags for every run, replacing the regime's "
                        f"({' '.join(REGIME['flags'])}), e.g. -- --batch-size 256 --device cuda")
    args = p.parse_args(argv)
    args.argv = argv  # as invoked, for invocations.json
    args.train_args = [a for a in args.train_args if a != "--"] or REGIME["flags"]
    if args.jobs < 1 or args.epochs < 1 or args.subset < 0 or args.holdout < 0 or args.label_images < 8:
        p.error("--jobs and --epochs must be at least 1, --subset and --holdout at least 0, --label-images at "
                "least 8")
    clash = OWN_FLAGS & {a.split("=")[0] for a in args.train_args}
    if clash:
        p.error(f"after --: {', '.join(sorted(clash))} is set by compare.py itself; "
                f"use its own flags (--data, --models, --arms, --seeds, --epochs, --subset, --out)")
    if args.results and not os.path.isdir(os.path.dirname(os.path.abspath(args.results))):
        p.error(f"--results {args.results}: its directory does not exist")
    args.out = args.out or ("results" if args.study else os.path.join("runs", "compare"))
    args.results = args.results or ("results.md" if args.study else os.path.join(args.out, "results.md"))
    if args.study:  # every study is reported; the chosen ones run, in STUDIES' order
        plans = [(plan(a), a) for a in (study_args(args, name) for name in STUDIES)]
        chosen = [(runs, a) for runs, a in plans if args.study in ("all", a.study)]
    else:
        plans = chosen = [(plan(args), args)]
    failed = []
    for runs, run_args in ([] if args.report else chosen):
        # a kill ends like Ctrl-C: the runs in flight are stopped and their time kept
        previous = signal.signal(signal.SIGTERM, interrupt)
        t0 = time.time()
        try:
            failed = execute(runs, run_args)
        except KeyboardInterrupt:
            print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
            sys.exit(130)
        finally:
            log_invocation(run_args, runs, time.time() - t0)
            signal.signal(signal.SIGTERM, previous)
        if failed:
            break
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    report(plans, args.results)
    if failed:
        print(f"error: {len(failed)} run(s) failed, first {name_of(failed[0])}: {last_line(failed[0])} "
              f"(its log: {os.path.join(failed[0]['dir'], 'train.out')}); fix it and run the same command again",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
