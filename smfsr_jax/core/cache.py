"""The project's cache folder and JAX's persistent compilation cache in it.

The folder is `--cache_dir`, else $SMFSR_JAX_CACHE, else ~/.cache/smfsr_jax. Released weights are converted into
it (weights/pretrained.py), and the SR entry points (the sr CLI, the web app, the evaluator) keep JAX's compiled
executables under `jax_compilation/` in it, so a second run over new photos reads what the first compiled
instead of compiling again. A compilation cache the user configured themselves (JAX_COMPILATION_CACHE_DIR or
jax.config) is left as it is.
"""

import collections
import logging
import os

import jax

from smfsr_jax.core import files

CACHE_ENV = "SMFSR_JAX_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "smfsr_jax")
COMPILATION_DIR = "jax_compilation"
_HITS, _COMPILES = "/jax/compilation_cache/cache_hits", "/jax/core/compile/backend_compile_duration"

log = logging.getLogger(__name__)
_events = collections.Counter()
_listening = False


def cache_root(cache_dir: str | None = None) -> str:
    return files.absolute(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
    """Keep compiled executables in <cache root>/jax_compilation (every one, however fast it compiled), unless a
    compilation cache is already configured; returns the folder in use (None: a bucket root, which JAX's cache
    does not write to from here)."""
    _listen()
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    root = cache_root(cache_dir)
    if files.is_remote(root):
        return None
    path = os.path.join(root, COMPILATION_DIR)
    keep_compiled_in(path)
    log.info("compiled functions are kept in %s", path)
    return path


def keep_compiled_in(path: str):
    """JAX's persistent compilation cache in `path`, every executable kept however fast it compiled."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _listen():
    """Count compilations and cache reads from JAX's monitoring events (registered once per process)."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(lambda event, **_: _events.update([event]))
        jax.monitoring.register_event_duration_secs_listener(lambda event, _, **__: _events.update([event]))
        _listening = True


def compilation_counts() -> tuple[int, int]:
    """(functions compiled, executables read from the persistent cache) in this process since the first call of
    this or enable_compilation_cache."""
    _listen()
    hits = _events[_HITS]
    return _events[_COMPILES] - hits, hits


def describe_compilations(since: tuple[int, int] = (0, 0)) -> str:
    """'compiled 2 functions, read 3 from the compilation cache' since the counts `since`."""
    compiled, read = (now - before for now, before in zip(compilation_counts(), since))
    return f"compiled {compiled} function{'s' * (compiled != 1)}, read {read} from the compilation cache"
