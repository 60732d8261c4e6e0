"""Tests of train.py: the default run, checkpoints and resume, error paths, the two-process run (CPU)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid

from contextlib import nullcontext

import pytest
import torch

import bench
import checkpoint
import data
import imagenet
import train
import vit

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = torch.device("cpu")
SMALL = ["--subset", "256", "--batch-size", "64", "--log-every", "1000"]
FAST = [*SMALL, "--holdout", "64"]  # validation on 64 training images, not 2,000: runs whose figures do not matter


def run_cli(*args, cwd=HERE):
    """Run a command in a fresh process; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def run_main(capsys, *argv, main=None):
    """main(argv) (train.main unless given, e.g. bench.main) in this process, as `python train.py ARGV` runs it
    but without the ~8 s of imports a process of its own costs; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        (main or train.main)(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_default_run_one_short_epoch(tmp_path, capsys):
    code, out, err = run_cli("train.py", "--epochs", "1", *FAST, "--output-dir", str(tmp_path))
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
    code, out, err = run_main(capsys, "--eval", "--resume", str(tmp_path / "best.pt"), *FAST)  # the same 64
    assert code == 0 and f"top-1 {record['val_top1']:.2f}%" in out, err


class Killed(Exception):
    """Stands for the process being killed."""


def test_resume_continues_exactly(tmp_path, monkeypatch):
    common = ["--epochs", "2", *FAST, "--drop-path", "0.1", "--mix", "both"]
    train.main(common + ["--output-dir", str(tmp_path / "straight")])

    save = checkpoint.save_atomic

    def save_then_die(obj, path):  # killed right after the first epoch's checkpoint is written
        save(obj, path)
        if path.endswith("checkpoint.pt"):
            raise Killed

    monkeypatch.setattr(checkpoint, "save_atomic", save_then_die)
    with pytest.raises(Killed):
        train.main(common + ["--output-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(checkpoint, "save_atomic", save)
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
    checkpoint.save_atomic({"model": {"w": torch.ones(3)}}, path)

    def torn_save(obj, f):  # half a file, then the process dies
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half written")
        raise Killed

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(Killed):
        checkpoint.save_atomic({"model": {"w": torch.zeros(3)}}, path)
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path)
    train.main(["--epochs", "1", *FAST, "--output-dir", out])
    before = (tmp_path / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(train.tl, "soft_cross_entropy", lambda logits, target: logits.sum() * float("nan"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--epochs", "2", *FAST, "--output-dir", out, "--resume", out + "/checkpoint.pt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: non-finite loss") and "\n" not in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def fake_checkpoints(tmp_path):
    """best.pt-like weights only, and a complete checkpoint.pt of a finished 1-epoch run, for vit_mini."""
    model = vit.create_model("vit_mini", num_classes=10)
    optimizer = torch.optim.AdamW(train.param_groups(model, 0.05))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    torch.save({"model": model.state_dict(), "epoch": 0, "val_top1": 10.0}, tmp_path / "best.pt")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": {}, "epoch": 0, "best_top1": 10.0, "args": {}}, tmp_path / "finished.pt")


CASES = {  # arguments -> a word the one-line message must contain
    "missing_data": (["--data", "cifar10", "--data-path", "{tmp}/nowhere"], "nowhere"),
    "missing_ckpt": (["--resume", "{tmp}/nothing.pt"], "nothing.pt"),
    "dir_as_ckpt": (["--resume", "{tmp}"], "is a directory"),
    "corrupt_ckpt": (["--resume", "{tmp}/corrupt.pt"], "corrupt.pt"),
    "wrong_ckpt": (["--resume", "{tmp}/wrong.pt"], "wrong.pt"),
    "weights_only_ckpt": (["--resume", "{tmp}/best.pt"], "checkpoint.pt"),
    "finished_ckpt": (["--resume", "{tmp}/finished.pt"], "raise --epochs"),
    "bad_size": (["--model", "swin_t"], "window"),  # 32 px synthetic images: 8x8 tokens, window 7
    "imagenet_no_path": (["--data", "imagenet"], "--data-path"),
    "zero_steps": (["--subset", "32", "--batch-size", "64"], "--batch-size 64"),
    "zero_epochs": (["--epochs", "0"], "--epochs"),
    "output_is_a_file": (["--output-dir", "{tmp}/corrupt.pt/run"], "--output-dir"),
    "bad_device": (["--device", "gpu"], "--device gpu"),
    "transmix_on_swin": (["--model", "swin_mini", "--target", "transmix"], "class-token"),
    "holdout_too_large": (["--data", "fashion_mnist", "--holdout", "59900"], "--holdout 59900 leaves 100"),
    "holdout_on_imagenet": (["--data", "imagenet", "--holdout", "10"], "--holdout"),
    "no_augment_on_imagenet": (["--data", "imagenet", "--no-augment"], "--no-augment"),
    "zero_eval_every": (["--eval-every", "0"], "--eval-every"),
    "negative_workers": (["--workers", "-1"], "--workers -1"),
    "zero_repeats": (["--repeats", "0"], "--repeats"),
    "oracle_without_masks": (["--data", "cifar10", "--data-path", "{tmp}", "--target", "oracle"], "--target oracle"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, case):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "args": {"model": "deit_t"}}, tmp_path / "wrong.pt")
    fake_checkpoints(tmp_path)
    args, named = CASES[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = run_main(capsys, *SMALL, "--epochs", "1", "--output-dir", str(tmp_path / "run"), *args)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert named in err


def test_label_truth_is_the_area_when_everything_is_foreground():
    """With all-ones masks the visible-foreground share is the pixel share: the area MAE must be 0."""
    args = train.get_args([])
    val = data.load_small("synthetic", None, train=False, subset=128)
    val.masks = torch.ones_like(val.masks)
    model = vit.create_model("vit_mini", num_classes=10)
    for mode in ("grid", "pixel"):
        args.cutmix_mode = mode
        mae = train.label_errors(model, val, args, torch.device("cpu"), nullcontext(), num_images=128)
        assert mae["area"] < 1e-6 and mae["tl"] > 1e-4  # the model's label is not the area
    val.masks[:, :, :] = False
    val.masks[::2, 10:20, 10:20] = True  # even images only: an odd image's pair partner is even
    mae = train.label_errors(model, val, args, torch.device("cpu"), nullcontext(), num_images=128)
    # pairs (i, B-1-i) with B = 64 join an even and an odd image: truth is 1 or 0 wherever defined
    assert mae["area"] > 0.05


def test_two_process_gloo_run(tmp_path, capsys):
    code, out, err = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                             "--epochs", "1", "--subset", "256", "--batch-size", "32", "--output-dir", str(tmp_path))
    assert code == 0, err[-3000:]
    assert "128 x 2" not in out and "4 steps of 32 x 2" in out  # each rank trains on its half
    assert out.count("done: best val top-1") == 1  # logging on rank 0 only
    assert out.count("weights agree on all 2 ranks") == 1
    record = json.loads((tmp_path / "log.jsonl").read_text())
    # validation gathered across ranks: the same accuracy as one process evaluating the whole set
    code, out, err = run_main(capsys, "--eval", "--resume", str(tmp_path / "checkpoint.pt"))
    assert code == 0 and f"top-1 {record['val_top1']:.2f}%" in out, (out, err)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(nodes, logs, *args, timeout=180):
    """Run train.py as two "nodes": two torchrun launchers started at once, one process each (gloo), meeting
    at a c10d rendezvous on this host; each runs in its own folder of `nodes`, which stands for that node's
    own file system. Returns each launcher's stdout (rank 0's lines are in one of them); if either fails,
    prints both launchers' stderr tails and fails. Neither is left running, whatever happens."""
    port, job = free_port(), uuid.uuid4().hex[:8]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job,
               os.path.join(HERE, "train.py"), *args]
    streams = [(logs / f"{job}-node{i}.out", logs / f"{job}-node{i}.err") for i in range(len(nodes))]
    procs = []
    try:
        for node, (out, err) in zip(nodes, streams):
            with open(out, "w") as o, open(err, "w") as e:  # files, not pipes: a full pipe would stall a node
                procs.append(subprocess.Popen(command, cwd=node, stdout=o, stderr=e,
                                              env={**os.environ, "OMP_NUM_THREADS": "1"}))
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()  # torchrun ends its workers on SIGTERM
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if any(p.returncode != 0 for p in procs) or len(procs) < len(nodes):
            print("\n".join(f"--- node {i} (exit {p.returncode}), stderr tail:\n{err.read_text()[-4000:]}"
                            for i, (p, (_, err)) in enumerate(zip(procs, streams))), file=sys.stderr)
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
    return [out.read_text() for out, _ in streams]


