"""bench.py runs end to end on tiny settings and reports every mode (no timing is asserted); bench.main in
the test process, as `python bench.py` runs it."""
import json
import os
from contextlib import nullcontext

import torch

import bench
import tl_align as tl
from test_train import run_main


def run_bench(capsys, *argv):
    return run_main(capsys, *argv, main=bench.main)


def test_bench_reports_every_mode_for_both_attention_paths(capsys):
    cmd = ["--model", "vit_mini", "swin_mini", "--batch-size", "2", "--reps", "1",
           "--warmup", "0", "--num-classes", "10", "--no-memory"]
    code, out, err = run_bench(capsys, *cmd)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    modes = {(r[0], r[1], r[2]) for r in rows if len(r) >= 3}
    for attn in ("explicit", "fused"):
        for mode in ("plain", "tl_k2", "tl_kC", "transmix", "inference"):
            assert ("vit_mini", attn, mode) in modes
        assert ("swin_mini", attn, "transmix") not in modes  # TransMix needs a class token
    plain = [r for r in rows if r[:3] == ["vit_mini", "explicit", "plain"]][0]
    assert float(plain[5]) == 1.0 and float(plain[3]) > 0  # its own reference; a measured time
    assert out.splitlines()[-1].startswith("summary: vit_mini explicit: K=2 ")


def test_median_interval_is_the_sign_test_one():
    # n = 25: the 95% interval of the median is the 8th to the 18th value (binomial tables)
    assert bench.median_with_ci(list(range(25, 0, -1))) == (13, 8, 18)
    assert bench.median_with_ci([1.0, 3.0]) == (2.0, 1.0, 3.0)  # few values: the range


def test_setting_probe_times_a_tl_align_step(capsys):
    """The process behind --settings (without compile, which would take a minute): first and median step."""
    cmd = ["--probe-setting", "vit_mini", "--amp", "bf16", "--batch-size", "4",
           "--reps", "2", "--num-classes", "10"]
    code, out, err = run_bench(capsys, *cmd)
    assert code == 0, err
    times = json.loads(out.strip().splitlines()[-1])
    assert times.keys() == {"first", "step"} and times["first"] > 0 and times["step"] > 0


def test_bench_times_a_timm_model_with_and_without_tracking(capsys):
    # timm's own tiny test_vit (160 px, 6 blocks of width 64)
    cmd = ["--timm", "test_vit", "--fused", "on", "--batch-size", "2",
           "--reps", "1", "--warmup", "0", "--no-memory"]
    code, out, err = run_bench(capsys, *cmd)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert [r[2] for r in rows if r[:2] == ["test_vit", "fused"]] == ["plain", "track", "inference"]
    track = [r for r in rows if r[2] == "track"][0]
    plain = [r for r in rows if r[2] == "plain"][0]
    assert float(track[3]) > 0 and track[10] == plain[10]  # a measured time; autograd saves nothing more (MB)
    assert out.splitlines()[-1].startswith("summary: test_vit fused: track ")


