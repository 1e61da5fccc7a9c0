r"""A web app for x4 super-resolution with a model bundle or training workdir (Gradio, requirements-app.txt).

  python -m smfsr_jax.app [--checkpoint BUNDLE_OR_WORKDIR] [--host 127.0.0.1] [--port 7860] [--max_pixels N] \
      [--cache_dir DIR]

Without --checkpoint it serves the embedded default, the one-step GAN-refined student that `make demo` trains
(workdirs/demo/student_gan/bundle). A workdir serves its latest finished checkpoint (evaluation/runner.py
`load_model`). The page takes an image (upload, paste, or one of the held-back `bundled` photographs) and shows
bicubic x4 against the SR in a before/after slider, with a download of the full-resolution PNGs.

Controls: seed (or a random one, shown afterwards), number of seeds N (seeds seed … seed+N−1, shown as a gallery
with a per-pixel standard-deviation map across them: where the model is uncertain), sampling steps, colour fix,
caption (bundles with text encoders only) and latent tile size (the bundle's training size by default).

Requests queue one at a time (concurrency limit 1): the SR core compiles its functions once per settings value
(steps, colour fix, tile) and canvas (sampling/canvas.py: a short ladder of sizes that every input size falls on)
and reuses them across requests, so an upload of a new size compiles nothing when its canvas is in use. Compiled functions are also kept on disk (--cache_dir, default $SMFSR_JAX_CACHE or ~/.cache/smfsr_jax), so
a restarted server reads them instead of compiling. The first request at a new canvas or setting reports its
time as including compilation (or reading the compiled function); later ones the time per image.
Inputs above --max_pixels are refused before they are decoded; unreadable or truncated files get a message in the
page. `Upscaler` is the page's logic without the UI (tests/test_app.py).
"""

import argparse
import dataclasses
import io
import os
import random
import sys
import tempfile
import time

import cv2
import numpy as np
from PIL import Image

from smfsr_jax.core import cache, errors
from smfsr_jax.core import workdir as workdir_lib
from smfsr_jax.data import images as image_io
from smfsr_jax.data.tfds import bundled
from smfsr_jax.demo import STAGES, bicubic_x4
from smfsr_jax.evaluation.runner import load_model
from smfsr_jax.sampling import canvas, color
from smfsr_jax.sampling.model import SRModel
from smfsr_jax.sampling.pipeline import processed_size
from smfsr_jax.sampling.runner import SRInput, super_resolve
from smfsr_jax.sampling.settings import SRSettings, positional_grid

DEMO_BUNDLE = workdir_lib.bundle_dir(os.path.join("workdirs", "demo", STAGES[-1]))  # the Makefile's demo --workdir
MAX_PIXELS = 512 * 512  # default input cap: 2048² SR outputs (latent tiles; the VAE in 1024-pixel tiles)
MAX_SEEDS = 8
STEPS = (1, 2, 4)


@dataclasses.dataclass
class Result:
    """One request: the input's bicubic x4, the SR of each seed, their spread and the time they took."""
    bicubic: np.ndarray  # (4H, 4W, 3) uint8
    outputs: list[np.ndarray]  # per seed, (4H, 4W, 3) uint8
    seeds: list[int]
    std: np.ndarray | None  # (4H, 4W) float32 std across seeds in 8-bit levels (mean over RGB); None for one seed
    seconds_per_image: float | None  # without compilation; None when the only image compiled
    compile_seconds: float | None  # the first image of a new shape or setting, compilation included; else None
    compilation: str | None = None  # with compile_seconds: what compiled and what was read from the cache


