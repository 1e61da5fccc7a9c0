"""grain pipelines over the project's TFDS datasets (ArrayRecord, read by `tfds.data_source`).

Train: shard by process -> shuffle (reseeded each epoch) -> repeat -> per record: decode, random
crop (reflect-101 padding when the image is smaller), horizontal flip, text-dropout flag, Real-ESRGAN
degradation, bicubic x4 of the LR -> batch -> optional worker processes. Every random draw of an
example comes from `np.random.default_rng([seed, epoch, record index])`, so the stream does not depend
on the worker count and a restored iterator continues it exactly.

Eval: ordered, no shuffle; each process takes a contiguous shard and every shard is padded to the
same whole number of batches (padding rows have `mask` False and `index` -1), so all processes run the
same number of steps. HR-only records (e.g. `bundled` holdout) get a deterministic synthetic LR: a
centre crop degraded with seed (seed, 0, index).

Batch contract (numpy, B = per-process batch, S = HR side; images are 8-bit levels, x / 255 is [0, 1]):
    hr                    uint8 (B, S, S, 3); GT crop (USM-sharpened, then rounded, if configured)
    lr                    uint8 (B, S/4, S/4, 3); the degraded LR (already 8-bit by construction)
    lr_up                 uint8 (B, S, S, 3); torch-bicubic x4 of lr, clamped and rounded: the model input
    index                 int64 (B,), record index in the split (-1 for eval padding)
    train only:  epoch int64 (B,); text_dropped bool (B,), True with probability `text_dropout`
    eval only:   mask bool (B,); file_name str (B,); no `hr` for LR-only sets
    with cached caption embeddings (`captions.CaptionEmbeddings`):
    prompt_embeds         float32 (B, 77 + n, D); the NULL prompt's where text_dropped
    pooled_prompt_embeds  float32 (B, P)

Checkpointing: `iterator = iter(pipeline)`; `iterator.get_state()` is a small JSON-able dict
({"batches_delivered": n}) to save with the train state (e.g. `orbax.checkpoint.args.JsonSave`), and
`iterator.set_state(state)` on a fresh iterator resumes the stream exactly, whatever the worker count.
`iterator.close()` stops worker processes. Unreadable records never stop a run: in training the next
record stands in, in evaluation the row is masked out; both are counted in `bad_records` and logged.

Worker processes (`worker_count > 0`) are started with spawn: the launching script needs the usual
`if __name__ == "__main__":` guard.
"""

import collections
import ctypes
import ctypes.util
import functools
import json
import os

import cv2
import grain
import ml_collections
import numpy as np
from absl import flags, logging

from smfsr_jax.core import errors, files
from smfsr_jax.data import degradation, images

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
bad_records = collections.Counter()  # per process: file name -> times skipped
padded_records = collections.Counter()  # per process: file name -> times reflect-padded to the crop


class DataNotPrepared(errors.UserError, FileNotFoundError):
    """A data_dir without the prepared dataset or split; the message holds the command that builds it."""


def build_command(dataset: str, data_dir: str | None) -> str:
    name = dataset.partition("/")[0]
    manual = "" if name == "bundled" else f" --manual_dir SOURCE (layout: smfsr_jax/data/tfds/{name}.py)"
    return f"python -m smfsr_jax.data.build --dataset {dataset}{manual} --data_dir {data_dir or 'DIR'}"


def check_prepared(dataset: str, split: str, data_dir: str | None):
    """Fail at once, naming the directory and the build command, unless `data_dir` (a folder or a bucket URL)
    holds a prepared build of `dataset` with `split` (TFDS layout: DATA_DIR/name[/config]/version/dataset_info.json,
    the file a build writes last)."""
    if not data_dir:
        raise DataNotPrepared(f"no data_dir given for dataset {dataset}; build one with: "
                              f"{build_command(dataset, None)}, then pass --config.data.data_dir=DIR")
    dataset_dir = files.join(data_dir, *dataset.split("/"))
    versions = files.listdir(dataset_dir) if files.is_dir(dataset_dir) else []
    infos = [info for info in (files.join(dataset_dir, version, "dataset_info.json") for version in versions)
             if files.is_file(info)]
    if not infos:
        problem = "does not exist" if not files.is_dir(data_dir) else f"holds no prepared {dataset} dataset"
        raise DataNotPrepared(f"data_dir {data_dir} {problem}; build it with: {build_command(dataset, data_dir)}")
    splits = [s["name"] for s in json.loads(files.read_text(infos[-1])).get("splits", [])]
    if split not in splits:
        raise DataNotPrepared(f"{os.path.dirname(infos[-1])}: dataset {dataset} has no split {split!r} "
                              f"(it has {', '.join(splits) or 'none'}); rebuild it with: "
                              f"{build_command(dataset, data_dir)}")