def test_loader_bench_times_the_imagenet_pipeline_on_written_jpegs(tmp_path, capsys):
    folder = str(tmp_path / "jpegs")
    code, out, err = run_bench(capsys, "--make-jpegs", folder, "--images", "8")
    assert code == 0, err
    kb, width, height = (float(out.split()[i]) for i in (-2, -6, -4))  # "... mean W x H px, S KB"
    assert 20 < kb < 400 and 250 <= min(width, height) and max(width, height) <= 500
    assert len(os.listdir(tmp_path / "jpegs" / "train")) == 4 and len(os.listdir(tmp_path / "jpegs" / "val")) == 4
    cmd = ["--loader", folder, "--workers", "1", "2", "--batch-size", "4", "--warmup", "1",
           "--reps", "2"]
    code, out, err = run_bench(capsys, *cmd)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["1", "2"]
    for workers, rate, per_worker, per_cpu_second, mb in rows:
        assert float(rate) > 0 and abs(float(per_worker) * int(workers) - float(rate)) < 0.2
        assert float(per_cpu_second) > 0
        assert abs(float(mb) - 4 * 3 * 224 * 224 / 2**20) < 0.01  # uint8 images; classes and boxes are bytes
    code, out, err = run_bench(capsys, "--loader", str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("error: ImageNet not found") and out == ""


def test_gpu_check_dry_run_prints_every_figure(capsys):
    """--gpu-check on the CPU, tiny models in bf16, vit_mini's fused path compiled: every configuration's figures,
    the kernel of each kind of fused call, and each SDPA backend's status for a masked and an unmasked model."""
    cmd = ["--gpu-check", "--device", "cpu", "--model", "vit_mini", "swin_mini",
           "--batch-size", "2", "--steps", "2", "--amp", "bf16", "--num-classes", "10"]
    code, out, err = run_bench(capsys, *cmd)
    assert code == 0, err
    head, kernels, backends, total = out.strip().split("\n\n")
    head = head.splitlines()
    assert head[0].startswith("gpu-check: cpu, ") and "torch 2." in head[0] and "amp bf16" in head[1]
    assert head[2].split() == ["model", "attn", "compile", "first", "s", "img/s", "peak", "MB", "syncs/step",
                               "kernels", "label", "diff", "grad", "diff"]
    rows = [line.split() for line in head[3:]]
    assert [r[:3] for r in rows] == [["vit_mini", "explicit", "no"], ["vit_mini", "fused", "no"],
                                     ["vit_mini", "fused", "yes"], ["swin_mini", "explicit", "no"],
                                     ["swin_mini", "fused", "no"]]
    for model, attn, compiled, first, img_s, peak, syncs, kernel, label_diff, grad_diff in rows:
        assert float(first) > 0 and float(img_s) > 0 and peak == "n/a" and float(syncs) == 0
        if attn == "explicit":
            assert kernel == "-" and label_diff == grad_diff == "ref"
        else:  # bf16: labels within float32 rounding of the explicit path, gradients within bf16's
            assert "flash" in kernel.split(",") and float(label_diff) < 1e-4 and float(grad_diff) < 0.1
    calls = [line.split(": ")[0].split() for line in kernels.splitlines()[1:]]
    assert sorted(calls) == [["swin_mini", "features"], ["swin_mini", "labels"], ["vit_mini", "features"],
                             ["vit_mini", "labels"]]
    assert all(line.split()[-1] in ("flash_attention", "math") for line in kernels.splitlines()[1:])
    table = [line.split() for line in backends.splitlines()[1:] if not line.startswith("  ")]
    assert table == [["backend", "vit_mini", "(no", "mask)", "swin_mini", "(mask)"], ["flash", "ok", "n/a"],
                     ["efficient", "n/a", "n/a"], ["cudnn", "n/a", "n/a"], ["math", "ok", "ok"]]
    reasons = [line.split(":")[0].strip() for line in backends.splitlines() if line.startswith("  n/a")]
    assert reasons == ["n/a flash (swin_mini)", "n/a efficient (vit_mini, swin_mini)",
                       "n/a cudnn (vit_mini, swin_mini)"]
    assert total.startswith("total ") and total.endswith(" s")


def test_host_reads_in_a_step_are_counted(monkeypatch):
    """On a CPU, each read of a tensor's value in a training step counts as a wait, CutMix's host draws do not."""
    model, _ = bench.build("vit_mini", False, torch.device("cpu"), 10)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)  # the unfused one reads every step count
    step = bench.make_step(model, optimizer, "tl_k2", 2, torch.device("cpu"), nullcontext(), 10)
    assert bench.timed_steps(step, 2, torch.device("cpu"))[1] == 0
    loss = tl.soft_cross_entropy

    def reading_loss(logits, target):
        value = loss(logits, target)
        value.item()
        return value
    monkeypatch.setattr(tl, "soft_cross_entropy", reading_loss)
    assert bench.timed_steps(step, 2, torch.device("cpu"))[1] == 2


def test_gpu_check_reports_a_failing_configuration_and_runs_on(monkeypatch, capsys):
    check_config = bench.check_config

    def failing_when_fused(args, name, fused, *rest):
        if fused:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
        return check_config(args, name, fused, *rest)
    monkeypatch.setattr(bench, "check_config", failing_when_fused)
    code, out, _ = run_bench(capsys, "--gpu-check", "--device", "cpu", "--model", "vit_mini", "--steps", "1",
                             "--compiled", "none", "--amp", "bf16", "--num-classes", "10")
    assert code == "error: 1 of 2 configurations failed (their rows above)"
    out = out.splitlines()
    assert out[3].split()[:3] == ["vit_mini", "explicit", "no"] and out[3].split()[-1] == "ref"
    assert out[4] == "vit_mini  fused    no      error: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert out[-1].startswith("total ")
