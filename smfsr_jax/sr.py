r"""Super-resolve images x4 with a model bundle (smfsr_jax/sampling/bundle.py, pipeline.py).

  python -m smfsr_jax.sr --checkpoint bundles/smfsr_q --input LR_DIR --output results/drealsr \
      [--seeds 1,2,3] [--steps 1] [--caption TEXT | --captions FILE_OR_DIR] [--color_fix adain|wavelet|none] \
      [--batch_size 4] [--tile_size 64 --tile_overlap 24 --tile_batch 16] [--debug]
  python -m smfsr_jax.sr --checkpoint bundles/smfsr_q --input photo.jpg --output photo_x4.png

Inputs: one image file, or every image file directly in a directory (.png .jpg .jpeg .bmp .tif .tiff .webp) in
Python sorted() order; image k of that order (skipped files keep their place) is sampled with
fold_in(PRNGKey(seed), k) (docs/design.md#noise-seeding): the noise does not depend on --batch_size or on other files (the
outputs then agree up to float rounding, a level at a few pixels, as XLA's kernels depend on the batch size).
Grayscale, palette, RGBA (alpha dropped), 16-bit and CMYK inputs are converted to 8-bit RGB; unreadable, truncated
or too small (< 16 px a side) files are skipped, counted and named at the end, never fatal.

Entries of an input folder that are directories (or links to them) or broken links are skipped and named too;
other files without an image extension (captions, notes) are ignored.

Outputs: OUTPUT/<input stem>.png, 8-bit RGB at 4x the input size; with several seeds, OUTPUT/seed<seed>/<stem>.png.
A second input with the same stem (a.png, a.jpg) is skipped and reported. For one input file and one seed, an
--output with an image extension (result.png, result.jpg, ...; not an existing folder) is the output file itself,
written in the format of its extension and replaced if it exists; it may not be the input. The output folders are
created and tried with a test file before the model loads; outputs are written under a .partial name and renamed.

Captions need text encoders in the bundle; without them the NULL embeddings are used (with one warning):
  --caption TEXT           the same caption for every image;
  --captions FILE.json     a JSON object {"<file name or stem>": "caption", ...};
  --captions DIR           DIR/<stem>.txt per image (the SMFSR repo's LLaVA caption folders).
Images without a caption use the NULL embeddings. Captions pass SMFSR's caption rule (drop sentences with
banned words, append the quality suffix) unless --raw_captions.

Exit status: 0; 1 when there were inputs but none could be written, or a write failed (the run stops there,
after the summary of what was written and skipped); 2 for bad arguments, an input, captions file or output that
cannot be used, or a checkpoint that is not a valid bundle. Errors are one line; --debug shows their tracebacks.
"""

import argparse
import contextlib
import json
import os
import sys

from PIL import Image
from tqdm import tqdm

from smfsr_jax.core.errors import RunFailure, UserError, as_user_error, run_cli
from smfsr_jax.core.files import check_writable
from smfsr_jax.core.images import is_image_name
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


def list_inputs(path: str) -> tuple[list[str], dict[str, str]]:
    """Input file paths in sorted file-name order (a single file is its own list), and {name: why} for a folder's
    entries that look like inputs but are not image files: directories, links to them and broken links. Other
    files (captions, notes) are left out silently."""
    if os.path.isdir(path):
        others = {}
        for name in sorted(os.listdir(path)):
            entry = os.path.join(path, name)
            if os.path.isdir(entry):
                others[name] = "a link to a directory" if os.path.islink(entry) else "a directory"
            elif not os.path.exists(entry):  # listed, so a link whose target is missing
                others[name] = "a broken link"
        return [os.path.join(path, name) for name in list_images(path)], others
    if os.path.isfile(path):
        return [path], {}
    raise UserError(f"--input {path}: no such file or directory")


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
    parser.add_argument("--output", required=True,
                        help="output folder, or an image file (.png, .jpg, ...) for a single input file and seed")
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
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad inputs and failed writes")
    return parser


def image_format(path: str) -> str | None:
    """PIL's format name for `path`'s extension (None when this Pillow cannot write it)."""
    return Image.registered_extensions().get(os.path.splitext(path)[1].lower())


