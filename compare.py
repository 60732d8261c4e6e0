"""CutMix's area target, TransMix and TL-Align side by side, over seeds: the evidence of paper Sec. 4.

    python compare.py                      # the default matrix, about 1.5 h on a 2-core CPU
    python compare.py --seeds 0 1 2 3 4 --epochs 30 --subset 0 --jobs 1     # a larger budget (GPU)
    python compare.py --report             # only rewrite results.md from the runs on disk

The matrix: data sets {synthetic, fashion_mnist} x models {vit_mini, swin_mini} x targets {none (no
mixing, the floor), area (CutMix, paper Eq. (1)), transmix (class-token models only), tl_align} x seeds.
Every run is `python train.py ...` in its own directory, OUT/<data>-e<epochs>-n<subset>/<model>/<target>/
seed<seed>, so that a change of budget never mixes with older runs. The matrix is resumable: a finished
run (all its epochs in log.jsonl) is not run again, and a run cut short continues from its checkpoint.

results.md, per data set and model: mean and standard deviation over seeds of the final and best
validation top-1 and of the label errors train.py measures every epoch (the mean absolute error of the
area, TL-Align and TransMix shares of image 1 against the visible-foreground truth), the difference to
the area target paired by seed, the exact commands and the wall time.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATASETS = ["synthetic", "fashion_mnist"]
MODELS = ["vit_mini", "swin_mini"]
TARGETS = ["none", "area", "transmix", "tl_align"]
CLASS_TOKEN_MODELS = ("vit", "deit")  # TransMix reads the class token's attention
# The default budget per data set, (epochs, training subset; 0 = all): the 42-run matrix in about 1.5 h
# on 2 CPU cores with --jobs 2. The recipe (lr, warm-up, smoothing, ...) is train.py's own.
BUDGET = {"synthetic": (2, 0), "fashion_mnist": (3, 12000)}


def train_command(run, epochs, subset, extra):
    """The train.py command line of one run (a dict with data, model, target, seed, dir)."""
    mixing = ["--mix", "none"] if run["target"] == "none" else ["--target", run["target"]]
    cmd = ["train.py", "--data", run["data"], "--model", run["model"], *mixing, "--seed", str(run["seed"]),
           "--epochs", str(epochs)]
    if subset:
        cmd += ["--subset", str(subset)]
    return cmd + extra + ["--output-dir", run["dir"]]


def run_dir(out, name, epochs, subset, model, target, seed):
    return os.path.join(out, f"{name}-e{epochs}-n{subset}", model, str(target), f"seed{seed}")


def plan(args):
    """Every run of the matrix, in the order they are started (seed-major, so that a partial matrix
    already compares all targets)."""
    runs = []
    for seed in args.seeds:
        for name in args.data:
            epochs, subset = args.epochs or BUDGET[name][0], BUDGET[name][1] if args.subset is None else args.subset
            for model in args.models:
                for target in args.targets:
                    if target == "transmix" and not model.startswith(CLASS_TOKEN_MODELS):
                        continue
                    run = dict(data=name, model=model, target=target, seed=seed, epochs=epochs, subset=subset,
                               dir=run_dir(args.out, name, epochs, subset, model, target, seed))
                    run["cmd"] = train_command(run, epochs, subset, args.train_args)
                    runs.append(run)
    return runs


def records(run):
    """The epoch records of a run's log.jsonl ([] if it has none yet)."""
    path = os.path.join(run["dir"], "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(run):
    return len(records(run)) == run["epochs"]


def command_now(run):
    """The command that takes a run to its end: from its checkpoint if an earlier attempt left one."""
    checkpoint = os.path.join(run["dir"], "checkpoint.pt")
    return run["cmd"] + (["--resume", checkpoint] if os.path.exists(checkpoint) else [])


def wall_time(run):
    """Seconds spent running this run, over all the attempts that made it."""
    path = os.path.join(run["dir"], "wall.json")
    if not os.path.exists(path):
        return 0.0
    with open(path) as f:
        return json.load(f)["seconds"]


def add_wall_time(run, seconds):
    total = wall_time(run) + seconds
    with open(os.path.join(run["dir"], "wall.json"), "w") as f:
        json.dump({"seconds": total}, f)


def name_of(run):
    return f"{run['data']} {run['model']} {run['target']} seed {run['seed']}"


def execute(runs, args):
    """Run what is not finished, `args.jobs` at a time; returns the runs that failed."""
    todo = [r for r in runs if not finished(r)]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run, {args.jobs} at a time")
    env = dict(os.environ)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    running, failed, started, done = [], [], time.time(), 0
    try:
        while todo or running:
            while todo and len(running) < args.jobs and not failed:
                run = todo.pop(0)
                os.makedirs(run["dir"], exist_ok=True)
                out = open(os.path.join(run["dir"], "train.out"), "a")
                script, *flags = command_now(run)  # train.py beside this file; paths relative to the caller's
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
                    last = records(run)[-1]
                    print(f"[{done}/{done + len(todo) + len(running)}] {name_of(run)}: top-1 {last['val_top1']:.2f}% "
                          f"({wall_time(run) / 60:.1f} min; {(time.time() - started) / 60:.0f} min so far)", flush=True)
                else:
                    failed.append(run)
                    print(f"failed: {name_of(run)} (exit {proc.returncode}): {last_line(run)}", flush=True)
            if failed:
                todo = []  # let the running ones finish, start nothing new
    except KeyboardInterrupt:
        for _, proc, out, _ in running:
            proc.terminate()
            proc.wait()
            out.close()
        raise
    return failed


def last_line(run):
    """The last line train.py printed (its one-line error, if it failed)."""
    with open(os.path.join(run["dir"], "train.out")) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "no output"


# ----------------------------------------------------------------------------- the report

def mean_std(values, digits=2, scale=1.0):
    """'m ± s' over seeds ('m' for one seed, '' for none)."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(run):
    """The figures of one finished run."""
    logs = records(run)
    last = logs[-1]
    return dict(seed=run["seed"], final=last["val_top1"], best=max(r["val_top1"] for r in logs),
                mae_area=last["label_mae_area"], mae_tl=last["label_mae_tl"], mae_tm=last["label_mae_transmix"],
                wall=wall_time(run))


def verdict(diffs, spread):
    """How a paired difference to the area target compares with the seed spread."""
    if len(diffs) < 2:
        return f"{diffs[0]:+.2f} (one seed)"
    m, s = statistics.mean(diffs), statistics.stdev(diffs)
    word = "within the seed spread" if abs(m) <= spread else ("better" if m > 0 else "worse")
    return f"{m:+.2f} ± {s:.2f} ({word})"


def table(runs):
    """The markdown table of one (data set, model) and its reading, from its finished runs."""
    by_target = {}
    for run in runs:
        if finished(run):
            by_target.setdefault(run["target"], []).append(summarize(run))
    area = {s["seed"]: s for s in by_target.get("area", [])}
    area_spread = statistics.stdev([s["final"] for s in area.values()]) if len(area) > 1 else 0.0
    lines = ["| target | seeds | final top-1 (%) | best top-1 (%) | final vs area (paired) | "
             "label MAE: area | TL-Align | TransMix | min/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for target in TARGETS:
        stats = by_target.get(target)
        if not stats:
            continue
        paired = [s["final"] - area[s["seed"]]["final"] for s in stats if s["seed"] in area]
        spread = max(area_spread, statistics.stdev([s["final"] for s in stats]) if len(stats) > 1 else 0.0)
        vs_area = "" if target == "area" or not paired else verdict(paired, spread)
        lines.append(f"| {target} | {len(stats)} | {mean_std([s['final'] for s in stats])} | "
                     f"{mean_std([s['best'] for s in stats])} | {vs_area} | "
                     f"{mean_std([s['mae_area'] for s in stats], 4)} | {mean_std([s['mae_tl'] for s in stats], 4)} | "
                     f"{mean_std([s['mae_tm'] for s in stats], 4)} | "
                     f"{statistics.mean(s['wall'] for s in stats) / 60:.1f} |")
    return lines


def report(runs, args, matrix_seconds):
    """Write results.md from the finished runs."""
    groups = {}
    for run in runs:
        groups.setdefault((run["data"], run["model"]), []).append(run)
    n_done = sum(finished(r) for r in runs)
    out = ["# Results: the area target, TransMix and TL-Align side by side", "",
           f"Written by `python {' '.join(sys.argv)}` ({n_done} of {len(runs)} runs finished) on "
           f"{platform.machine()} with {os.cpu_count()} CPU threads, {args.jobs} run(s) at a time, torch "
           f"{torch.__version__}. Wall time of the matrix: {matrix_seconds / 60:.0f} min.", "",
           "How to read the tables:",
           "- Top-1 is on the whole validation set, after the last epoch (final) and the best of the epochs "
           "(best); mean ± standard deviation over seeds.",
           "- *final vs area* is the difference to the area target of the same seed (same initialisation and "
           "data order), mean ± std. It says *within the seed spread* when its mean is no larger than the "
           "standard deviation of the final top-1 over seeds of either target.",
           "- *Label MAE* is train.py's label-accuracy metric after the last epoch: on 512 fixed CutMix "
           "pairs of validation images, the mean absolute error of each target's share of image 1 against "
           "the true share (the visible foreground pixels of image 1 over all visible foreground pixels). "
           "*area* is CutMix's lam (the same boxes for every run), *TL-Align* the class token's aligned "
           "label (Swin: the mean of its token labels), *TransMix* the attention-weighted lam. The TL-Align "
           "and TransMix errors are those of the model each run trained, whatever target it trained with.",
           "- *min/run* is the wall time of one run with the other runs sharing the machine.", ""]
    for (name, model), group in groups.items():
        run = group[0]
        template = dict(run, target="T", seed="S",
                        dir=run_dir(args.out, name, run["epochs"], run["subset"], model, "T", "S"))
        command = " ".join(train_command(template, run["epochs"], run["subset"], args.train_args))
        out += [f"## {name}, {model}", "",
                f"{run['epochs']} epoch(s) on {'all' if not run['subset'] else 'the first ' + str(run['subset'])} "
                f"training images, seeds {', '.join(str(s) for s in args.seeds)}. Each run is "
                f"`python {command}` with T one of area, transmix, tl_align, or `--mix none` in place of "
                f"`--target T` for the none row.", ""]
        out += table(group) + [""]
    with open(args.results, "w") as f:
        f.write("\n".join(out))
    print(f"wrote {args.results}")


def matrix_time(args, seconds=0.0):
    """Wall time of the matrix over all the invocations that ran it (kept beside the runs)."""
    path = os.path.join(args.out, "matrix.json")
    total = seconds
    if os.path.exists(path):
        with open(path) as f:
            total += json.load(f)["seconds"]
    if seconds:
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"seconds": total}, f)
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=DATASETS, choices=DATASETS)
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="per run (default: the budget of each data set)")
    p.add_argument("--subset", type=int, default=None, help="training images per run, 0 = all (default: the budget's)")
    p.add_argument("--jobs", type=int, default=1 if torch.cuda.is_available() else 2,
                   help="runs at a time (default: 2 on a CPU, sharing its cores; 1 on a GPU)")
    p.add_argument("--out", default="runs/compare", help="directory of the runs")
    p.add_argument("--results", default="results.md")
    p.add_argument("--report", action="store_true", help="only write results.md from the runs on disk")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: more train.py flags for every run, e.g. -- --batch-size 256 --device cuda")
    args = p.parse_args()
    args.train_args = [a for a in args.train_args if a != "--"]
    if args.jobs < 1 or (args.epochs is not None and args.epochs < 1) or (args.subset is not None and args.subset < 0):
        p.error("--jobs and --epochs must be at least 1, --subset at least 0")
    runs = plan(args)
    failed = []
    if not args.report:
        t0 = time.time()
        try:
            failed = execute(runs, args)
        except KeyboardInterrupt:
            matrix_time(args, time.time() - t0)
            print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
            sys.exit(130)
        matrix_time(args, time.time() - t0)
    report(runs, args, matrix_time(args))
    if failed:
        print(f"error: {len(failed)} run(s) failed, first {name_of(failed[0])}: {last_line(failed[0])} "
              f"(its log: {os.path.join(failed[0]['dir'], 'train.out')}); fix it and run the same command again",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
