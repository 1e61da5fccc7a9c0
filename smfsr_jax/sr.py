r"""Super-resolve images x4 with a model bundle (smfsr_jax/sampling/bundle.py, pipeline.py).

  python -m smfsr_jax.sr --checkpoint bundles/smfsr_q --input LR_DIR --output results/drealsr \
      [--seeds 1,2,3] [--steps 1] [--caption TEXT | --captions FILE_OR_DIR] [--color_fix adain|wavelet|none] \
      [--batch_size 4] [--tile_size 64 --tile_overlap 24 --tile_batch 16]

Inputs: one image file, or every image file directly in a directory (.png .jpg .jpeg .bmp .tif .tiff .webp) in
Python sorted() order; image k of that order (skipped files keep their place) is sampled with
fold_in(PRNGKey(seed), k) (docs/design.md#noise-seeding): the noise does not depend on --batch_size or on other files (the
outputs then agree up to float rounding, a level at a few pixels, as XLA's kernels depend on the batch size).
Grayscale, palette, RGBA (alpha dropped), 16-bit and CMYK inputs are converted to 8-bit RGB; unreadable, truncated
or too small (< 16 px a side) files are skipped, counted and named at the end, never fatal.

Outputs: OUTPUT/<input stem>.png, 8-bit RGB at 4x the input size; with several seeds, OUTPUT/seed<seed>/<stem>.png.
A second input with the same stem (a.png, a.jpg) is skipped and reported.

Captions need text encoders in the bundle; without them the NULL embeddings are used (with one warning):
  --caption TEXT           the same caption for every image;
  --captions FILE.json     a JSON object {"<file name or stem>": "caption", ...};
  --captions DIR           DIR/<stem>.txt per image (the SMFSR repo's LLaVA caption folders).
Images without a caption use the NULL embeddings. Captions pass SMFSR's caption rule (drop sentences with
banned words, append the quality suffix) unless --raw_captions.

Exit status: 0, or 1 when there were inputs but none could be written.
"""

import argparse
import json
import os
import sys

from PIL import Image
from tqdm import tqdm

from smfsr_jax.data.images import load_rgb8
from smfsr_jax.evaluation.io import list_images
from smfsr_jax.sampling import color, tiling
from smfsr_jax.sampling.pipeline import SRPipeline


def parse_seeds(text: str) -> list[int]:
    """'1', '1,2,5', '1..20' or a mix ('1..5,9') -> the distinct seeds in the given order."""
    seeds = []
    for part in (p.strip() for p in text.split(",")):
        try:
            if ".." in part:
                first, last = (int(s) for s in part.split(".."))
                if last < first:
                    raise ValueError
                seeds.extend(range(first, last + 1))
            elif part:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"--seeds: expected integers and ranges such as 1..20, got {part!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name distinct integers, got {text!r}")
    return seeds


def _seeds_arg(text: str) -> list[int]:
    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def list_inputs(path: str) -> list[str]:
    """Input file paths in sorted file-name order (a single file is its own list)."""
    if os.path.isdir(path):
        return [os.path.join(path, name) for name in list_images(path)]
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f"--input {path}: no such file or directory")


def input_folder(path: str) -> str:
    """The real path of the folder the inputs are read from (a single file's folder), symlinks resolved."""
    return os.path.realpath(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))


