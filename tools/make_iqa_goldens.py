"""Golden numbers for the MUSIQ, MANIQA and CLIPIQA parity tests, computed by pyiqa itself.

Run in a throwaway environment with torch, torchvision, timm, openai-clip and pyiqa (not the project
venv; nothing is downloaded, every network gets random weights):

    python tools/make_iqa_goldens.py [musiq] [maniqa] [clipiqa]

For each metric and preset ("tiny" for the default tests, "full" = the published architecture) the
weights are drawn with numpy by `random_state_dict` from the pyiqa state dict's key names and shapes;
the tests draw the same arrays from our converters' expected shapes. Images come from `golden_images`.
pyiqa's own metric (create_metric, preprocessing included) scores them; the scores, a few intermediate
activations and the preprocessing facts go to tests/golden/iqa_<metric>.npz (tens of KB).

Only numpy is imported at module level: the tests import the generators (`random_state_dict`,
`golden_images`, `resize_input`, `clip_archive_tensors`; `save_torchscript_archive` imports torch itself).
"""

import os
import sys
import zlib

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "golden")
IMAGE_SIZES = ((224, 224), (256, 192))  # (H, W): square, portrait with odd patch padding
SEED = 20240901

# Reduced pyiqa options per metric: same code paths, a fraction of the compute.
MUSIQ_TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2)
MANIQA_TINY = dict(embed_dim=32, dim_mlp=32, test_sample=2,
                   vit=dict(embed_dim=32, depth=10, num_heads=2, mlp_ratio=2.0, num_classes=10))
CLIP_RN50 = dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=512,
                 transformer_heads=8, transformer_layers=12)
CLIP_TINY = dict(CLIP_RN50, embed_dim=32, vision_layers=(1, 1, 1, 1), vision_width=8, transformer_width=64,
                 transformer_heads=1, transformer_layers=2)


def random_tensor(key: str, shape: tuple, seed: int = SEED) -> np.ndarray:
    """A float32 tensor for one state-dict entry, drawn from (seed, crc32(key)) so that key order does not
    matter. Scales keep activations O(1): fan-in scaled weights, norm scales near 1, positive variances."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    name = key.rsplit(".", 1)[-1]
    shape = tuple(shape)
    if name == "running_var":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name == "logit_scale":
        return np.full(shape, np.log(100.0), np.float32)
    if name.endswith("weight") and len(shape) == 1:  # LayerNorm / GroupNorm / BatchNorm scales
        return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("weight") or name == "text_projection":  # conv, linear, embedding tables
        fan_in = int(np.prod(shape[1:])) if name != "text_projection" else shape[0]
        # MANIQA's channel attention (784-wide dot products of ~O(10) features) saturates its softmax with
        # unit-gain random weights, which then amplifies fp32 rounding chaotically: keep its logits O(1).
        gain = 0.2 if (".c_q." in key or ".c_k." in key) else 1.0
        return (gain * rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    if name.endswith("bias") or name == "running_mean":
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.5 * rng.standard_normal(shape)).astype(np.float32)  # embeddings, tokens, bias tables


def random_state_dict(shapes: dict, seed: int = SEED) -> dict:
    return {key: random_tensor(key, shape, seed) for key, shape in shapes.items()}


def golden_images(sizes=IMAGE_SIZES, seed: int = SEED) -> list:
    """Deterministic uint8 RGB images (H, W, 3): blocky colour fields plus noise, so features vary."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:
        blocks = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3))
        base = np.kron(blocks, np.ones((16, 16, 1)))[:h, :w]
        images.append(np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8))
    return images


def save_torchscript_archive(tensors: dict, path: str):
    """A TorchScript archive whose state_dict() is `tensors` (floats as parameters, integers as buffers),
    like OpenAI's RN50.pt as far as CLIP's loader and our reader are concerned. Needs torch."""
    import torch
    root = torch.nn.Module()
    for key, value in tensors.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        tensor = torch.from_numpy(np.array(value))
        if tensor.is_floating_point():
            module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(leaf, tensor)
    torch.jit.script(root).save(path)


