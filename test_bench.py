"""bench.py runs end to end on tiny settings and reports every mode (no timing is asserted)."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_bench_reports_every_mode_for_both_attention_paths():
    cmd = [sys.executable, "bench.py", "--model", "vit_mini", "swin_mini", "--batch-size", "2", "--reps", "1",
           "--warmup", "0", "--num-classes", "10", "--no-memory"]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines()]
    modes = {(r[0], r[1], r[2]) for r in rows if len(r) >= 3}
    for attn in ("explicit", "fused"):
        for mode in ("plain", "tl_k2", "tl_kC", "transmix", "inference"):
            assert ("vit_mini", attn, mode) in modes
        assert ("swin_mini", attn, "transmix") not in modes  # TransMix needs a class token
    plain = [r for r in rows if r[:3] == ["vit_mini", "explicit", "plain"]][0]
    assert float(plain[6]) == 1.0 and float(plain[3]) > 0  # its own reference; a measured time
    assert p.stdout.splitlines()[-1].startswith("summary: vit_mini explicit: K=2 ")
