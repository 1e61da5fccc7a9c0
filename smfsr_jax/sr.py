r"""Super-resolve images x4 with a model bundle (smfsr_jax/weights/bundle.py, smfsr_jax/sampling/runner.py).

  python -m smfsr_jax.sr --checkpoint bundles/smfsr_q --input LR_DIR --output results/drealsr \
      [--seeds 1,2,3] [--steps 1] [--caption TEXT | --captions FILE_OR_DIR] [--color_fix adain|wavelet|none] \
      [--batch_size 4] [--tile_size 64 --tile_overlap 24 --tile_batch 4] [--debug]
  python -m smfsr_jax.sr --checkpoint bundles/smfsr_q --input photo.jpg --output photo_x4.png
  python -m smfsr_jax.sr --model zw121/SMFSR/smfsr_q --base stabilityai/stable-diffusion-3.5-medium \
      --input LR_DIR --output results/drealsr [--null_embeddings DIR] [--cache_dir DIR] [--lr_key_bug true|false]

--checkpoint is a bundle or a training workdir's bundle; --model is a released transformer (smfsr_q, smfsr_f,
Teacher, dit4sr_q, dit4sr_f, dit4sr_r1) and --base Stable Diffusion 3.5 Medium, each a directory or a Hugging Face
Hub id, converted once into the cache (--cache_dir, default $SMFSR_JAX_CACHE or ~/.cache/smfsr_jax) and loaded from
it afterwards (smfsr_jax/weights/pretrained.py).

Compiled functions are kept in the same cache (CACHE/jax_compilation, JAX's persistent compilation cache, unless
JAX_COMPILATION_CACHE_DIR names another), so a later run at the same sizes and settings reads them instead of
compiling; the summary says how many functions were compiled and how many were read.

Inputs: one image file, or every image file directly in a directory (.png .jpg .jpeg .bmp .tif .tiff .webp) in
Python sorted() order; image k of that order (skipped files keep their place) is sampled with
fold_in(PRNGKey(seed), k) (docs/design.md#noise-seeding): the noise does not depend on --batch_size or on other files (the
outputs then agree up to float rounding, a level at a few pixels, as XLA's kernels depend on the batch size).
Grayscale, palette, RGBA (alpha dropped), 16-bit and CMYK inputs are converted to 8-bit RGB; unreadable, truncated
or too small (< 16 px a side) files are skipped, counted and named at the end, never fatal.

Entries of an input folder that are directories (or links to them) or broken links are skipped and named too;
other files without an image extension (captions, notes) are ignored.

Devices and processes: a batch holds --batch_size images of one preprocessed size per device and is split over
every local device (sampling/runner.py), so --batch_size 1 keeps all devices busy once a size has that many
images. Several processes (hosts), each with its devices: start each with --num_processes N --process_id I
--coordinator_address HOST:PORT (process 0's; or --distributed where jax.distributed detects the cluster).
Process p takes the files k with k % N == p of the sorted list (the noise index stays k, so the union of the
processes' outputs is a one-process run's), writes them to the same --output and prints the summary of its own
share (folder entries that are not images are named by process 0); its exit status is about its share.

Outputs: OUTPUT/<input stem>.png, 8-bit RGB at 4x the input size; with several seeds, OUTPUT/seed<seed>/<stem>.png.
A second input with the same stem (a.png, a.jpg) is skipped and reported. For one input file and one seed, an
--output with an image extension (result.png, result.jpg, ...; not an existing folder) is the output file itself,
written in the format of its extension and replaced if it exists; it may not be the input. The output folders are
created and tried with a test file before the model loads; outputs are written under a .partial name and renamed
(in a bucket, uploaded whole).
--skip_existing skips the images whose outputs exist for every seed, so rerunning an interrupted command
finishes the folder (an output exists only once complete).

Captions need text encoders in the bundle (with --model: in --base); without them a caption is an error:
  --caption TEXT           the same caption for every image;
  --captions FILE.json     a JSON object {"<file name or stem>": "caption", ...};
  --captions DIR           DIR/<stem>.txt per image (the SMFSR repo's LLaVA caption folders).
Images without a caption use the NULL embeddings. Captions pass SMFSR's caption rule (drop sentences with
banned words, append the quality suffix) unless --raw_captions.

--input, --output, --captions and --checkpoint may be bucket URLs (gs://bucket/path), in any mix with local paths.

Exit status: 0; 1 when there were inputs but none could be written, or a write failed (the run stops there,
after the summary of what was written and skipped); 2 for bad arguments, an input, captions file or output that
cannot be used, or a checkpoint that is not a valid bundle. Errors are one line; --debug shows their tracebacks.
"""