def load_captions(path: str) -> dict[str, str]:
    """{file name or stem: caption} from a JSON object file or a folder of <stem>.txt files."""
    if os.path.isdir(path):
        captions = {}
        for name in sorted(os.listdir(path)):
            stem, ext = os.path.splitext(name)
            if ext.lower() == ".txt":
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    captions[stem] = f.read().strip()
        return captions
    with open(path, encoding="utf-8") as f:
        try:
            captions = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--captions {path}: not valid JSON ({e})") from None
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise ValueError(f"--captions {path}: expected a JSON object {{file name or stem: caption string}}")
    return captions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m smfsr_jax.sr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model bundle directory (bundle.json)")
    parser.add_argument("--input", required=True, help="an image file or a directory of images")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--seeds", type=_seeds_arg, default=[0],
                        help="seeds: 1, 1,2,5 or ranges such as 1..20 (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 1 student, 40 teacher)")
    captions = parser.add_mutually_exclusive_group()
    captions.add_argument("--caption", default=None, help="one caption for every image")
    captions.add_argument("--captions", default=None, help="JSON {name: caption} file or folder of <stem>.txt")
    parser.add_argument("--raw_captions", action="store_true", help="skip SMFSR's caption rule")
    parser.add_argument("--color_fix", choices=color.METHODS, default="adain")
    parser.add_argument("--batch_size", type=int, default=1, help="images per batch (same preprocessed size)")
    parser.add_argument("--tile_size", type=int, default=None,
                        help=f"latent tile side (default: the bundle's training size, else {tiling.TILE_SIZE})")
    parser.add_argument("--tile_overlap", type=int, default=None, help="latent tile overlap (default: 3/8 of the tile)")
    parser.add_argument("--tile_batch", type=int, default=tiling.TILE_BATCH, help="tiles per network call")
    parser.add_argument("--guidance_scale", type=float, default=None, help="teacher bundles: CFG scale (default 8)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="transformer compute dtype (default: the bundle's)")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    several_seeds = len(args.seeds) > 1
    folders = {seed: os.path.join(args.output, f"seed{seed}") if several_seeds else args.output for seed in args.seeds}
    source = input_folder(args.input)
    for folder in folders.values():
        if os.path.realpath(folder) == source:
            parser.error(f"--output: {folder} is the input folder {source} (real paths compared): the outputs "
                         "would replace the inputs; choose another --output")
    try:
        files = list_inputs(args.input)
        captions = load_captions(args.captions) if args.captions else {}
        tiles = {k: v for k, v in (("tile_size", args.tile_size), ("tile_overlap", args.tile_overlap)) if v is not None}
        pipeline = SRPipeline.from_checkpoint(args.checkpoint, dtype=args.dtype, batch_size=args.batch_size,
                                              tile_batch=args.tile_batch, caption_rule=not args.raw_captions, **tiles)
    except (OSError, ValueError) as e:  # missing files, bad captions file, not a bundle, bad tile settings
        parser.error(str(e))
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)

    skipped, uncaptioned, first_with_stem = {}, [], {}
    written = 0
    progress = tqdm(total=len(files) * len(args.seeds), unit="image", desc="sr")

    def run(batch):
        nonlocal written
        for seed in args.seeds:
            outputs = pipeline([pixels for _, _, pixels, _ in batch], seed=seed, steps=args.steps,
                               caption=[caption for _, _, _, caption in batch], color_fix=args.color_fix,
                               indices=[index for index, _, _, _ in batch], guidance_scale=args.guidance_scale)
            for (_, stem, _, _), image in zip(batch, outputs):
                path = os.path.join(folders[seed], stem + ".png")
                Image.fromarray(image).save(path + ".partial", format="PNG")
                os.replace(path + ".partial", path)  # an interrupted run never leaves a truncated PNG
                written += 1
            progress.update(len(batch))

    pending = {}  # preprocessed size -> [(index, stem, pixels, caption)], run when batch_size are collected
    for index, path in enumerate(files):
        name = os.path.basename(path)
        stem = os.path.splitext(name)[0]
        try:
            if stem in first_with_stem:
                raise ValueError(f"{path}: same output name {stem}.png as {first_with_stem[stem]}")
            with open(path, "rb") as f:
                pixels, _, _ = load_rgb8(f.read(), path)
        except (ValueError, OSError) as e:  # BadImage is a ValueError
            skipped[name] = str(e)
            progress.update(len(args.seeds))
            continue
        first_with_stem[stem] = name
        caption = args.caption if args.caption is not None else captions.get(name, captions.get(stem))
        if args.captions and caption is None:
            uncaptioned.append(name)
        size = pipeline.processed_size(*pixels.shape[:2])
        pending.setdefault(size, []).append((index, stem, pixels, caption))
        if len(pending[size]) == args.batch_size:
            run(pending.pop(size))
    for bucket in pending.values():
        run(bucket)
    progress.close()

    print(f"wrote {written} images to {args.output} ({len(files) - len(skipped)} inputs x {len(args.seeds)} seeds); "
          f"skipped {len(skipped)}")
    for name, reason in skipped.items():
        print(f"  skipped {name}: {reason}", file=sys.stderr)
    if uncaptioned:
        print(f"  {len(uncaptioned)} images had no caption in {args.captions} (NULL embeddings used): "
              + ", ".join(uncaptioned[:20]) + (" ..." if len(uncaptioned) > 20 else ""), file=sys.stderr)
    return 1 if files and written == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
