"""CutMix's area target, TransMix and TL-Align side by side, over seeds: the evidence of paper Sec. 4.

    python compare.py                      # the default matrix: 42 runs, 88 min on a 2-core CPU
    python compare.py --seeds 0 1 2 3 4 --epochs 30 --subset 0 --jobs 1 -- --device cuda   # a GPU budget
    python compare.py --report             # only rewrite results.md from the runs on disk

The matrix: data sets {synthetic, fashion_mnist} x models {vit_mini, swin_mini} x targets {none (no
mixing, the floor), area (CutMix, paper Eq. (1)), transmix (class-token models only), tl_align} x seeds.
Every run is `python train.py ...` in its own directory, OUT/<data>-e<epochs>-n<subset>/<model>/<target>/
seed<seed>, which keeps the command that made it (cmd.json): another command never reuses its runs. The
matrix is resumable: a finished run (all its epochs in log.jsonl) is not run again, and a run cut short
continues from its checkpoint.

results.md, per data set and model, mean and standard deviation over seeds of: the final and best
validation top-1; their differences to the area target of the same seed; the label errors of the final
model (the mean absolute error of the area, TL-Align and TransMix shares of image 1 against the
visible-foreground truth, on --label-images validation images, tl_align.target_shares); with the
commands and the wall time.
"""
import argparse
import json
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
import tl_align as tl
import visualize
import vit

HERE = os.path.dirname(os.path.abspath(__file__))
DATASETS = ["synthetic", "fashion_mnist"]
MODELS = ["vit_mini", "swin_mini"]
TARGETS = ["none", "area", "transmix", "tl_align"]
# The default budget per data set, (epochs, training subset; 0 = all): 40k and 36k training images a run.
# The whole matrix took 88 min on this project's 2-core CPU with --jobs 2. The recipe is train.py's own.
BUDGET = {"synthetic": (2, 0), "fashion_mnist": (3, 12000)}
# flags of train.py that compare.py sets itself, per run
OWN_FLAGS = {"--data", "--model", "--target", "--mix", "--seed", "--epochs", "--subset", "--output-dir", "--resume"}


def train_command(run, extra):
    """The train.py command line of one run (a dict with data, model, target, seed, epochs, subset, dir)."""
    mixing = ["--mix", "none"] if run["target"] == "none" else ["--target", run["target"]]
    cmd = ["train.py", "--data", run["data"], "--model", run["model"], *mixing, "--seed", str(run["seed"]),
           "--epochs", str(run["epochs"])]
    if run["subset"]:
        cmd += ["--subset", str(run["subset"])]
    return cmd + extra + ["--output-dir", run["dir"]]


def plan(args):
    """Every run of the matrix, in the order they are started (seed-major, so that a partial matrix
    already compares all targets)."""
    runs = []
    for seed in args.seeds:
        for name in args.data:
            epochs, subset = args.epochs or BUDGET[name][0], BUDGET[name][1] if args.subset is None else args.subset
            for model in args.models:
                for target in args.targets:
                    if target == "transmix" and vit.PRESETS[model]["family"] != "vit":
                        continue  # TransMix reads the class token's attention
                    run = dict(data=name, model=model, target=target, seed=seed, epochs=epochs, subset=subset)
                    run["dir"] = os.path.join(args.out, f"{name}-e{epochs}-n{subset}", model, target, f"seed{seed}")
                    run["cmd"] = train_command(run, args.train_args)
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
    return [r["epoch"] for r in records(run)] == list(range(run["epochs"]))