def clip_archive_tensors(shapes: dict, config: dict, seed: int = SEED) -> dict:
    """Random CLIP weights (fp32; CLIP's loader rounds the conv/linear ones to fp16) plus the integer
    entries of a real archive: num_batches_tracked and input_resolution / context_length / vocab_size."""
    tensors = {k: (np.zeros((), np.int64) if k.endswith("num_batches_tracked") else random_tensor(k, shape, seed))
               for k, shape in shapes.items()}
    tensors.update(input_resolution=np.int64(config["image_resolution"]),
                   context_length=np.int64(config["context_length"]), vocab_size=np.int64(config["vocab_size"]))
    return tensors


def resize_input(seed: int = SEED) -> np.ndarray:
    """(1, 3, 40, 30) float32 NCHW values in [-1, 1] for the bicubic resize check."""
    return np.random.default_rng(seed).uniform(-1, 1, (1, 3, 40, 30)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Everything below runs in the pyiqa environment only.


def _to_torch(image):
    import torch
    return torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]


def _load_random(net, seed=SEED, keep=()):
    """Load random weights into a pyiqa network; buffers matching `keep` keep pyiqa's own values."""
    import torch
    own = net.state_dict()
    weights = {}
    for key, value in own.items():
        if any(k in key for k in keep):
            weights[key] = value
        else:
            weights[key] = torch.from_numpy(random_tensor(key, value.shape, seed)).to(value.dtype)
    net.load_state_dict(weights, strict=True)


def _capture(module, store, name, fn=lambda out: out):
    return module.register_forward_hook(lambda m, i, out: store.__setitem__(name, fn(out).detach().numpy().copy()))


def _score_hooked(metric, image, handles) -> float:
    """pyiqa's score of one uint8 image; the forward hooks `handles` (which fill their store) are removed."""
    import torch
    with torch.no_grad():
        score = float(metric(_to_torch(image)))
    for handle in handles:
        handle.remove()
    return score


def musiq_goldens() -> dict:
    import torch
    import torch.nn.functional as F
    import pyiqa
    from pyiqa.data.multiscale_trans_util import get_hashed_spatial_pos_emb_index, get_multiscale_patches

    out = {}
    # Preprocessing facts: hashed positions per patch count, torch bicubic down- and up-sampling.
    for count in range(1, 65):
        out[f"hash/{count}"] = get_hashed_spatial_pos_emb_index(10, 1, count).numpy().astype(np.int32)[0]
    x = torch.from_numpy(resize_input())
    for h, w in ((13, 10), (57, 43), (40, 30)):
        y = F.interpolate(x, (h, w), mode="bicubic", align_corners=False)
        out[f"resize/{h}x{w}"] = y.numpy()[0, :, :16, :16].transpose(1, 2, 0)  # top-left corner (H, W, C)

    images = golden_images()
    for preset, opts in (("tiny", MUSIQ_TINY), ("full", {})):
        metric = pyiqa.create_metric("musiq", device="cpu", pretrained=False, **opts)
        net = metric.net
        _load_random(net)
        out[f"{preset}/keys"] = _key_table(net)
        scores, cls = [], []
        for i, image in enumerate(images):
            store = {}
            handles = [_capture(net.transformer_encoder, store, "encoded"),
                       _capture(net.embedding, store, "embedding")]
            scores.append(_score_hooked(metric, image, handles))
            cls.append(store["encoded"][0, 0])
            out[f"{preset}/embedding/{i}"] = store["embedding"][0, :4, :64]
            if preset == "full":
                tokens = get_multiscale_patches((_to_torch(image) - 0.5) * 2, **net.data_preprocess_opts)[0].numpy()
                out[f"tokens/{i}/spatial"] = tokens[:, -3].astype(np.int32)
                out[f"tokens/{i}/scale"] = tokens[:, -2].astype(np.int32)
                out[f"tokens/{i}/mask"] = tokens[:, -1].astype(np.int32)
                out[f"tokens/{i}/patch_sums"] = tokens[:, :-3].astype(np.float64).sum(axis=1)
        out[f"{preset}/scores"] = np.array(scores)
        out[f"{preset}/cls"] = np.stack(cls)
        print(f"musiq {preset}: {scores}")
    return out