def test_two_nodes_agree_scale_the_lr_and_resume(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]  # working folders on no shared file system
    for folder in (*nodes, tmp_path / "logs"):
        folder.mkdir()
    small = ["--subset", "128", "--batch-size", "16", "--holdout", "64", "--log-every", "1000"]
    outs = run_two_nodes(nodes, tmp_path / "logs", "--epochs", "1", *small, "--output-dir", "run")
    out = "".join(outs)
    assert "4 steps of 16 x 2" in out and out.count("weights agree on all 2 ranks") == 1, outs
    # rank 0 alone writes the run, into its own node's folder; the other node gets nothing
    homes = [node for node in nodes if (node / "run").exists()]
    assert len(homes) == 1, [sorted(os.listdir(node)) for node in nodes]
    home = homes[0]
    assert sorted(os.listdir(home / "run")) == ["best.pt", "checkpoint.pt", "log.jsonl"]
    # the lr of the global batch, 2 x 16: twice the one-process run's of the same --batch-size, at the peak
    # (the first line) and in the step the log records (the last of 4, 0.5 of the peak on the cosine)
    one = train.get_args(["--epochs", "1", *small], world=1)
    assert f"lr {2 * one.lr:.2e}," in out, out
    record = json.loads((home / "run" / "log.jsonl").read_text())
    assert record["lr"] == pytest.approx(2 * one.lr * train.schedule(one, 4)(3), rel=1e-9)

    # resuming: every rank reads --resume, so the run is copied to the same path on the other node first
    shutil.copytree(home / "run", next(node for node in nodes if node != home) / "run")
    outs = run_two_nodes(nodes, tmp_path / "logs", "--epochs", "2", *small, "--resume", "run/checkpoint.pt")
    home = next(node for node, text in zip(nodes, outs) if "done: " in text)  # rank 0's node, maybe the other
    out = "".join(outs)
    assert "epoch 0 [" not in out and "epoch 1 [4/4]" in out, outs  # continues from epoch 1
    assert out.count("weights agree on all 2 ranks") == 1, outs
    records = [json.loads(line) for line in (home / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert torch.load(home / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_the_weights_fingerprint_tells_one_changed_element():
    model = vit.create_model("vit_mini", num_classes=10)
    copy = vit.create_model("vit_mini", num_classes=10)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(train.weights_fingerprint(model), train.weights_fingerprint(copy))
    with torch.no_grad():  # one ulp of one element
        w = copy.head.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(1.0))
    a, b = train.weights_fingerprint(model), train.weights_fingerprint(copy)
    assert a.dtype == torch.int64 and len(a) == len(list(model.parameters()))
    assert (a != b).sum() == 1
    assert len(train.weights_fingerprint(copy.to(torch.bfloat16))) == len(a)  # 2-byte elements too


def test_warmup_is_the_recipes_but_at_most_a_tenth_of_the_run():
    assert train.get_args(["--data", "fashion_mnist"]).warmup_epochs == 1  # the recipe's 1 of 10 epochs
    assert train.get_args(["--data", "fashion_mnist", "--epochs", "1"]).warmup_epochs == 0.1
    assert train.get_args(["--data", "imagenet", "--model", "deit_s"]).warmup_epochs == 5  # DeiT: 5 of 300
    assert train.get_args(["--data", "imagenet", "--model", "swin_t"]).warmup_epochs == 20  # Swin: 20 of 300
    assert train.get_args(["--data", "imagenet", "--epochs", "30"]).warmup_epochs == 3
    assert train.get_args(["--epochs", "1", "--warmup-epochs", "0.5"]).warmup_epochs == 0.5  # as asked
    # a one-epoch run of 468 steps: 46 of warm-up from 0 (one step behind, as timm's loops), then the
    # whole cosine down to 0
    args = train.get_args(["--data", "fashion_mnist", "--epochs", "1", "--lr", "1e-3"])
    args.warmup_lr, args.min_lr = 0.0, 0.0
    factors = [train.schedule(args, 468)(s) for s in range(468)]
    assert factors[0] == factors[1] == 0 < factors[2] and factors[46] < factors[47] == 1.0 > factors[48]
    assert all(a >= b for a, b in zip(factors[47:], factors[48:])) and factors[-1] < 1e-4


def lr_of_every_step(argv, steps_per_epoch, world=1):
    """The rate of every optimizer step of a run, as train.run builds its schedule."""
    args = train.get_args(argv, world=world)
    factor = train.schedule(args, steps_per_epoch)
    return args, [args.lr * factor(s) for s in range(args.epochs * steps_per_epoch)]


def test_deit_schedule_is_deits_timm_scheduler_stepped_per_epoch():
    from timm.scheduler import CosineLRScheduler
    steps = 3  # steps per epoch; 8 processes x 128 = DeiT's global batch of 1024
    args, ours = lr_of_every_step(["--data", "imagenet", "--model", "deit_s"], steps, world=8)
    assert args.lr == 5e-4 * 1024 / 512 and (args.warmup_lr, args.min_lr) == (1e-6, 1e-5)  # ends not scaled
    # DeiT's main.py: timm's create_scheduler(args) with --warmup-lr 1e-6 --min-lr 1e-5 --warmup-epochs 5,
    # and lr_scheduler.step(epoch) after every epoch
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    deit = CosineLRScheduler(optimizer, t_initial=300, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=5,
                             cycle_limit=1, t_in_epochs=True)
    theirs = []
    for epoch in range(300):
        theirs += [optimizer.param_groups[0]["lr"]] * steps
        deit.step(epoch)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0)
    assert ours[0] == ours[3] == 1e-6 and 1e-5 < ours[-1] < 1.02e-5


@pytest.mark.parametrize("model, drop_path", [("swin_t", 0.2), ("swin_s", 0.3), ("swin_b", 0.5)])
def test_swin_schedule_is_swins_timm_scheduler_stepped_per_step(model, drop_path):
    from timm.scheduler import CosineLRScheduler
    steps = 7  # steps per epoch
    args, ours = lr_of_every_step(["--data", "imagenet", "--model", model], steps, world=8)
    assert (args.drop_path, args.clip_grad, args.mix, args.warmup_epochs) == (drop_path, 5.0, "both", 20)
    scale = 1024 / 512  # Swin's main.py: BASE_LR, WARMUP_LR and MIN_LR x batch x world / 512
    assert (args.lr, args.warmup_lr, args.min_lr) == (5e-4 * scale, 5e-7 * scale, 5e-6 * scale)
    # Swin's lr_scheduler.build_scheduler as it produced Swin's results (no WARMUP_PREFIX: t_initial is all
    # the steps), and step_update(epoch * steps + idx) after every update (main.py)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    num_steps, warmup_steps = 300 * steps, 20 * steps
    swin = CosineLRScheduler(optimizer, t_initial=num_steps, cycle_mul=1., lr_min=args.min_lr,
                             warmup_lr_init=args.warmup_lr, warmup_t=warmup_steps, cycle_limit=1,
                             t_in_epochs=False)
    theirs = []
    for step in range(num_steps):
        theirs.append(optimizer.param_groups[0]["lr"])
        swin.step_update(step)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0)