def save_image(image, path: str) -> None:
    """Write `image` to `path` in the format of its extension, through a .partial name: an interrupted or failed
    write never leaves a truncated image under the final name."""
    partial = path + ".partial"
    try:
        Image.fromarray(image).save(partial, format=image_format(path))
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    # An --output with an image extension is the output file, unless it is an existing folder (kept as a folder).
    to_file = is_image_name(args.output) and not os.path.isdir(args.output)
    if to_file:
        if os.path.isdir(args.input):
            parser.error(f"--output {args.output} names one image file, but --input {args.input} is a folder "
                         "(one output per image): give an output folder")
        if len(args.seeds) > 1:
            parser.error(f"--output {args.output} names one image file, but --seeds gives {len(args.seeds)} seeds "
                         "(one output each): give an output folder")
        source = os.path.realpath(args.input)
        if os.path.realpath(args.output) == source:
            parser.error(f"--output: {args.output} is the input file {source} (real paths compared): the output "
                         "would replace the input; choose another --output")
        if image_format(args.output) is None:
            parser.error(f"--output {args.output}: this Pillow cannot write {os.path.splitext(args.output)[1]} files")
        folders = {args.seeds[0]: os.path.dirname(os.path.abspath(args.output))}
    else:
        several_seeds = len(args.seeds) > 1
        folders = {seed: os.path.join(args.output, f"seed{seed}") if several_seeds else args.output
                   for seed in args.seeds}
        source = input_folder(args.input)
        for folder in folders.values():
            if os.path.realpath(folder) == source:
                parser.error(f"--output: {folder} is the input folder {source} (real paths compared): the outputs "
                             "would replace the inputs; choose another --output")

    def output_path(seed: int, stem: str) -> str:
        return args.output if to_file else os.path.join(folders[seed], stem + ".png")

    return run_cli(lambda: super_resolve(args, list(folders.values()), output_path), args.debug)


def super_resolve(args, folders: list[str], output_path) -> int:
    """The run after the argument checks: inputs, captions and output folders are checked before the model loads."""
    with as_user_error():  # an unreadable input folder or captions file, bad captions JSON
        files, skipped = list_inputs(args.input)
        captions = load_captions(args.captions) if args.captions else {}
    for folder in folders:
        check_writable(folder)
    tiles = {k: v for k, v in (("tile_size", args.tile_size), ("tile_overlap", args.tile_overlap)) if v is not None}
    with as_user_error():  # not a bundle, bad tile settings
        pipeline = SRPipeline.from_checkpoint(args.checkpoint, dtype=args.dtype, batch_size=args.batch_size,
                                              tile_batch=args.tile_batch, caption_rule=not args.raw_captions, **tiles)

    uncaptioned, first_with_stem = [], {}
    written = 0
    progress = tqdm(total=len(files) * len(args.seeds), unit="image", desc="sr")

    def run(batch):
        nonlocal written
        for seed in args.seeds:
            outputs = pipeline([pixels for _, _, pixels, _ in batch], seed=seed, steps=args.steps,
                               caption=[caption for _, _, _, caption in batch], color_fix=args.color_fix,
                               indices=[index for index, _, _, _ in batch], guidance_scale=args.guidance_scale)
            for (_, stem, _, _), image in zip(batch, outputs):
                path = output_path(seed, stem)
                try:
                    save_image(image, path)
                except OSError as e:  # a full disk, a folder removed under the run: the later writes would fail too
                    raise RunFailure(f"writing {path}: {e.strerror or e}; the run stopped there "
                                     f"({written} images written before it are kept)") from e
                written += 1
            progress.update(len(batch))

    pending = {}  # preprocessed size -> [(index, stem, pixels, caption)], run when batch_size are collected
    try:
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
    finally:  # the summary so far also when a write fails or the run is interrupted
        progress.close()
        print(f"wrote {written} images to {args.output} ({len(files)} image files x {len(args.seeds)} seeds); "
              f"skipped {len(skipped)}", flush=True)  # before the error line on stderr, also through a pipe
        for name, reason in skipped.items():
            print(f"  skipped {name}: {reason}", file=sys.stderr)
        if uncaptioned:
            print(f"  {len(uncaptioned)} images had no caption in {args.captions} (NULL embeddings used): "
                  + ", ".join(uncaptioned[:20]) + (" ..." if len(uncaptioned) > 20 else ""), file=sys.stderr)
    return 1 if files and written == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
