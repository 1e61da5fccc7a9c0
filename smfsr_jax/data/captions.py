"""Cached SD3 caption embeddings: every caption and the NULL prompt encoded once, stored beside the dataset.

    python -m smfsr_jax.data.captions --dataset lsdir --split train --data_dir DIR \\
        --text_encoders /path/to/stable-diffusion-3.5-medium --t5_max_length 77

`--text_encoders` is an SD3.5 diffusers root or a folder written by `smfsr_jax.convert.text.convert`.
Training then never runs CLIP or T5: the pipeline reads these arrays, and the jitted step holds no text encoder.

Layout, inside the prepared dataset's folder (e.g. DIR/lsdir/1.0.0/):
    caption_embeddings/t5_<n>/<split>/
        prompt_embeds.npy         (U, 77 + n, D)  one row per distinct caption; row 0 is the NULL prompt
        pooled_prompt_embeds.npy  (U, P)
        caption_index.npy         (N,) int32      record i -> row; a record without caption -> row 0
        info.json                 dataset, split, records, captions, t5_max_length, dtype, null source
The NULL prompt is encode("") (the same SD3 assembly as a caption); `--null_embeddings DIR` stores DiT4SR's published
NULL tensors in row 0 instead. `--postprocess_captions` applies SMFSR's test-time caption rule first
(for benchmark sets). Rows are float16 by default (checked to be finite), float32 on request.
"""

import argparse
import json
import os
import pathlib

import numpy as np
from absl import logging

_NAMES = ("prompt_embeds.npy", "pooled_prompt_embeds.npy", "caption_index.npy", "info.json")


def embeddings_dir(dataset: str, split: str, data_dir: str, t5_max_length: int = 77) -> pathlib.Path:
    """Where the embeddings of `dataset` ("name" or "name/config") / `split` live."""
    import tensorflow_datasets as tfds

    import smfsr_jax.data.tfds  # noqa: F401 (registers the builders)

    builder = tfds.builder(dataset, data_dir=data_dir)
    return pathlib.Path(builder.data_dir) / "caption_embeddings" / f"t5_{t5_max_length}" / split