def open_source(dataset: str, split: str, data_dir: str):
    """`tfds.data_source` of one of the project's datasets ("name" or "name/config"); a data_dir in a bucket is
    read in place (ArrayRecord's reader fetches the records it is asked for)."""
    check_prepared(dataset, split, data_dir)
    import tensorflow_datasets as tfds

    import smfsr_jax.data.tfds  # noqa: F401 (registers the builders)

    # download=False: an unbuilt dataset is an error here, never a half-built folder.
    return tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)


def record_text(value) -> str:
    """A text field of a record (`tfds.data_source` returns bytes) as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _reflect_pad(image: np.ndarray, size: int, name: str) -> np.ndarray:
    """Pad bottom/right with reflect-101 up to `size` (BasicSR's rule for short GT images)."""
    height, width = image.shape[:2]
    if height >= size and width >= size:
        return image
    if name not in padded_records:
        logging.warning("%s is %dx%d, smaller than the %d crop: reflect-padded", name, width, height, size)
    padded_records[name] += 1
    return cv2.copyMakeBorder(image, 0, max(0, size - height), 0, max(0, size - width), cv2.BORDER_REFLECT_101)


def _with_embeddings(example: dict, embeddings, index: int, use_null: bool) -> dict:
    if embeddings is not None:
        example["prompt_embeds"], example["pooled_prompt_embeds"] = (
            embeddings.null if use_null else embeddings.record(index))
    return example


class TrainExample:
    """(epoch, record index) -> one training example (module docstring); picklable for workers."""

    def __init__(self, source, config: ml_collections.ConfigDict, seed: int, text_dropout: float, embeddings):
        self.source, self.config, self.seed = source, config, seed
        self.text_dropout, self.embeddings = text_dropout, embeddings

    def _decode_first_good(self, index: int) -> tuple[int, np.ndarray, str]:
        """(record index, pixels, file name) of `index` or, if it does not decode, of the next one."""
        for offset in range(len(self.source)):
            candidate = (index + offset) % len(self.source)
            name = f"record {candidate}"
            try:
                record = self.source[candidate]
                name = record_text(record["file_name"])
                return candidate, images.decode_rgb8(record["hr"], name), name
            except (images.BadImage, KeyError, ValueError, OSError) as e:
                bad_records[name] += 1
                logging.warning("skipping training record %d, %s (%d bad reads so far in this process): %s",
                                candidate, name, sum(bad_records.values()), e)
        raise ValueError(f"none of the {len(self.source)} training records decodes")

    def __call__(self, epoch_and_index: tuple[int, int]) -> dict:
        epoch, index = epoch_and_index
        index, image, name = self._decode_first_good(int(index))
        rng = np.random.default_rng([self.seed, epoch, index])
        text_dropped = bool(rng.uniform() < self.text_dropout)
        size = self.config.crop_size
        image = _reflect_pad(image, size, name)
        top = rng.integers(image.shape[0] - size + 1)
        left = rng.integers(image.shape[1] - size + 1)
        crop = image[top:top + size, left:left + size]
        if rng.uniform() < 0.5:
            crop = crop[:, ::-1]
        hr, lr = degradation.degrade(crop.astype(np.float32) / 255.0, rng, self.config)
        hr = degradation.to_uint8(hr) if self.config.use_sharpen else np.ascontiguousarray(crop)
        example = {"hr": hr, "lr": degradation.to_uint8(lr),
                   "lr_up": degradation.to_uint8(degradation.upsample_lr(lr, self.config.scale)),
                   "text_dropped": np.bool_(text_dropped), "index": np.int64(index), "epoch": np.int64(epoch)}
        return _with_embeddings(example, self.embeddings, index, text_dropped)


class EvalExample:
    """Record index -> one eval example; indices past the shard are padding copies (mask False)."""

    def __init__(self, source, stop: int, config: ml_collections.ConfigDict | None, seed: int, embeddings):
        self.source, self.stop, self.config, self.seed, self.embeddings = source, stop, config, seed, embeddings

    def __call__(self, index: int) -> dict:
        padding = index >= self.stop
        record_index = self.stop - 1 if padding else int(index)
        for offset in range(len(self.source)):
            candidate = (record_index + offset) % len(self.source)
            try:
                example, name = self._example(candidate)
                break
            except (images.BadImage, KeyError, ValueError, OSError) as e:
                # An unreadable record becomes a masked row: the batch keeps its shape, metrics skip it.
                bad_records[f"record {candidate}"] += 1
                logging.warning("eval record %d is unreadable, masked out: %s", candidate, e)
                padding = True
        else:
            raise ValueError(f"none of the {len(self.source)} eval records decodes")
        example.update(mask=np.bool_(not padding), index=np.int64(-1 if padding else candidate),
                       file_name=np.asarray("" if padding else name))
        return _with_embeddings(example, self.embeddings, candidate, False)

    def _example(self, record_index: int) -> tuple[dict, str]:
        record = self.source[record_index]
        name = record_text(record["file_name"])
        example = {}
        if "lr" in record:
            example["lr"] = images.decode_rgb8(record["lr"], name)
            if "hr" in record:
                example["hr"] = images.decode_rgb8(record["hr"], name)
        else:  # HR-only set: deterministic synthetic LR from a centre crop
            hr = _reflect_pad(images.decode_rgb8(record["hr"], name), self.config.crop_size, name)
            size = self.config.crop_size
            top, left = (hr.shape[0] - size) // 2, (hr.shape[1] - size) // 2
            example["hr"] = np.ascontiguousarray(hr[top:top + size, left:left + size])
            rng = np.random.default_rng([self.seed, 0, record_index])
            sharpened, lr = degradation.degrade(example["hr"].astype(np.float32) / 255.0, rng, self.config)
            example["lr"] = degradation.to_uint8(lr)
            if self.config.use_sharpen:
                example["hr"] = degradation.to_uint8(sharpened)
        scale = self.config.scale if self.config is not None else 4
        lr_up = degradation.upsample_lr(example["lr"].astype(np.float32) / 255.0, scale)
        example["lr_up"] = degradation.to_uint8(lr_up)
        return example, name


def _init_worker(worker_index: int, worker_count: int):
    # Workers already fill the cores; OpenCV's own thread pool would only oversubscribe them.
    cv2.setNumThreads(1)
    # glibc returns every freed multi-MB numpy temporary to the kernel and page-faults it back on
    # the next allocation (about 12% of a worker's time); keeping them in the heap avoids that.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31)
    except (OSError, AttributeError, TypeError):  # not glibc: keep the defaults
        pass


class BatchIterator:
    """Iterator over a pipeline's batches; its state is the number of batches delivered.

    Every batch is a pure function of its position, so the state does not depend on the worker
    count: a run may resume with more or fewer workers (grain's own iterator states differ between
    in-process and worker iterators).
    """

    def __init__(self, batches: "Batches"):
        self._batches = batches
        self._position = 0
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self._batches.from_position(self._position))
        batch = next(self._iterator)
        self._position += 1
        return batch

    def get_state(self) -> dict:
        return {"batches_delivered": self._position}

    def set_state(self, state: dict):
        self.close()
        self._position = int(state["batches_delivered"])

    def close(self):
        """Stops the worker processes, if any (the next `next` restarts them)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


class Batches:
    """A pipeline: an iterable of batches (`iter()` gives a checkpointable `BatchIterator`)."""

    def __init__(self, batches: grain.MapDataset, worker_count: int, worker_buffer_size: int, read_threads: int):
        self.batches = batches
        self.worker_count, self.worker_buffer_size, self.read_threads = worker_count, worker_buffer_size, read_threads

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)

    def from_position(self, position: int) -> grain.IterDataset:
        """The batches from `position` on, with worker processes when worker_count > 0."""
        options = grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=max(1, 2 * self.read_threads))
        iterable = self.batches[position:].to_iter_dataset(options)
        if self.worker_count > 0:
            # grain reads absl flags in its workers; a program that did not parse flags would fail there.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            iterable = iterable.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.worker_count,
                                             per_worker_buffer_size=self.worker_buffer_size),
                worker_init_fn=_init_worker)
        return iterable


def _check_embeddings(source, embeddings):
    if embeddings is not None and len(embeddings) != len(source):
        raise ValueError(f"caption embeddings {getattr(embeddings, 'directory', '')} hold {len(embeddings)} records, "
                         f"the data source {len(source)}: re-run python -m smfsr_jax.data.captions")


def _shard(num_records: int, shard_options: grain.sharding.ShardOptions | None) -> grain.sharding.ShardOptions:
    shard = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=False)
    if num_records < shard.shard_count:
        raise ValueError(f"{num_records} records cannot be sharded over {shard.shard_count} processes")
    return shard


def _epoch_and_index(per_epoch: int, position: int, index: int) -> tuple[int, int]:
    return position // per_epoch, index


class _ProcessRows:
    """Local position -> this process's rows of each global batch of the one global stream."""

    def __init__(self, stream: grain.MapDataset, local_batch: int, shard: grain.sharding.ShardOptions):
        self.stream, self.local_batch, self.shard = stream, local_batch, shard

    def __call__(self, position: int):
        step, row = divmod(position, self.local_batch)
        return self.stream[(step * self.shard.shard_count + self.shard.shard_index) * self.local_batch + row]