def test_a_learning_rate_below_the_floor_is_not_raised():
    args, ours = lr_of_every_step(["--data", "imagenet", "--epochs", "10", "--lr", "5e-6"], 2)
    assert (args.warmup_lr, args.min_lr) == (1e-6, 5e-6)  # DeiT's floor 1e-5 is above this lr
    assert max(ours) == pytest.approx(5e-6) and all(a >= b for a, b in zip(ours[4:], ours[5:]))


# lam, the CutMix box and DeiT's switch are drawn on the host, from CPU tensors: nothing waits for a GPU
HOST_DRAWS = {"_sample_lambda", "_rand_box", "batch_mix"}


def loop_of(frame):
    """The loop a host read of a tensor's value belongs to (bench.host_reads): the training step or the evaluation,
    in our code or in torch's Python code under it (optimizer, GradScaler, clipping, DDP); the data loader and the
    host-side draws hold host data in any run, and are left out (None): data.py, torch's DataLoader (its workers'
    base seed) and an image folder's __getitem__ (a loader worker's work)."""
    while frame is not None:
        code = frame.f_code
        file = os.path.abspath(code.co_filename)
        if code.co_name in HOST_DRAWS or file == os.path.abspath(data.__file__) or \
                os.path.dirname(file) == os.path.dirname(torch.utils.data.dataloader.__file__) or \
                (code.co_name == "__getitem__" and file == os.path.abspath(imagenet.__file__)):  # a worker's
            return None
        if code.co_name in ("train_one_epoch", "evaluate") and code.co_filename == train.__file__:
            return code.co_name
        frame = frame.f_back
    return None


