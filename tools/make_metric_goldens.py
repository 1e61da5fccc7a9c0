"""Golden numbers for tests/test_lpips.py and tests/test_metrics_fr.py from the real `lpips` package and pyiqa.

Run once, in an environment with torch, torchvision, lpips and pyiqa (not the project venv: pyiqa needs
torchvision), from the repository root:

    /tmp/iqa-venv/bin/python tools/make_metric_goldens.py --out tests/golden/lpips_psnr_ssim.json

No weights are downloaded: the trunks and lin heads are seeded random arrays made by `random_state_dict`
(numpy only), which the tests call again to rebuild the same networks without torch. The random trunk is put
in a private torch hub cache under the torchvision file name, so lpips and pyiqa load it through their
ordinary torchvision path.
"""

import argparse
import importlib.metadata
import json
import os
import re
import tempfile
import zlib

import numpy as np

LPIPS_SEED = 1
LPIPS_IMAGE_SIZE = (32, 48)
PSNR_SSIM_SEED = 3
PSNR_SSIM_IMAGE_SIZE = (40, 56)
TORCHVISION_TRUNK_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
PYIQA_LPIPS_NAMES = {"alex": "lpips", "vgg": "lpips-vgg"}


def random_state_dict(shapes: dict, seed: int) -> dict:
    """{key: float32 array}: He-normal conv weights, small normal biases, lin heads uniform in [0, 1).

    Each key has its own generator seeded by (seed, crc32(key)), so the result does not depend on key order.
    """
    out = {}
    for key, shape in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        if key.startswith("lin"):
            value = rng.uniform(0.0, 1.0, shape)
        elif key.endswith(".bias"):
            value = rng.normal(0.0, 0.05, shape)
        else:
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        out[key] = value.astype(np.float32)
    return out


def random_image_pairs(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(sr, hr) uint8 batches of 3 NHWC pairs: unrelated, mildly perturbed, identical."""
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (3, height, width, 3)).astype(np.uint8)
    unrelated = rng.integers(0, 256, (height, width, 3))
    perturbed = np.clip(hr[1].astype(np.int64) + rng.normal(0, 12, (height, width, 3)).round().astype(np.int64),
                        0, 255)
    sr = np.stack([unrelated, perturbed, hr[2]]).astype(np.uint8)
    return sr, hr


def _nchw_unit(images: np.ndarray):
    import torch
    return torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).permute(0, 3, 1, 2).contiguous()


def _lpips_goldens(net: str, hub_dir: str) -> dict:
    import lpips
    import pyiqa
    import torch
    import torchvision

    trunk_model = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    full_state = trunk_model.state_dict()
    trunk_shapes = {k: tuple(v.shape) for k, v in full_state.items() if k.startswith("features.")}
    reference = lpips.LPIPS(pretrained=False, pnet_rand=True, net=net, verbose=False)
    # Only lin<i>.*: the state dict also lists the same heads as lins.<i>.* (an nn.ModuleList over them).
    lin_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items() if re.fullmatch(r"lin\d+\..*", k)}
    trunk = random_state_dict(trunk_shapes, LPIPS_SEED)
    lin = random_state_dict(lin_shapes, LPIPS_SEED)
    full_state.update({k: torch.from_numpy(v) for k, v in trunk.items()})
    torch.save(full_state, os.path.join(hub_dir, "checkpoints", TORCHVISION_TRUNK_FILES[net]))
    lin_path = os.path.join(hub_dir, f"lin_{net}.pth")
    torch.save({k: torch.from_numpy(v) for k, v in lin.items()}, lin_path)

    sr, hr = random_image_pairs(LPIPS_SEED, *LPIPS_IMAGE_SIZE)
    sr_t, hr_t = _nchw_unit(sr), _nchw_unit(hr)
    package = lpips.LPIPS(pretrained=True, net=net, model_path=lin_path, verbose=False).eval()
    metric = pyiqa.create_metric(PYIQA_LPIPS_NAMES[net], device="cpu", pretrained_model_path=lin_path)
    with torch.no_grad():
        package_scores = package(sr_t, hr_t, normalize=True).flatten()
        pyiqa_scores = metric(sr_t, hr_t).flatten()
    return {"seed": LPIPS_SEED, "image_size": list(LPIPS_IMAGE_SIZE),
            "lpips_package": package_scores.double().tolist(), "pyiqa": pyiqa_scores.double().tolist()}


def _psnr_ssim_goldens() -> dict:
    import pyiqa
    import torch

    sr, hr = random_image_pairs(PSNR_SSIM_SEED, *PSNR_SSIM_IMAGE_SIZE)
    options = dict(test_y_channel=True, color_space="ycbcr", device="cpu")
    psnr = pyiqa.create_metric("psnr", **options)
    ssim = pyiqa.create_metric("ssim", **options)
    with torch.no_grad():
        psnr_scores = psnr(_nchw_unit(sr), _nchw_unit(hr)).flatten()
        ssim_scores = ssim(_nchw_unit(sr), _nchw_unit(hr)).flatten()
    return {"seed": PSNR_SSIM_SEED, "image_size": list(PSNR_SSIM_IMAGE_SIZE),
            "psnr": psnr_scores.double().tolist(), "ssim": ssim_scores.double().tolist()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as hub_dir:
        os.makedirs(os.path.join(hub_dir, "checkpoints"))
        torch.hub.set_dir(hub_dir)
        goldens = {
            "lpips": {net: _lpips_goldens(net, hub_dir) for net in ("alex", "vgg")},
            "psnr_ssim": _psnr_ssim_goldens(),
            "versions": {name: importlib.metadata.version(name)
                         for name in ("torch", "torchvision", "lpips", "pyiqa")},
        }
    with open(args.out, "w") as f:
        json.dump(goldens, f, indent=2)
        f.write("\n")
    print(json.dumps(goldens, indent=2))


if __name__ == "__main__":
    main()