class Upscaler:
    """Encoded image -> checked 8-bit RGB -> SR for several seeds, through the batch runner (sampling/runner.py).

    One SRModel holds the parameters on the devices for every request; a request's settings (steps, colour fix,
    tile size) select compiled functions, cached per settings (canvas.make_canvas_functions) and per canvas, so
    repeated requests reuse them.
    """

    def __init__(self, model: SRModel, max_pixels: int = MAX_PIXELS, **settings):
        """settings: SRSettings fields (process_size, tile_batch, ...) for every request."""
        self.model, self.max_pixels = model, max_pixels
        self.settings = SRSettings(**settings)
        self.default = self.request_settings()
        self._compiled = set()  # (settings, processed size) run before

    @classmethod
    def from_checkpoint(cls, path: str, max_pixels: int = MAX_PIXELS, **settings) -> "Upscaler":
        """A bundle directory or a training workdir (its latest finished checkpoint)."""
        return cls(SRModel(load_model(path)), max_pixels, **settings)

    def request_settings(self, steps: int | None = None, color_fix: str | None = None,
                         tile_size: int | None = None) -> SRSettings:
        """The resolved settings of a request; None keeps the server's (a tile's overlap follows the tile)."""
        changes = {name: value for name, value in (("steps", steps), ("color_fix", color_fix),
                                                   ("tile_size", tile_size)) if value is not None}
        return self.model.resolve(dataclasses.replace(self.settings, **changes))

    def tile_sizes(self) -> list[int]:
        """Latent tile sides offered: halves to doubles of the default that the positional grid allows."""
        patch, largest = self.model.transformer_config.patch_size, positional_grid(self.model.transformer_config)
        default = self.default.tile_size
        candidates = (default // 2, default * 3 // 4, default, default * 3 // 2, default * 2)
        return sorted({t for t in candidates if t % patch == 0 and patch <= t <= largest})

    def read(self, data: bytes, name: str) -> tuple[np.ndarray, str | None]:
        """(pixels (H, W, 3) uint8, conversion note or None) of an encoded image.

        Raises UserError for images above max_pixels (read from the header, before decoding) and BadImage for
        unreadable, truncated or too small ones.
        """
        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except Image.DecompressionBombError as e:
            raise errors.UserError(f"{name}: {e}") from None
        except (OSError, ValueError, SyntaxError, EOFError):
            width = height = 0  # load_rgb8 says what is wrong with it
        if width * height > self.max_pixels:
            raise errors.UserError(f"{name}: {width}x{height} = {width * height:,} pixels is above this server's "
                                   f"limit of {self.max_pixels:,} (--max_pixels); crop or downscale it")
        pixels, _, note = image_io.load_rgb8(data, name)
        return pixels, note

    def __call__(self, image: np.ndarray, seeds: list[int], steps: int | None = None, color_fix: str = "adain",
                 caption: str | None = None, tile_size: int | None = None, progress=None) -> Result:
        """SR of `image` for each seed (noise index 0, as SRPipeline(image, seed=s)); progress(done, total, text)."""
        settings = self.request_settings(steps, color_fix, tile_size)  # steps=None and its default compile once
        multiple = self.model.autoencoder_config.downscale
        height, width = processed_size(*image.shape[:2], settings, multiple)
        key = (settings, canvas.canvas_shape(height, width, settings, multiple))
        compiling = key not in self._compiled
        outputs, finished = [], []

        def report(done: int):
            if progress is not None:
                text = (f"compiling for {width}x{height} (first run on this canvas and setting), seed {seeds[0]}"
                        if compiling and done == 0 else f"seed {seeds[done]}")
                progress(done, len(seeds), text)

        def keep(_, seed, sr):
            outputs.append(sr)
            finished.append(time.perf_counter())
            if len(outputs) < len(seeds):
                report(len(outputs))

        report(0)
        counts = cache.compilation_counts()
        start = time.perf_counter()
        super_resolve(self.model, settings, [SRInput(0, image, caption)], seeds, keep)
        seconds = list(np.diff([start] + finished))  # per seed
        self._compiled.add(key)
        compile_seconds = seconds.pop(0) if compiling else None
        std = np.stack(outputs).astype(np.float32).std(axis=0).mean(axis=-1) if len(outputs) > 1 else None
        return Result(bicubic=bicubic_x4(image), outputs=outputs, seeds=list(seeds), std=std,
                      seconds_per_image=float(np.mean(seconds)) if seconds else None, compile_seconds=compile_seconds,
                      compilation=cache.describe_compilations(counts) if compiling else None)


def _inferno(levels: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def std_image(std: np.ndarray) -> np.ndarray:
    """(H, W) std -> (H + bar, W, 3) uint8: the inferno colour map from 0 to the maximum, over a colour bar
    labelled with that scale in 8-bit levels."""
    top = max(float(std.max()), 1.0)  # identical seeds map to black, not to amplified rounding noise
    height, width = std.shape
    mapped = _inferno(np.round(np.clip(std / top, 0.0, 1.0) * 255).astype(np.uint8))
    bar_height = max(12, width // 24)
    bar = _inferno(np.tile(np.linspace(0, 255, width).astype(np.uint8), (bar_height, 1)))
    scale = max(0.35, width / 900)
    line = int(30 * scale)
    labels = np.full((line + 8, width, 3), 255, np.uint8)
    right = f"{top:.1f} levels"
    (text_width, _), _ = cv2.getTextSize(right, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    for text, x in (("0", 2), (right, width - text_width - 2)):
        cv2.putText(labels, text, (x, line), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([mapped, bar, labels], axis=0)


def summary(image: np.ndarray, result: Result) -> str:
    """Sizes and timing, as the page shows them."""
    height, width = image.shape[:2]
    out_height, out_width = result.outputs[0].shape[:2]
    parts = [f"{width}×{height} → {out_width}×{out_height}",
             f"seed{'s' if len(result.seeds) > 1 else ''} {', '.join(str(s) for s in result.seeds)}"]
    if result.compile_seconds is not None:
        parts.append(f"first run on this canvas and setting: {result.compile_seconds:.2f} s including compilation "
                     f"({result.compilation}; later runs reuse it)")
    if result.seconds_per_image is not None:
        parts.append(f"{result.seconds_per_image:.3f} s per image")
    return " · ".join(parts)


def example_images() -> list[str]:
    """The `bundled` photographs held back from training (the demo's outputs), from scikit-image's data."""
    paths = [bundled.skimage_data_dir() / name for name in bundled.HOLDOUT]
    return [str(p) for p in paths if p.is_file()]


def build_app(upscaler: Upscaler):
    """The Gradio page around `upscaler`."""
    import gradio as gr

    model = upscaler.model
    downscale = model.autoencoder_config.downscale
    outputs_dir = tempfile.TemporaryDirectory(prefix="smfsr_app_")  # Gradio copies the PNGs into its own cache

    def run(path, seed, random_seed, num_seeds, steps, color_fix, caption, tile_size, progress=gr.Progress()):
        if path is None:
            raise gr.Error("Upload or paste an image first.")
        name = os.path.basename(path)
        try:
            with open(path, "rb") as f:
                image, note = upscaler.read(f.read(), name)
        except (image_io.BadImage, errors.UserError, OSError) as e:
            raise gr.Error(str(e)) from None
        if note:
            gr.Info(f"{name}: {note}")
        seed = random.randrange(2**31) if random_seed or seed is None else int(seed)  # shown back in the page
        seeds = [seed + i for i in range(int(num_seeds))]
        result = upscaler(image, seeds, steps=int(steps), color_fix=color_fix, caption=caption or None,
                          tile_size=int(tile_size),
                          progress=lambda done, total, text: progress((done, total), desc=text, unit="seeds"))
        stem = os.path.splitext(name)[0]
        files = []
        for s, output in zip(result.seeds, result.outputs):
            files.append(os.path.join(outputs_dir.name, f"{stem}_x4_seed{s}.png"))
            Image.fromarray(output).save(files[-1])
        several = len(seeds) > 1
        gallery = [(output, f"seed {s}") for s, output in zip(result.seeds, result.outputs)]
        std_label = (f"uncertainty: per-pixel std across {len(seeds)} seeds, 0 to {result.std.max():.1f} "
                     "8-bit levels" if several else "uncertainty")
        return (seed, (result.bicubic, result.outputs[0]), summary(image, result), files,
                gr.Gallery(value=gallery if several else None, visible=several),
                gr.Image(value=std_image(result.std) if several else None, label=std_label, visible=several))

    with gr.Blocks(title="SMFSR x4", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## SMFSR x4 super-resolution\nModel: `{model.path}` ({model.kind}). "
                    f"Inputs up to {upscaler.max_pixels:,} pixels.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="input (upload or paste)", type="filepath", image_mode=None,
                                 sources=["upload", "clipboard"], elem_id="input")
                examples = example_images()
                if examples:
                    gr.Examples(examples=examples, inputs=image, label="held-back photographs")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    random_seed = gr.Checkbox(False, label="random seed")
                num_seeds = gr.Slider(1, MAX_SEEDS, value=1, step=1, label="number of seeds", elem_id="num_seeds")
                steps = gr.Radio(list(STEPS), value=STEPS[0], label="sampling steps")
                color_fix = gr.Radio(list(color.METHODS), value=color.METHODS[0], label="colour fix")
                caption = gr.Textbox("", label="caption", visible=model.text_encoders_dir is not None)
                tile_size = gr.Dropdown([(f"{t} latent ({t * downscale} px)", t) for t in upscaler.tile_sizes()],
                                        value=upscaler.default.tile_size, label="tile size (for large inputs)")
                button = gr.Button("Super-resolve x4", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                slider = gr.ImageSlider(label="bicubic x4 | SR", format="png", elem_id="slider")
                info = gr.Markdown(elem_id="info")
                files = gr.File(label="full-resolution PNG", file_count="multiple", elem_id="files")
                gallery = gr.Gallery(label="seeds", format="png", columns=4, height=300, visible=False,
                                     elem_id="gallery")
                std_map = gr.Image(label="uncertainty", format="png", height=300, visible=False, elem_id="std")
        # Every control has a default, so the API takes an image alone: Client(url).predict(handle_file(path),
        # api_name="/super_resolve").
        button.click(run, inputs=[image, seed, random_seed, num_seeds, steps, color_fix, caption, tile_size],
                     outputs=[seed, slider, info, files, gallery, std_map], api_name="super_resolve")
    return app


def launch(upscaler: Upscaler, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page; one request at a time (the queue), so a shape never compiles twice at once."""
    import gradio as gr

    app = build_app(upscaler)
    app.queue(default_concurrency_limit=1)
    # System fonts: the page makes no requests outside this server.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, ssr_mode=False,
               theme=theme)
    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m smfsr_jax.app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help=f"model bundle or training workdir (default: {DEMO_BUNDLE}, from `make demo`)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="largest input (width x height)")
    parser.add_argument("--cache_dir", default=None,
                        help="compiled functions (default $SMFSR_JAX_CACHE, else ~/.cache/smfsr_jax)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for a bad checkpoint")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    def serve():
        if args.checkpoint is None and not os.path.isdir(DEMO_BUNDLE):
            raise errors.UserError(f"no model at {DEMO_BUNDLE}: run `make demo` from the repository root to train "
                                   "the embedded default, or pass --checkpoint BUNDLE_OR_WORKDIR")
        cache.enable_compilation_cache(args.cache_dir)
        with errors.as_user_error("--checkpoint"):  # not a bundle or workdir, no finished checkpoint
            upscaler = Upscaler.from_checkpoint(args.checkpoint or DEMO_BUNDLE, max_pixels=args.max_pixels)
        launch(upscaler, args.host, args.port)

    return errors.run_cli(serve, args.debug)


if __name__ == "__main__":
    sys.exit(main())