def train_pipeline(source, *, batch_size: int, seed: int, degradation_config: ml_collections.ConfigDict,
                   text_dropout: float = 0.2, embeddings=None, num_epochs: int | None = None,
                   shard_options: grain.sharding.ShardOptions | None = None, worker_count: int = 0,
                   worker_buffer_size: int = 2, read_threads: int = 1) -> Batches:
    """Endless (or `num_epochs`) stream of train batches (module docstring) over an HR-only source.

    `source`: a random-access source of {hr, file_name, ...} records, e.g. `open_source("lsdir", "train",
    DIR)`. `batch_size` is per process. Every process walks the same shuffled global stream and takes
    its own rows of each global batch (`shard_options`, default: this JAX process), so the global batch
    — and hence training — does not depend on the number of processes. Last partial global batches of a
    finite stream are dropped.
    """
    _check_embeddings(source, embeddings)
    shard = _shard(len(source), shard_options)
    per_epoch = len(source)
    stream = grain.MapDataset.range(per_epoch).shuffle(seed=seed).repeat(num_epochs)
    stream = stream.map_with_index(functools.partial(_epoch_and_index, per_epoch))
    global_batch = batch_size * shard.shard_count
    rows = grain.MapDataset.range(len(stream) // global_batch * batch_size)
    examples = rows.map(_ProcessRows(stream, batch_size, shard))
    examples = examples.map(TrainExample(source, degradation_config, seed, text_dropout, embeddings))
    batches = examples.batch(batch_size, drop_remainder=True)
    return Batches(batches, worker_count, worker_buffer_size, read_threads)


def eval_pipeline(source, *, batch_size: int, degradation_config: ml_collections.ConfigDict | None = None,
                  seed: int = 0, embeddings=None, shard_options: grain.sharding.ShardOptions | None = None,
                  worker_count: int = 0, read_threads: int = 1) -> Batches:
    """One ordered pass of eval batches (module docstring); the last batch is padded with mask False.

    `degradation_config` is needed for HR-only sets (its crop_size and parameters make the LR).
    Images in one batch must share a size; use batch_size 1 for sets of mixed sizes.
    """
    _check_embeddings(source, embeddings)
    if degradation_config is None and "lr" not in source[0]:
        raise ValueError("an HR-only eval set needs degradation_config to make its LR images")
    shard = _shard(len(source), shard_options)
    per_shard = -(-len(source) // shard.shard_count)
    start = shard.shard_index * per_shard
    stop = min(start + per_shard, len(source))
    padded = -(-per_shard // batch_size) * batch_size
    indices = grain.MapDataset.range(start, start + padded)
    examples = indices.map(EvalExample(source, stop, degradation_config, seed, embeddings))
    batches = examples.batch(batch_size, batch_fn=functools.partial(_stack_eval_batch, batch_size=batch_size))
    return Batches(batches, worker_count, 1, read_threads)


def eval_pairs(dataset: str, split: str, data_dir: str, crop_size: int, seed: int = 0):
    """(file names, LR uint8 list, HR uint8 list) of a whole eval split in one pass; HR-only sets get centre
    crops of `crop_size` and the default degradation, deterministically (the same LR every call)."""
    config = degradation.default_config()
    config.crop_size = crop_size
    names, lrs, hrs = [], [], []
    for batch in eval_pipeline(open_source(dataset, split, data_dir), batch_size=1, degradation_config=config,
                               seed=seed):
        if batch["mask"][0]:
            names.append(os.path.splitext(str(batch["file_name"][0]))[0])
            lrs.append(batch["lr"][0])
            hrs.append(batch["hr"][0])
    return names, lrs, hrs


def _stack_eval_batch(examples: list[dict], batch_size: int) -> dict:
    shapes = {tuple(example["lr"].shape) for example in examples}
    if len(shapes) > 1:
        names = [str(example["file_name"]) for example in examples]
        raise ValueError(f"eval batch of size {batch_size} mixes LR sizes {sorted(shapes)} ({names}); "
                         f"use batch_size=1 for this set")
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}
