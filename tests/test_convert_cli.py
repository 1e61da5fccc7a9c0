"""`python -m smfsr_jax.convert`: a bad checkpoint is one `error:` message and exit status 2, not a traceback."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from smfsr_jax.convert.__main__ import main
from smfsr_jax.convert.tensors import CheckpointError, write_safetensors
from smfsr_jax.convert.vae import DIFFUSERS_WEIGHTS, checkpoint_shapes
from smfsr_jax.models.vae import VAEConfig
from tests.conftest import REPO


def _error(capsys, argv) -> str:
    """stderr of main(argv), which must return status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_not_a_checkpoint(tmp_path, capsys):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"this is not a checkpoint")
    dst = tmp_path / "out"
    expected = (f"error: {src}: truncated safetensors header (header says {int.from_bytes(b'this is ', 'little')} "
                "bytes, file has 16)\n")  # its first 8 bytes read as the header length
    assert _error(capsys, ["transformer", f"--src={src}", f"--dst={dst}"]) == expected
    assert not dst.exists()
    with pytest.raises(CheckpointError, match="truncated safetensors header"):  # --debug: the exception itself
        main(["transformer", f"--src={src}", f"--dst={dst}", "--debug"])

    # As a command: the same line and status.
    done = subprocess.run([sys.executable, "-m", "smfsr_jax.convert", "transformer", f"--src={src}", f"--dst={dst}"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2 and done.stderr == expected


def test_missing_and_misshaped_keys(tmp_path, capsys):
    config = VAEConfig.tiny()
    shapes = checkpoint_shapes(config)
    tensors = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    # A single file whose config cannot be read from its tensors: a key it needs is missing.
    write_safetensors(tmp_path / "vae.safetensors", {k: v for k, v in tensors.items() if k != "encoder.conv_in.weight"})
    assert _error(capsys, ["vae", f"--src={tmp_path / 'vae.safetensors'}", f"--dst={tmp_path / 'out'}"]) == (
        f"error: {tmp_path / 'vae.safetensors'}: cannot infer the VAE config: tensor 'encoder.conv_in.weight' is "
        "missing\n")

    # A diffusers directory (config.json beside the weights): every missing and mis-shaped key is listed.
    src = tmp_path / "vae"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
        "latent_channels": config.latent_channels, "norm_num_groups": config.norm_num_groups,
        "use_quant_conv": False, "use_post_quant_conv": False}))
    del tensors["decoder.conv_out.bias"]
    tensors["encoder.conv_in.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    write_safetensors(src / DIFFUSERS_WEIGHTS, tensors)
    err = _error(capsys, ["vae", f"--src={src}", f"--dst={tmp_path / 'out'}"])
    assert err.startswith(f"error: {src / DIFFUSERS_WEIGHTS}: checkpoint does not match the network")
    assert "missing key(s):\n    decoder.conv_out.bias" in err
    assert f"encoder.conv_in.weight: expected {shapes['encoder.conv_in.weight']}, found (1, 1, 1, 1)" in err
    assert not (tmp_path / "out").exists()


def test_command_line_errors_stay_argparse_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["vae", f"--src={tmp_path}", f"--dst={tmp_path / 'out'}", "--net=alex"])
    assert info.value.code == 2 and "--net applies to lpips only" in capsys.readouterr().err