import argparse
import io
import json
import os
import sys

import jax
from tqdm import tqdm

from smfsr_jax.core import cache, distributed, files
from smfsr_jax.core.errors import RunFailure, UserError, as_user_error, run_cli, show_log
from smfsr_jax.core.images import is_image_name
from smfsr_jax.data.images import image_format, load_rgb8, save_image
from smfsr_jax.evaluation.io import list_images
from smfsr_jax.sampling import color, tiling
from smfsr_jax.sampling.model import SRModel
from smfsr_jax.sampling.runner import SRInput, super_resolve
from smfsr_jax.sampling.settings import SRSettings


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
    entries that look like inputs but are not image files: directories, links to them and broken links (in a
    bucket: folders). Other files (captions, notes) are left out silently."""
    if files.is_dir(path):
        if files.is_remote(path):
            others = {name: "a directory" for name in files.entries(path)[1]}
        else:
            others = {}
            for name in sorted(os.listdir(path)):
                entry = os.path.join(path, name)
                if os.path.isdir(entry):
                    others[name] = "a link to a directory" if os.path.islink(entry) else "a directory"
                elif not os.path.exists(entry):  # listed, so a link whose target is missing
                    others[name] = "a broken link"
        return [os.path.join(path, name) for name in list_images(path)], others
    if files.is_file(path):
        return [path], {}
    raise UserError(f"--input {path}: no such file or directory")


def real_path(path: str) -> str:
    """One name per place, to compare inputs with outputs: a local path with its symlinks resolved, a bucket URL
    without a trailing slash."""
    path = files.absolute(path)
    return path.rstrip("/") if files.is_remote(path) else os.path.realpath(path)


def input_folder(path: str) -> str:
    """The real path (real_path) of the folder the inputs are read from (a single file's folder)."""
    return real_path(path if files.is_dir(path) else os.path.dirname(files.absolute(path)))


def _read_utf8(path: str) -> str:
    """A text file's content, its line ends read as \\n (as open() in text mode reads them)."""
    return io.TextIOWrapper(io.BytesIO(files.read_bytes(path)), encoding="utf-8").read()


def load_captions(path: str) -> dict[str, str]:
    """{file name or stem: caption} from a JSON object file or a folder of <stem>.txt files."""
    if files.is_dir(path):
        captions = {}
        for name in files.listdir(path):
            stem, ext = os.path.splitext(name)
            if ext.lower() == ".txt":
                captions[stem] = _read_utf8(os.path.join(path, name)).strip()
        return captions
    try:
        captions = json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"--captions {path}: not valid JSON ({e})") from None
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise ValueError(f"--captions {path}: expected a JSON object {{file name or stem: caption string}}")
    return captions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m smfsr_jax.sr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="model bundle directory (bundle.json)")
    model.add_argument("--model", help="released transformer: a directory or a Hub id (zw121/SMFSR/smfsr_q); "
                                       "needs --base")
    parser.add_argument("--base", help="with --model: the Stable Diffusion 3.5 Medium directory or Hub id")
    parser.add_argument("--null_embeddings", help="with --model: directory of DiT4SR's NULL_*.pt (default: found "
                                                  "beside --model, else encode(\"\") with --base's text encoders)")
    parser.add_argument("--cache_dir", help="released weights' conversions (with --model) and compiled functions "
                                            "(default $SMFSR_JAX_CACHE, else ~/.cache/smfsr_jax)")
    parser.add_argument("--lr_key_bug", choices=("true", "false"), default=None,
                        help="with --model: double-normalised LR keys (default: false for dit4sr_r1, else true)")
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
    parser.add_argument("--batch_size", type=int, default=1,
                        help="images per device and batch (same preprocessed size); a batch spans every local device")
    parser.add_argument("--tile_size", type=int, default=None,
                        help=f"latent tile side (default: the bundle's training size, else {tiling.TILE_SIZE})")
    parser.add_argument("--tile_overlap", type=int, default=None, help="latent tile overlap (default: 3/8 of the tile)")
    parser.add_argument("--tile_batch", type=int, default=None,
                        help="latent tiles per network call (default: as many as the device's memory budget holds)")
    parser.add_argument("--vae_tile", type=int, default=None,
                        help="VAE tile side in image pixels for larger images, 0 disables "
                             "(default: the largest whose untiled pass fits the device's memory budget)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="teacher bundles: CFG scale (default 8)")
    parser.add_argument("--skip_existing", action="store_true",
                        help="skip images whose outputs (every seed) exist: resumes an interrupted folder")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="transformer compute dtype (default: the bundle's)")
    distributed.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad inputs and failed writes")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    released = {"--base": args.base, "--null_embeddings": args.null_embeddings, "--lr_key_bug": args.lr_key_bug}
    if args.model is None and any(v is not None for v in released.values()):
        parser.error(f"{', '.join(k for k, v in released.items() if v is not None)} apply to --model only")
    if args.model is not None and args.base is None:
        parser.error("--model needs --base (the Stable Diffusion 3.5 Medium directory or Hub id)")
    # An --output with an image extension is the output file, unless it is an existing folder (kept as a folder).
    to_file = is_image_name(args.output) and not files.is_dir(args.output)
    if to_file:
        if files.is_dir(args.input):
            parser.error(f"--output {args.output} names one image file, but --input {args.input} is a folder "
                         "(one output per image): give an output folder")
        if len(args.seeds) > 1:
            parser.error(f"--output {args.output} names one image file, but --seeds gives {len(args.seeds)} seeds "
                         "(one output each): give an output folder")
        source = real_path(args.input)
        if real_path(args.output) == source:
            parser.error(f"--output: {args.output} is the input file {source} (real paths compared): the output "
                         "would replace the input; choose another --output")
        if image_format(args.output) is None:
            parser.error(f"--output {args.output}: this Pillow cannot write {os.path.splitext(args.output)[1]} files")
        folders = {args.seeds[0]: os.path.dirname(files.absolute(args.output))}
    else:
        several_seeds = len(args.seeds) > 1
        folders = {seed: os.path.join(args.output, f"seed{seed}") if several_seeds else args.output
                   for seed in args.seeds}
        source = input_folder(args.input)
        for folder in folders.values():
            if real_path(folder) == source:
                parser.error(f"--output: {folder} is the input folder {source} (real paths compared): the outputs "
                             "would replace the inputs; choose another --output")

    def output_path(seed: int, stem: str) -> str:
        return args.output if to_file else os.path.join(folders[seed], stem + ".png")

    return run_cli(lambda: run(args, list(folders.values()), output_path), args.debug)


