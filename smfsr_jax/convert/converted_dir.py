"""Directories of converted weights, as every converter writes and every loader reads them: an orbax checkpoint
of the Flax params under `params/` and, written last, `config.json` with the network's config and metadata
(a directory with its config is complete).

Directories are read and written in place, locally or in a bucket (gs://; orbax reaches buckets itself).
"""

import json
import os

from smfsr_jax.convert.tensors import CheckpointError
from smfsr_jax.core import files

CONFIG_NAME = "config.json"
PARAMS_DIR = "params"


def _local_checkpointer():
    """A checkpointer of host arrays for this process alone (no cross-process barriers), so one process
    of a multi-host run can convert or export while the others carry on."""
    import jax
    import orbax.checkpoint as ocp
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def save_converted(dst: str, config: dict, params, meta: dict | None = None):
    """Write an orbax checkpoint of `params` under dst/params, then the JSON config beside it: a directory with
    its config is complete (is_converted), locally or in a bucket."""
    dst = files.absolute(dst)
    files.makedirs(dst)
    config_file = os.path.join(dst, CONFIG_NAME)
    if files.exists(config_file):  # an older conversion: no longer complete while its params are replaced
        files.remove(config_file)
    with _local_checkpointer() as ckptr:
        ckptr.save(os.path.join(dst, PARAMS_DIR), params, force=True)
    files.write_text(config_file, json.dumps({"config": config, "meta": meta or {}}, indent=2, sort_keys=True))


def is_converted(path: str) -> bool:
    return files.is_dir(os.path.join(path, PARAMS_DIR)) and files.exists(os.path.join(path, CONFIG_NAME))


def read_converted_config(path: str) -> tuple[dict, dict]:
    """(config dict, meta dict) of a directory written by save_converted."""
    record = json.loads(files.read_text(os.path.join(path, CONFIG_NAME)))
    return record["config"], record.get("meta", {})


def load_converted(path: str, abstract_params=None):
    """Read (config dict, meta dict, params) written by save_converted."""
    path = files.absolute(path)
    config, meta = read_converted_config(path)
    with _local_checkpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, PARAMS_DIR), abstract_params)
    return config, meta, params


def load_converted_of(path, converter: str) -> tuple[dict, dict]:
    """(config dict, params) of a directory written by smfsr_jax.convert.<converter>; a CheckpointError naming
    the directory when it holds something else."""
    path = os.fspath(path)
    if not is_converted(path):
        raise CheckpointError(f"{path}: not a converted {converter} directory; convert the published weights "
                              f"first with python -m smfsr_jax.convert {converter} --src FILE --dst {path}")
    config, meta, params = load_converted(path)
    if meta.get("converter") != converter:
        raise CheckpointError(f"{path}: holds {meta.get('converter')!r} weights, not {converter!r}")
    return config, params