class CaptionEmbeddings:
    """Read side: memory-mapped rows, opened lazily (picklable into grain worker processes)."""

    def __init__(self, directory: str | os.PathLike, build_command: str = "python -m smfsr_jax.data.captions"):
        self.directory = pathlib.Path(directory)
        missing = [name for name in _NAMES if not (self.directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"no caption embeddings in {self.directory} (missing {', '.join(missing)}); "
                                    f"build them with: {build_command} (or train without captions: "
                                    "--config.data.captions=False)")
        self.info = json.loads((self.directory / "info.json").read_text())
        self.caption_index = np.load(self.directory / "caption_index.npy")
        self._rows = None

    @classmethod
    def for_dataset(cls, dataset: str, split: str, data_dir: str, t5_max_length: int = 77) -> "CaptionEmbeddings":
        command = (f"python -m smfsr_jax.data.captions --dataset {dataset} --split {split} --data_dir {data_dir} "
                   f"--text_encoders <SD3.5 root or converted text encoders> --t5_max_length {t5_max_length}")
        return cls(embeddings_dir(dataset, split, data_dir, t5_max_length), command)

    def __getstate__(self):
        return {**self.__dict__, "_rows": None}

    def _open(self):
        if self._rows is None:
            self._rows = tuple(np.load(self.directory / name, mmap_mode="r") for name in _NAMES[:2])
        return self._rows

    def __len__(self) -> int:
        return len(self.caption_index)

    def row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        prompt_embeds, pooled = self._open()
        return prompt_embeds[row].astype(np.float32), pooled[row].astype(np.float32)

    def record(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds (77 + n, D), pooled (P,)) float32 of record `index`."""
        return self.row(int(self.caption_index[index]))

    @property
    def null(self) -> tuple[np.ndarray, np.ndarray]:
        return self.row(0)

    def pooled_rows(self, limit: int) -> np.ndarray:
        """(min(limit, U), P) float32: the pooled embeddings of the first distinct captions (row 0 is NULL)."""
        return np.asarray(self._open()[1][:limit], np.float32)


def encode_captions(captions: list[str], encoders, directory: str | os.PathLike, *, t5_max_length: int = 77,
                    batch_size: int = 16, dtype=np.float16, null_embeddings=None, info: dict | None = None):
    """Encode the distinct `captions` (record order) and the NULL prompt into `directory` (module layout).

    `null_embeddings`: optional (prompt_embeds, pooled) stored as row 0 instead of encode("").
    """
    from smfsr_jax.models import text

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    distinct = list(dict.fromkeys(c for c in captions if c))
    rows = {caption: row for row, caption in enumerate(distinct, 1)}
    null_prompt, null_pooled = (null_embeddings if null_embeddings is not None
                                else text.null_prompt_embeddings(encoders, t5_max_length))
    null_prompt, null_pooled = np.asarray(null_prompt, np.float32), np.asarray(null_pooled, np.float32)
    shape = (len(distinct) + 1,)
    prompt_file = np.lib.format.open_memmap(directory / "prompt_embeds.npy", "w+", dtype, shape + null_prompt.shape)
    pooled_file = np.lib.format.open_memmap(directory / "pooled_prompt_embeds.npy", "w+", dtype,
                                            shape + null_pooled.shape)

    def store(row, prompt_embeds, pooled):
        if prompt_embeds.shape[1:] != prompt_file.shape[1:] or pooled.shape[1:] != pooled_file.shape[1:]:
            raise ValueError(f"{directory}: encoder output {prompt_embeds.shape[1:]}, {pooled.shape[1:]} does not match "
                             f"the NULL embeddings {prompt_file.shape[1:]}, {pooled_file.shape[1:]} (t5_max_length?)")
        for name, values in (("prompt_embeds", prompt_embeds), ("pooled", pooled)):
            if not np.all(np.isfinite(values)) or np.abs(values).max() > np.finfo(dtype).max:
                raise ValueError(f"{directory}: {name} of row {row} is not finite or does not fit {np.dtype(dtype)}; "
                                 f"use --dtype float32")
        prompt_file[row:row + len(prompt_embeds)] = prompt_embeds
        pooled_file[row:row + len(pooled)] = pooled

    store(0, null_prompt[None], null_pooled[None])
    for start in range(0, len(distinct), batch_size):
        batch = distinct[start:start + batch_size]
        padded = batch + [""] * (batch_size - len(batch))  # one compiled shape for every batch
        prompt_embeds, pooled = text.encode_prompts(encoders, padded, t5_max_length)
        store(start + 1, np.asarray(prompt_embeds, np.float32)[:len(batch)], np.asarray(pooled, np.float32)[:len(batch)])
        logging.info("encoded %d / %d captions", start + len(batch), len(distinct))
    prompt_file.flush()
    pooled_file.flush()
    del prompt_file, pooled_file
    np.save(directory / "caption_index.npy", np.array([rows.get(c, 0) for c in captions], np.int32))
    info = {**(info or {}), "records": len(captions), "captions": len(distinct), "t5_max_length": t5_max_length,
            "dtype": np.dtype(dtype).name, "null": "published" if null_embeddings is not None else 'encode("")'}
    (directory / "info.json").write_text(json.dumps(info, indent=1))
    return CaptionEmbeddings(directory)


def encode_dataset(dataset: str, split: str, data_dir: str, encoders, *, t5_max_length: int = 77,
                   batch_size: int = 16, dtype=np.float16, null_embeddings=None,
                   postprocess_captions: bool = False) -> CaptionEmbeddings:
    """Encode the captions of a prepared dataset split; returns the stored embeddings."""
    from smfsr_jax.data import pipeline
    from smfsr_jax.models import text

    source = pipeline.open_source(dataset, split, data_dir)
    captions = [pipeline.record_text(source[i]["caption"]).strip() for i in range(len(source))]
    if postprocess_captions:
        captions = [text.postprocess_caption(c) if c else c for c in captions]
    return encode_captions(captions, encoders, embeddings_dir(dataset, split, data_dir, t5_max_length),
                           t5_max_length=t5_max_length, batch_size=batch_size, dtype=dtype,
                           null_embeddings=null_embeddings,
                           info={"dataset": dataset, "split": split, "postprocessed": postprocess_captions})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="prepared dataset, name or name/config")
    parser.add_argument("--split", default=None, help="split (default: every split of the dataset)")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--text_encoders", required=True, help="SD3.5 diffusers root or converted text encoders")
    parser.add_argument("--t5_max_length", type=int, default=77)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--null_embeddings", default=None, help="folder with DiT4SR's NULL_*.pt (optional)")
    parser.add_argument("--postprocess_captions", action="store_true", help="SMFSR's test-time caption rule")
    args = parser.parse_args()
    logging.set_verbosity(logging.INFO)

    import tensorflow_datasets as tfds

    import smfsr_jax.data.tfds  # noqa: F401
    from smfsr_jax.convert import text as convert_text

    encoders = convert_text.load_text_encoders(args.text_encoders)
    null = convert_text.load_null_embeddings(args.null_embeddings) if args.null_embeddings else None
    splits = [args.split] if args.split else list(tfds.builder(args.dataset, data_dir=args.data_dir).info.splits)
    for split in splits:
        stored = encode_dataset(args.dataset, split, args.data_dir, encoders, t5_max_length=args.t5_max_length,
                                batch_size=args.batch_size, dtype=np.dtype(args.dtype), null_embeddings=null,
                                postprocess_captions=args.postprocess_captions)
        print(json.dumps({"directory": str(stored.directory), **stored.info}))


if __name__ == "__main__":
    main()
