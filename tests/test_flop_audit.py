"""The FLOP audit on the tiny networks: the analytic per-layer count of every SR case and training step agrees with
XLA's count of the compiled function (nothing computed twice), and the roofline line carries every accelerator."""

import json
import os
import subprocess
import sys

from benchmarks import flop_audit, harness
from smfsr_jax.models import mmdit, vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_case_is_within_five_percent_of_xla():
    result = subprocess.run([sys.executable, "benchmarks/flop_audit.py", "--tiny"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    cases = {line["case"]: line for line in lines[:-1]}
    assert set(cases) == {f"{c}_tiny" for c in ("sr_b1", "sr_b16", "sr_tiled", "teacher_fm", "student_isc",
                                                  "student_gan", "student_reward")}
    for name, line in cases.items():
        assert set(line["roofline_ms"]) == set(harness.ACCELERATORS)
        for branch in line["branches"].values():
            if branch["ratio"] is not None:  # sr_tiled's loops are not counted by XLA
                # Elementwise work (norms, activations, softmax) is XLA's alone: a few % above 1 at tiny sizes.
                assert 1.0 <= branch["ratio"] <= 1 + flop_audit.EXCESS_LIMIT, (name, branch)
    assert set(cases["student_isc_tiny"]["branches"]) == {"boundary", "split"}
    assert lines[-1]["within_limit"]


def test_the_sd35m_forward_count_by_hand():
    # SD3.5-M at 512² (64² latents: 1024 image + 1024 LR tokens, 154 text tokens): the two largest terms
    # written out. Block MLPs: 24 blocks x 2 products x 2 FLOPs x 2048 tokens x 1536 x 6144.
    cfg = mmdit.MMDiTConfig.smfsr_student()
    layers = flop_audit.mmdit_layers(cfg, 1, (64, 64), 154)
    mlp = sum(f for name, _, f, _ in layers if name.endswith(("/ff/fc1", "/ff/fc2")))
    assert mlp == 24 * 2 * 2 * 2048 * 1536 * 6144
    # Joint attention of 154 + 2048 tokens in 24 blocks (+ 13 image-only ones of 2048): 4 x T² x width each.
    scores = sum(f for name, kind, f, _ in layers if kind == "attention")
    assert scores == 24 * 4 * 2202 ** 2 * 1536 + 13 * 4 * 2048 ** 2 * 1536
    # The SD3 VAE decoder's output conv: 128 -> 3 channels over 512², padding taps left out as XLA counts them.
    decode = flop_audit.vae_layers(vae.VAEConfig.sd3(), 1, 512, "decode")
    assert decode[-1] == ("decoder/conv_out", "conv", 2.0 * (3 * 512 - 2) ** 2 * 128 * 3, "decoder/conv_out")
