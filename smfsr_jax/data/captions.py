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

The data_dir may be a bucket (gs://...): the cache is then encoded in local scratch and uploaded, info.json last
(the reader takes a folder without it for an unfinished one). Its rows are read one ranged request per row
(`BucketRows`): a full-size cache (T5 333 tokens x 4096 per caption) is far too large to copy to every host.
"""

import argparse
import contextlib
import io
import json
import os
import tempfile

import numpy as np
from absl import logging

from smfsr_jax.core import files

_NAMES = ("prompt_embeds.npy", "pooled_prompt_embeds.npy", "caption_index.npy", "info.json")


def embeddings_dir(dataset: str, split: str, data_dir: str, t5_max_length: int = 77) -> str:
    """Where the embeddings of `dataset` ("name" or "name/config") / `split` live (a path or a bucket URL)."""
    import tensorflow_datasets as tfds

    import smfsr_jax.data.tfds  # noqa: F401 (registers the builders)

    builder = tfds.builder(dataset, data_dir=data_dir)
    return files.join(builder.data_dir, "caption_embeddings", f"t5_{t5_max_length}", split)


class BucketRows:
    """Rows of a C-order .npy file in a bucket: the header is read once, then each `[i]` or `[start:stop]` is one
    ranged read (files.read_range), so that a host fetches only the rows it uses."""

    _PREFIX = 12  # magic, version and header length of every .npy format version

    def __init__(self, url: str):
        self.url = url
        prefix = files.read_range(url, 0, self._PREFIX)
        try:
            version = np.lib.format.read_magic(io.BytesIO(prefix))
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"format version {version[0]}.{version[1]} (expected 1.0 or 2.0)")
            length_bytes = 2 if version == (1, 0) else 4
            self.offset = 8 + length_bytes + int.from_bytes(prefix[8:8 + length_bytes], "little")
            header = io.BytesIO(files.read_range(url, 0, self.offset))
            np.lib.format.read_magic(header)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            self.shape, fortran_order, self.dtype = read_header(header)
        except ValueError as e:
            raise ValueError(f"{url}: not a readable .npy file ({e})") from e
        if fortran_order or self.dtype.hasobject or not self.shape:
            raise ValueError(f"{url}: expected a C-order numeric array with rows, got shape {self.shape}, "
                             f"dtype {self.dtype}, fortran_order {fortran_order}")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __getitem__(self, rows: int | slice) -> np.ndarray:
        selected = range(self.shape[0])[rows]  # IndexError past the end, like an array
        if isinstance(selected, int):
            return self._read(selected, selected + 1)[0]
        if selected.step != 1:
            raise IndexError(f"{self.url}: only contiguous rows are read, not step {selected.step}")
        return self._read(selected.start, max(selected.start, selected.stop))

    def _read(self, start: int, stop: int) -> np.ndarray:
        shape = (stop - start, *self.shape[1:])
        if stop == start:
            return np.empty(shape, self.dtype)
        data = files.read_range(self.url, self.offset + start * self.row_bytes, self.offset + stop * self.row_bytes)
        if len(data) != (stop - start) * self.row_bytes:
            raise ValueError(f"{self.url}: rows {start}-{stop - 1} are cut short (the file is truncated)")
        return np.frombuffer(data, self.dtype).reshape(shape)


class CaptionEmbeddings:
    """Read side: rows opened lazily (picklable into grain worker processes); memory-mapped from a local folder,
    one ranged read per row from a bucket (`BucketRows`)."""

    def __init__(self, directory: str | os.PathLike, build_command: str = "python -m smfsr_jax.data.captions"):
        self.directory = files.absolute(directory)
        present = set(files.listdir(self.directory)) if files.is_dir(self.directory) else set()
        missing = [name for name in _NAMES if name not in present]
        if missing:
            raise FileNotFoundError(f"no caption embeddings in {self.directory} (missing {', '.join(missing)}); "
                                    f"build them with: {build_command} (or train without captions: "
                                    "--config.data.captions=False)")
        self.info = json.loads(files.read_text(files.join(self.directory, "info.json")))
        self.caption_index = np.load(io.BytesIO(files.read_bytes(files.join(self.directory, "caption_index.npy"))))
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
            paths = [files.join(self.directory, name) for name in _NAMES[:2]]
            self._rows = tuple(BucketRows(path) if files.is_remote(path) else np.load(path, mmap_mode="r")
                               for path in paths)
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
    """Encode the distinct `captions` (record order) and the NULL prompt into `directory` (module layout; a bucket
    URL: encoded in local scratch, then uploaded).

    `null_embeddings`: optional (prompt_embeds, pooled) stored as row 0 instead of encode("").
    """
    from smfsr_jax.models import text

    directory = files.absolute(directory)
    files.makedirs(directory)
    if files.exists(files.join(directory, "info.json")):  # a reader must not take the old info for new rows
        files.remove(files.join(directory, "info.json"))
    remote = files.is_remote(directory)
    if remote:
        logging.info("encoding in local scratch, then uploading to %s (numpy writes local files only)", directory)
    with (tempfile.TemporaryDirectory(prefix="captions-", dir=files.scratch_dir("captions")) if remote
          else contextlib.nullcontext(directory)) as local:
        distinct = list(dict.fromkeys(c for c in captions if c))
        rows = {caption: row for row, caption in enumerate(distinct, 1)}
        null_prompt, null_pooled = (null_embeddings if null_embeddings is not None
                                    else text.null_prompt_embeddings(encoders, t5_max_length))
        null_prompt, null_pooled = np.asarray(null_prompt, np.float32), np.asarray(null_pooled, np.float32)
        shape = (len(distinct) + 1,)
        prompt_file = np.lib.format.open_memmap(os.path.join(local, "prompt_embeds.npy"), "w+", dtype,
                                                shape + null_prompt.shape)
        pooled_file = np.lib.format.open_memmap(os.path.join(local, "pooled_prompt_embeds.npy"), "w+", dtype,
                                                shape + null_pooled.shape)

        def store(row, prompt_embeds, pooled):
            if prompt_embeds.shape[1:] != prompt_file.shape[1:] or pooled.shape[1:] != pooled_file.shape[1:]:
                raise ValueError(f"{directory}: encoder output {prompt_embeds.shape[1:]}, {pooled.shape[1:]} does not "
                                 f"match the NULL embeddings {prompt_file.shape[1:]}, {pooled_file.shape[1:]} "
                                 f"(t5_max_length?)")
            for name, values in (("prompt_embeds", prompt_embeds), ("pooled", pooled)):
                if not np.all(np.isfinite(values)) or np.abs(values).max() > np.finfo(dtype).max:
                    raise ValueError(f"{directory}: {name} of row {row} is not finite or does not fit "
                                     f"{np.dtype(dtype)}; use --dtype float32")
            prompt_file[row:row + len(prompt_embeds)] = prompt_embeds
            pooled_file[row:row + len(pooled)] = pooled

        store(0, null_prompt[None], null_pooled[None])
        for start in range(0, len(distinct), batch_size):
            batch = distinct[start:start + batch_size]
            padded = batch + [""] * (batch_size - len(batch))  # one compiled shape for every batch
            prompt_embeds, pooled = text.encode_prompts(encoders, padded, t5_max_length)
            store(start + 1, np.asarray(prompt_embeds, np.float32)[:len(batch)],
                  np.asarray(pooled, np.float32)[:len(batch)])
            logging.info("encoded %d / %d captions", start + len(batch), len(distinct))
        prompt_file.flush()
        pooled_file.flush()
        del prompt_file, pooled_file
        caption_index = io.BytesIO()
        np.save(caption_index, np.array([rows.get(c, 0) for c in captions], np.int32))
        files.write_bytes(os.path.join(local, "caption_index.npy"), caption_index.getvalue())
        info = {**(info or {}), "records": len(captions), "captions": len(distinct), "t5_max_length": t5_max_length,
                "dtype": np.dtype(dtype).name, "null": "published" if null_embeddings is not None else 'encode("")'}
        files.write_text(os.path.join(local, "info.json"), json.dumps(info, indent=1))
        if remote:
            files.copy_tree(local, directory, last=["info.json"], what=f"uploading caption embeddings to {directory}")
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
        print(json.dumps({"directory": stored.directory, **stored.info}))


if __name__ == "__main__":
    main()