def _key_table(net) -> np.ndarray:
    return np.array([f"{k}:{tuple(v.shape)}" for k, v in net.state_dict().items()])


def maniqa_goldens() -> dict:
    import timm
    import pyiqa

    create_model = timm.create_model
    out = {}
    images = golden_images()
    for preset, opts in (("tiny", MANIQA_TINY), ("full", {})):
        opts = dict(opts)
        vit_opts = opts.pop("vit", {})
        # pyiqa builds timm's vit_base_patch8_224 with pretrained=True: build it random (and reduced).
        timm.create_model = lambda name, pretrained=False, **kw: create_model(name, pretrained=False,
                                                                              **{**kw, **vit_opts})
        try:
            metric = pyiqa.create_metric("maniqa-pipal", device="cpu", pretrained=False, **opts)
        finally:
            timm.create_model = create_model
        net = metric.net
        _load_random(net, keep=("relative_position_index", "attn_mask"))
        out[f"{preset}/keys"] = _key_table(net)
        scores = []
        for i, image in enumerate(images):
            store = {}
            handles = [
                net.vit.register_forward_pre_hook(
                    lambda m, args: store.__setitem__("crops", args[0][:, :, ::37, ::37].numpy().copy())),
                _capture(net.vit.blocks[6], store, "block6", lambda o: o[:3, :5, :8]),
                _capture(net.tablock1[0], store, "tab", lambda o: o[:3, :5, :8]),
                _capture(net.swintransformer1, store, "swin1", lambda o: o[:3, :5, 0, :8]),
                _capture(net.swintransformer2, store, "swin2", lambda o: o[:3, :5, 0, :8]),
            ]
            scores.append(_score_hooked(metric, image, handles))
            out.update({f"{preset}/{name}/{i}": value for name, value in store.items()})
        out[f"{preset}/scores"] = np.array(scores)
        print(f"maniqa {preset}: {scores}")
    return out


def clipiqa_goldens() -> dict:
    import tempfile
    import torch
    import pyiqa
    from pyiqa.archs.clip_model import CLIP

    out = {}
    images = golden_images()
    for preset, config in (("tiny", CLIP_TINY), ("full", CLIP_RN50)):
        shapes = {k: tuple(v.shape) for k, v in CLIP(**config).state_dict().items()}
        out[f"{preset}/keys"] = np.array([f"{k}:{shape}" for k, shape in shapes.items()])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "RN50.pt")
            save_torchscript_archive(clip_archive_tensors(shapes, config), path)
            # pyiqa's CLIPIQA loads `backbone` like OpenAI's RN50.pt: torch.jit.load, then build_model.
            metric = pyiqa.create_metric("clipiqa", device="cpu", backbone=path)
        net = metric.net
        clip_model = net.clip_model[0]
        out["prompt_tokens"] = net.prompt_pairs.numpy().astype(np.int32)
        with torch.no_grad():
            out[f"{preset}/text_features"] = clip_model.encode_text(net.prompt_pairs)[:, :32].numpy()
        scores = []
        for i, image in enumerate(images):
            store = {}
            handles = [_capture(clip_model.visual, store, "image_features", lambda o: o[:, :32]),
                       _capture(clip_model.visual.layer1, store, "layer1", lambda o: o[0, :8, :4, :4])]
            scores.append(_score_hooked(metric, image, handles))
            out.update({f"{preset}/{name}/{i}": value for name, value in store.items()})
        out[f"{preset}/scores"] = np.array(scores)
        print(f"clipiqa {preset}: {scores}")
    return out


METRICS = {"musiq": musiq_goldens, "maniqa": maniqa_goldens, "clipiqa": clipiqa_goldens}


def main(names):
    import torch
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for name in names or METRICS:
        goldens = METRICS[name]()
        path = os.path.join(GOLDEN_DIR, f"iqa_{name}.npz")
        np.savez_compressed(path, **goldens)
        print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path) / 1024:.1f} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