def run(args, folders: list[str], output_path) -> int:
    """The run after the argument checks: inputs, captions and output folders are checked before the model loads."""
    distributed.initialize(args.distributed, args.coordinator_address, args.num_processes, args.process_id)
    show_log()  # conversion, cache use and copies staged from buckets
    compilation_cache = cache.enable_compilation_cache(args.cache_dir)
    with as_user_error():  # an unreadable input folder or captions file, bad captions JSON
        input_files, skipped = list_inputs(args.input)
        captions = load_captions(args.captions) if args.captions else {}
    for folder in folders:
        files.check_writable(folder)
    tiles = {k: v for k, v in (("tile_size", args.tile_size), ("tile_overlap", args.tile_overlap),
                               ("vae_tile", args.vae_tile)) if v is not None}
    settings = SRSettings(steps=args.steps, guidance_scale=args.guidance_scale, color_fix=args.color_fix,
                          batch_size=args.batch_size, tile_batch=args.tile_batch, caption_rule=not args.raw_captions,
                          **tiles)
    with as_user_error():  # not a bundle, bad tile settings, CFG for a student
        if args.model is None:
            model = SRModel.from_checkpoint(args.checkpoint, dtype=args.dtype)
        else:
            model = SRModel.from_pretrained(
                args.model, args.base, null_embeddings=args.null_embeddings, cache_dir=args.cache_dir,
                lr_key_bug=None if args.lr_key_bug is None else args.lr_key_bug == "true", dtype=args.dtype)
        settings = model.resolve(settings)
    if (args.caption is not None or args.captions) and model.text_encoders_dir is None:
        raise UserError(f"{'--caption' if args.caption is not None else '--captions'} needs text encoders, and "
                        + (f"--base {args.base} has none (text_encoder{{,_2,_3}}/ + tokenizer{{,_2,_3}}/)"
                           if args.model else f"the bundle {args.checkpoint} has none"))

    # An output name belongs to the first file with its stem in sorted order, decided from the names alone so that
    # every process agrees; process p of n takes the files k with k % n == p.
    first_with_stem = {}
    for path in input_files:
        first_with_stem.setdefault(os.path.splitext(os.path.basename(path))[0], os.path.basename(path))
    mine = distributed.share(list(enumerate(input_files)))
    if jax.process_index() > 0:
        skipped = {}  # the folder's entries that are not image files: named once, by process 0
    uncaptioned = []
    written = existing = 0
    progress = tqdm(total=len(mine) * len(args.seeds), unit="image", desc="sr")

    def write(item: SRInput, seed: int, image):
        nonlocal written
        path = output_path(seed, item.tag)
        try:
            save_image(image, path)
        except OSError as e:  # a full disk, a folder removed under the run: the later writes would fail too
            raise RunFailure(f"writing {path}: {e.strerror or e}; the run stopped there "
                             f"({written} images written before it are kept)") from e
        written += 1
        progress.update(1)

    def inputs():
        nonlocal existing
        for index, path in mine:
            name = os.path.basename(path)
            stem = os.path.splitext(name)[0]
            if (args.skip_existing and first_with_stem[stem] == name
                    and all(files.is_file(output_path(seed, stem)) for seed in args.seeds)):
                existing += 1  # finished by an earlier run: an output appears only when complete (save_image)
                progress.update(len(args.seeds))
                continue
            try:
                if first_with_stem[stem] != name:
                    raise ValueError(f"{path}: same output name {stem}.png as {first_with_stem[stem]}")
                pixels, _, _ = load_rgb8(files.read_bytes(path), path)
            except (ValueError, OSError) as e:  # BadImage is a ValueError
                skipped[name] = str(e)
                progress.update(len(args.seeds))
                continue
            caption = args.caption if args.caption is not None else captions.get(name, captions.get(stem))
            if args.captions and caption is None:
                uncaptioned.append(name)
            yield SRInput(index, pixels, caption, tag=stem)

    try:
        super_resolve(model, settings, inputs(), args.seeds, write)
    finally:  # the summary so far also when a write fails or the run is interrupted
        progress.close()
        counted = f"{len(input_files)} image files"
        if jax.process_count() > 1:
            counted = f"process {jax.process_index()} of {jax.process_count()}: {len(mine)} of the {counted}"
        done = f"; {existing} image files already done (--skip_existing)" if existing else ""
        print(f"wrote {written} images to {args.output} ({counted} x {len(args.seeds)} seeds){done}; "
              f"skipped {len(skipped)}", flush=True)  # before the error line on stderr, also through a pipe
        print(f"  {cache.describe_compilations()}"
              + (f" ({compilation_cache})" if compilation_cache else " (none kept: a bucket cache folder)"), flush=True)
        for name, reason in skipped.items():
            print(f"  skipped {name}: {reason}", file=sys.stderr)
        if uncaptioned:
            print(f"  {len(uncaptioned)} images had no caption in {args.captions} (NULL embeddings used): "
                  + ", ".join(uncaptioned[:20]) + (" ..." if len(uncaptioned) > 20 else ""), file=sys.stderr)
    return 1 if mine and written == 0 and existing < len(mine) else 0


if __name__ == "__main__":
    sys.exit(main())