def claim(run):
    """Make the run's directory this command's, or refuse if another command made it."""
    os.makedirs(run["dir"], exist_ok=True)
    path = os.path.join(run["dir"], "cmd.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != run["cmd"]:
                raise SystemExit(f"error: {run['dir']} holds a run of another command (see its cmd.json); "
                                 f"use another --out, or delete that directory to run it anew")
    else:
        with open(path, "w") as f:
            json.dump(run["cmd"], f)


def command_now(run):
    """The command that takes a run to its end: from its checkpoint if an earlier attempt left one."""
    checkpoint = os.path.join(run["dir"], "checkpoint.pt")
    return run["cmd"] + (["--resume", checkpoint] if os.path.exists(checkpoint) else [])


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
    return f"{run['data']} {run['model']} {run['target']} seed {run['seed']}"


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
    validation images, one box per 8 pairs (tl_align.target_shares). Kept in the run's directory."""
    path = os.path.join(run["dir"], f"label_errors_{images}.json")
    if os.path.exists(path):
        return read_json(path, None)
    model, args = visualize.load(os.path.join(run["dir"], "checkpoint.pt"))
    if run["data"] not in val_sets:
        val_sets[run["data"]] = data.load_small(run["data"], args.get("data_path"), train=False)
    errors = tl.share_errors(visualize.shares(model, val_sets[run["data"]], images, args["cutmix_alpha"],
                                              args["cutmix_mode"]))
    write_json(path, errors)
    return errors


# ----------------------------------------------------------------------------- the report

def mean_std(values, digits=2):
    """'m ± s' over seeds ('m' for one seed, '' for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def stdev(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(diffs, spread, digits=2, words=("higher", "lower")):
    """A paired difference, mean ± std over seeds, and whether it exceeds the seed spread: the larger of
    `spread` (the std over seeds of the two things compared) and the std of the differences."""
    if not diffs:
        return ""
    if len(diffs) == 1:
        return f"{diffs[0]:+.{digits}f} (one seed)"
    m, s = statistics.mean(diffs), statistics.stdev(diffs)
    word = "within the seed spread" if abs(m) <= max(spread, s) else words[m < 0]
    return f"{m:+.{digits}f} ± {s:.{digits}f} ({word})"


def summarize(run, label_images, val_sets):
    """The figures of one finished run."""
    logs = records(run)
    return dict(seed=run["seed"], final=logs[-1]["val_top1"], best=max(r["val_top1"] for r in logs),
                wall=wall_time(run), **label_errors(run, label_images, val_sets))


def table(runs, label_images, val_sets):
    """The markdown table of one (data set, model), from its finished runs."""
    by_target = {}
    for run in runs:
        if finished(run):
            by_target.setdefault(run["target"], []).append(summarize(run, label_images, val_sets))
    area = {s["seed"]: s for s in by_target.get("area", [])}
    lines = ["| target | seeds | final top-1 (%) | best top-1 (%) | final − area | best − area | "
             "label MAE: area | TL-Align | TransMix | TL-Align − area MAE | min/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for target in TARGETS:
        stats = by_target.get(target)
        if not stats:
            continue
        paired = [(s, area[s["seed"]]) for s in stats if s["seed"] in area]
        vs_area = ["", ""]
        if target != "area":
            for i, key in enumerate(("final", "best")):
                spread = max(stdev([s[key] for s in stats]), stdev([a[key] for a in area.values()]))
                vs_area[i] = verdict([s[key] - a[key] for s, a in paired], spread)
        # the area MAE is the same in every run (same pairs, same boxes): the spread is TL-Align's
        tl_gain = verdict([s["tl"] - s["area"] for s in stats], stdev([s["tl"] for s in stats]), 4,
                          ("farther", "closer"))
        lines.append(f"| {target} | {len(stats)} | {mean_std([s['final'] for s in stats])} | "
                     f"{mean_std([s['best'] for s in stats])} | {vs_area[0]} | {vs_area[1]} | "
                     f"{mean_std([s['area'] for s in stats], 4)} | {mean_std([s['tl'] for s in stats], 4)} | "
                     f"{mean_std([s['transmix'] for s in stats], 4)} | {tl_gain} | "
                     f"{statistics.mean(s['wall'] for s in stats) / 60:.1f} |")
    return lines


def invocations(args, runs):
    """The compare.py commands that ran any of these runs, and their wall time in all."""
    dirs = {r["dir"] for r in runs}
    return [i for i in read_json(os.path.join(args.out, "invocations.json"), []) if dirs & set(i["dirs"])]


def log_invocation(args, runs, seconds):
    path = os.path.join(args.out, "invocations.json")
    os.makedirs(args.out, exist_ok=True)
    entries = read_json(path, [])
    entries.append(dict(argv=shlex.join(["python", "compare.py", *sys.argv[1:]]), seconds=seconds,
                        dirs=[r["dir"] for r in runs]))
    write_json(path, entries)


def report(runs, args):
    """Write results.md from the finished runs."""
    groups, val_sets = {}, {}
    for run in runs:
        groups.setdefault((run["data"], run["model"]), []).append(run)
    ran = invocations(args, runs)
    n_done = sum(finished(r) for r in runs)
    out = ["# Results: the area target, TransMix and TL-Align side by side", "",
           f"{n_done} of {len(runs)} runs finished, on {platform.machine()} with {os.cpu_count()} CPU threads, "
           f"torch {torch.__version__}. Wall time of the matrix: {sum(i['seconds'] for i in ran) / 60:.0f} min, "
           f"run by: " + "; ".join(f"`{i['argv']}` ({i['seconds'] / 60:.0f} min)" for i in ran) + ".", "",
           "How to read the tables:",
           "- Top-1 is on the whole validation set, after the last epoch (final) and the best epoch (best); "
           "mean ± standard deviation over seeds.",
           "- *final − area*, *best − area*: the difference to the area target of the same seed (same "
           "initialisation and data order), mean ± std over seeds. It is called *within the seed spread* "
           "when its mean is no larger than the std over seeds of either target's top-1, or than the std "
           "of the differences themselves.",
           f"- *Label MAE*: on {args.label_images} validation images mixed in CutMix pairs (one random box "
           f"per 8 pairs, the same for every run), the mean absolute error of each target's share of "
           f"image 1 against the true share (visible foreground pixels of image 1 over all visible "
           f"foreground pixels), for the final model of each run: *area* is CutMix's lam, *TL-Align* the "
           f"aligned label (the class token's; Swin: the mean token's), *TransMix* its attention lam. "
           f"These are measured on every run, whatever target it trained with. *TL-Align − area MAE* "
           f"below 0 means the aligned label is closer to the truth.",
           "- *min/run*: wall time of one run, with another run sharing the machine (--jobs).", ""]
    for (name, model), group in groups.items():
        run = group[0]
        template = dict(run, target="T", seed="S", dir=os.path.join(os.path.dirname(os.path.dirname(run["dir"])),
                                                                    "T", "seedS"))
        out += [f"## {name}, {model}", "",
                f"{run['epochs']} epoch(s) on {'all' if not run['subset'] else 'the first ' + str(run['subset'])} "
                f"training images, seeds {', '.join(str(s) for s in args.seeds)}. Each run is "
                f"`python {shlex.join(train_command(template, args.train_args))}` with T one of area, "
                f"transmix, tl_align, or `--mix none` in place of `--target T` for the none row.", ""]
        out += table(group, args.label_images, val_sets) + [""]
    with open(args.results, "w") as f:
        f.write("\n".join(out))
    print(f"wrote {args.results}")


def interrupt(signum, frame):
    raise KeyboardInterrupt


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
    p.add_argument("--label-images", type=int, default=2000, help="validation images of the label errors")
    p.add_argument("--out", default="runs/compare", help="directory of the runs")
    p.add_argument("--results", default="results.md")
    p.add_argument("--report", action="store_true", help="only write results.md from the runs on disk")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: more train.py flags for every run, e.g. -- --batch-size 256 --device cuda")
    args = p.parse_args()
    args.train_args = [a for a in args.train_args if a != "--"]
    if args.jobs < 1 or (args.epochs is not None and args.epochs < 1) or (args.subset is not None and args.subset < 0) \
            or args.label_images < 8:
        p.error("--jobs and --epochs must be at least 1, --subset at least 0, --label-images at least 8")
    clash = OWN_FLAGS & {a.split("=")[0] for a in args.train_args}
    if clash:
        p.error(f"after --: {', '.join(sorted(clash))} is set by compare.py itself; "
                f"use its own flags (--data, --models, --targets, --seeds, --epochs, --subset, --out)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.results))):
        p.error(f"--results {args.results}: its directory does not exist")
    runs = plan(args)
    failed = []
    if not args.report:
        # a kill ends like Ctrl-C: the runs in flight are stopped and their time kept
        signal.signal(signal.SIGTERM, interrupt)
        t0 = time.time()
        try:
            failed = execute(runs, args)
        except KeyboardInterrupt:
            print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
            sys.exit(130)
        finally:
            log_invocation(args, runs, time.time() - t0)
    report(runs, args)
    if failed:
        print(f"error: {len(failed)} run(s) failed, first {name_of(failed[0])}: {last_line(failed[0])} "
              f"(its log: {os.path.join(failed[0]['dir'], 'train.out')}); fix it and run the same command again",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