@pytest.mark.parametrize("flags", [["--fused-attn"], ["--target", "transmix", "--mix", "both", "--cutmix-mode", "pixel"],
                                   ["--amp", "fp16", "--clip-grad", "1", "--target", "area"], ["--model", "swin_mini"],
                                   ["--target", "oracle"]],
                         ids=["tl_align_fused", "transmix_deit_switch", "fp16_scaler_clip", "swin", "oracle"])
def test_the_step_never_waits_for_the_device(tmp_path, flags):
    # 8 steps, logging after steps 3, 6 and 8: one host read at each, none in any other step
    with bench.host_reads(loop_of) as reads:
        train.main(["--epochs", "1", "--subset", "64", "--batch-size", "8", "--log-every", "3", "--holdout", "32",
                    "--output-dir", str(tmp_path), *flags])
    in_loop = [r for r in reads if r[0] == "train_one_epoch"]
    assert [r[1:3] for r in in_loop] == [("tolist", "train_one_epoch")] * 3, in_loop
    assert [r[1:3] for r in reads if r[0] == "evaluate"] == [("tolist", "evaluate")], reads  # one per evaluation


def test_the_image_folder_step_never_waits_for_the_device(tmp_path):
    """Image folders' uint8 batches are normalised and erased on the device (imagenet.DeviceBatches): no host
    read there either. --workers 0, so that the worker's part runs in this process, told apart as
    Folder.__getitem__; 4 steps logging after 2 and 4: two reads, and one for the evaluation."""
    write_folders(tmp_path / "data", [4, 4])
    with bench.host_reads(loop_of) as reads:
        train.main(["--data", "imagenet", "--data-path", str(tmp_path / "data"), "--model", "vit_mini", "--img-size",
                    "32", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--repeats", "1", "--log-every",
                    "2", "--output-dir", str(tmp_path / "run")])
    assert [r[1:3] for r in reads if r[0] == "train_one_epoch"] == [("tolist", "train_one_epoch")] * 2, reads
    assert [r[1:3] for r in reads if r[0] == "evaluate"] == [("tolist", "evaluate")], reads


def test_cpu_bf16_is_read_off_the_feature_flags(tmp_path, monkeypatch):
    cases = {"flags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n": True,  # AVX512-BF16 (Zen 4, Cooper Lake)
             "flags\t\t: fpu sse avx512f amx_bf16\n": True,              # AMX (Sapphire Rapids)
             "flags\t\t: fpu sse avx2 avx512f avx512bw\n": False,        # AVX-512 without bf16: emulated
             "Features\t: fp asimd sve bf16 i8mm\n": True,               # Arm (Graviton 3, Neoverse V1)
             "Features\t: fp asimd evtstrm\n": False}
    for i, (text, expected) in enumerate(cases.items()):
        (tmp_path / f"cpuinfo{i}").write_text("processor\t: 0\n" + text)
        assert train.cpu_has_bf16(str(tmp_path / f"cpuinfo{i}")) is expected, text
    assert train.cpu_has_bf16(str(tmp_path / "missing")) is False
    assert train.auto_amp(torch.device("cpu")) == ("bf16" if train.cpu_has_bf16() else "off")
    for capability, amp in (((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert train.auto_amp(torch.device("cuda")) == amp  # V100 and T4 emulate bf16: fp16 with loss scaling


def test_holdout_validates_on_the_last_training_samples():
    args = train.get_args(["--subset", "300", "--holdout", "200", "--no-augment", "--batch-size", "100"])
    train_loader, _, val_set, _ = train.build_data(args, 0, CPU)
    images, labels, masks = data.make_synthetic(500)  # the training stream, never the val stream
    assert torch.equal(train_loader.data.images, torch.from_numpy(images[:300]))
    assert torch.equal(val_set.images, torch.from_numpy(images[300:])) and torch.equal(val_set.masks,
                                                                                       torch.from_numpy(masks[300:]))
    assert not train_loader.augment
    x, y, _ = next(iter(train_loader))  # --no-augment: the images as they are, only normalised (and masks)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(args.seed))[:100]
    assert torch.equal(x, data.normalize(train_loader.data.images[order], *(data.DATASETS["synthetic"][k]
                                                                           for k in ("mean", "std"))))


def test_eval_every_evaluates_on_schedule_and_at_the_end(tmp_path):
    train.main(["--epochs", "3", "--eval-every", "2", *FAST, "--output-dir", str(tmp_path)])
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["val_top1"] is not None for r in logs] == [False, True, True]
    assert logs[0]["label_mae_tl"] is None and logs[2]["label_mae_tl"] is not None
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["val_top1"] == max(logs[1]["val_top1"], logs[2]["val_top1"])



def test_recipes_set_repeats_and_workers_follow_the_cpus(monkeypatch):
    assert train.get_args(["--data", "imagenet"]).repeats == 3  # DeiT's repeated augmentation
    assert train.get_args(["--data", "imagenet", "--model", "swin_t"]).repeats == 1  # Swin uses none
    assert train.get_args(["--data", "fashion_mnist"]).repeats == 1
    assert train.get_args(["--data", "imagenet", "--model", "swin_t", "--repeats", "2"]).repeats == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert train.get_args([]).workers == 11  # 12 CPUs a GPU, one of them the training process's
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert train.get_args([]).workers == 5
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert train.get_args([]).workers == 1  # fewer CPUs than processes: still one loader process each
    assert train.get_args(["--workers", "3"]).workers == 3


def test_a_dev_shm_too_small_for_the_loaders_is_named_before_the_first_batch(monkeypatch):
    """Docker's default /dev/shm (64 MB) cannot hold 8 processes x 10 workers x 2 batches of 128 uint8 images
    (19.3 MB each): one line with the sizes and what to change, not a bus error in a worker."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    args = train.get_args(["--data", "imagenet", "--workers", "10", "--batch-size", "128"])
    with pytest.raises(train.UserError, match=r"^/dev/shm has 64 MB free, the loaders need ~2940 MB \(10 workers "
                                              r"x 2 batches of 18.4 MB per process\): run the container with "
                                              r"--ipc=host or --shm-size=6g, or lower --workers$"):
        train.check_shared_memory(args, 224, free=64 * 2**20)
    train.check_shared_memory(args, 224, free=3 * 2**30)  # enough
    args.workers = 0  # no workers, no shared memory
    train.check_shared_memory(args, 224, free=0)


def write_folders(root, train_counts):
    """An ImageFolder pair of tiny JPEGs: train/c<k>/ with train_counts[k] images, val/c<k>/ with one."""
    from PIL import Image
    for split, counts in (("train", train_counts), ("val", [1] * len(train_counts))):
        for k, count in enumerate(counts):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 36), (40 * k, 10 * i, 90)).save(root / split / f"c{k}" / f"{i}.JPEG")


def test_imagenet_subset_is_class_balanced_and_the_sampler_repeats(tmp_path):
    write_folders(tmp_path, [4, 6, 1, 5])
    argv = ["--data", "imagenet", "--data-path", str(tmp_path), "--batch-size", "2", "--workers", "0"]
    loader = train.build_data(train.get_args(argv + ["--subset", "9"]), 0, CPU)[0]
    counts = torch.bincount(torch.tensor(loader.loader.dataset.targets))
    assert counts[2] == 1 and sorted(counts[[0, 1, 3]].tolist()) == [2, 3, 3]  # class 2 gives all it has
    other = train.build_data(train.get_args(argv + ["--subset", "9", "--seed", "1"]), 0, CPU)[0]
    assert other.loader.dataset.samples != loader.loader.dataset.samples  # drawn with --seed (every rank alike)
    assert isinstance(loader.sampler, data.RepeatedAugSampler) and loader.sampler.repeats == 3
    assert len(loader.sampler) == 9
    with pytest.raises(train.UserError, match="--subset 3 is fewer than the 4 classes"):
        train.build_data(train.get_args(argv + ["--subset", "3"]), 0, CPU)


def test_imagenet_run_on_a_tiny_folder(tmp_path, capsys):
    write_folders(tmp_path / "data", [3, 3])
    code, out, err = run_main(capsys, "--data", "imagenet", "--data-path", str(tmp_path / "data"), "--model",
                              "vit_mini", "--img-size", "32", "--epochs", "1", "--batch-size", "2", "--workers", "1",
                              "--subset", "4", "--output-dir", str(tmp_path / "run"))
    assert code == 0, err
    assert "2 steps of 2 x 1" in out and "3 repeats" in out and "done: best val top-1" in out


def test_the_readme_commands_of_the_papers_table_run_each_rows_recipe():
    # DeiT's and Swin's baselines: their own Mixup/CutMix switch (timm's pixel-box CutMix), area target;
    # TL-Align rows: DeiT with CutMix alone (the official script), Swin with Swin's switch
    readme = open(os.path.join(HERE, "README.md")).read()
    rows = [line.split("|")[1:4] for line in readme.splitlines() if line.startswith("| DeiT-S ") or
            line.startswith("| Swin-T ")]
    assert len(rows) == 4
    base = ["--data", "imagenet", "--data-path", "/data/imagenet"]
    for name, paper, command in rows:
        args = train.get_args(base + command.strip(" `").split())
        family = args.model[:4]
        assert args.mix == "both" if family == "swin" or "baseline" in name else args.mix == "cutmix", name
        if "baseline" in name:
            assert (args.target, args.cutmix_mode) == ("area", "pixel"), name
        else:
            assert (args.target, args.cutmix_mode) == ("tl_align", "grid"), name
        assert args.repeats == (3 if family == "deit" else 1) and float(paper) > 79


def test_batches_for_a_gpu_come_from_pinned_memory(monkeypatch):
    # a copy to the GPU from unpinned memory makes the host wait for the stream; Tensor.pin_memory needs a GPU,
    # so it is replaced by a recorder here, and the loaders are built for a CUDA device they never reach
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.data_ptr()) or self)
    args = train.get_args(["--subset", "64", "--batch-size", "32"])
    for device, expected in ((torch.device("cuda"), True), (CPU, False)):
        train_loader, val_loader, _, _ = train.build_data(args, 0, device)
        pinned.clear()
        batches = [b for loader in (train_loader, val_loader) for b in loader]
        assert sorted(pinned) == sorted(t.data_ptr() for b in batches for t in b) if expected else not pinned


def test_the_log_measures_the_training_targets_against_the_objects(tmp_path):
    """On data with masks every epoch logs how far the trained targets were from the visible object shares."""
    logged = {}
    for name, flags in {"oracle": ["--target", "oracle"], "area": ["--target", "area"],
                        "tl_align": [], "none": ["--mix", "none"]}.items():
        train.main(["--epochs", "1", *FAST, "--output-dir", str(tmp_path / name), *flags])
        logged[name] = json.loads((tmp_path / name / "log.jsonl").read_text())
    assert logged["oracle"]["train_target_mae"] == 0 and logged["oracle"]["train_ghost_rate"] == 0
    assert 0.05 < logged["area"]["train_target_mae"] < 0.3 and 0 < logged["area"]["train_ghost_rate"] < 0.5
    # the same draws and images in every arm: an untrained model's aligned label is near lam, not exactly it
    assert logged["tl_align"]["train_target_mae"] != logged["area"]["train_target_mae"]
    assert logged["none"]["train_target_mae"] is None and logged["none"]["train_ghost_rate"] is None


@pytest.mark.parametrize("target", ["tl_align", "transmix"])
def test_mix_both_compiles_one_graph(monkeypatch, target):
    """--mix both (Swin's recipe): Mixup batches carry uniform token labels, so that the model has CutMix's
    call signature; dynamo traces one graph and never recompiles across lam, boxes and the mix switch."""
    from torch._dynamo.utils import counters
    args = train.get_args(["--mix", "both", "--target", target])
    drawn = []
    monkeypatch.setattr(train, "batch_mix", lambda mix, draw=train.batch_mix: drawn.append(draw(mix)) or drawn[-1])
    model = vit.create_model("vit_mini", num_classes=10, embed_dim=32, depth=2, num_heads=2)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")  # graphs are dynamo's whatever the backend
    torch.manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(8):
            x, y = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
            loss, _, _ = train.train_step(compiled, x, y, None, 4, args)
            loss.backward()
    assert set(drawn) == {"cutmix", "mixup"}
    assert counters["stats"]["unique_graphs"] == 1


def test_a_fused_run_names_its_attention_kernels():
    """On CUDA a --fused-attn run prints the kernel of each call once at its start; here, CPU's flash kernel."""
    info = data.DATASETS["synthetic"]
    model = vit.create_model("vit_mini", num_classes=10, embed_dim=32, depth=2, num_heads=2, fused_attn=True)
    line = train.kernels_line(model, info, torch.device("cpu"), nullcontext())
    assert line == "attention kernels: features + labels: float32, q/k width 18, v width 18 -> flash_attention"
    line = train.kernels_line(model, info, torch.device("cpu"), torch.autocast("cpu", dtype=torch.bfloat16))
    assert "labels: float32" in line and "features: bfloat16" in line and model.training


def test_the_resume_line_names_the_launcher_that_ran():
    argv = ["--epochs", "5", "--resume", "old.pt", "--overwrite"]
    assert train.resume_command(argv, "r/checkpoint.pt", {}) == \
        "python train.py --epochs 5 --resume r/checkpoint.pt"
    one_node = dict(WORLD_SIZE="4", LOCAL_WORLD_SIZE="4")
    assert train.resume_command(argv, "r/checkpoint.pt", one_node) == \
        "torchrun --nproc_per_node=4 train.py --epochs 5 --resume r/checkpoint.pt"
    two_nodes = dict(WORLD_SIZE="16", LOCAL_WORLD_SIZE="8")
    assert train.resume_command(argv, "r/checkpoint.pt", two_nodes).startswith(
        "torchrun --nproc_per_node=8 --nnodes=2 <this run's rendezvous flags> train.py --epochs 5 --resume")


def test_torchrun_facts_default_to_one_plain_python_process():
    assert [train.torchrun_fact(name, {}) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")] \
        == [0, 0, 1, 1]
    assert train.torchrun_fact("LOCAL_WORLD_SIZE", dict(WORLD_SIZE="4")) == 4  # one node unless told otherwise
    torchrun = dict(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4")
    assert [train.torchrun_fact(name, torchrun) for name in torchrun] == [5, 1, 8, 4]
