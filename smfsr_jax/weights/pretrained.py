"""Released weights -> a model bundle (bundle.py), converted once into a cache (`SRModel.from_pretrained`).

MODEL is a released transformer in its published layout: SMFSR's smfsr_q, smfsr_f or Teacher, DiT4SR's
dit4sr_q, dit4sr_f or dit4sr_r1; a directory holding transformer/, or holding config.json +
diffusion_pytorch_model*.safetensors (sharded, with diffusion_pytorch_model.safetensors.index.json, included).
BASE is the Stable Diffusion 3.5 Medium diffusers directory: vae/, and optionally text_encoder{,_2,_3}/ +
tokenizer{,_2,_3}/. Either may be a Hugging Face Hub id owner/name[/subfolder]:

  zw121/SMFSR/smfsr_q                         repo zw121/SMFSR, subfolder smfsr_q
  stabilityai/stable-diffusion-3.5-medium     the whole repo

fetched with huggingface_hub.snapshot_download (only the files used: never BASE's transformer/ or single-file
checkpoints), from the local Hub cache when offline (HF_HUB_OFFLINE=1), downloaded otherwise. A local path that
exists wins over a Hub id. Either may also be a bucket folder (gs://...) in the same layout: its safetensors and
torch files are staged to local scratch as they are read (core/files.stage, logged).

NULL embeddings (the conditioning without a caption): DiT4SR's NULL_prompt_embeds.pt + NULL_pooled_prompt_embeds.pt
from `null_embeddings=DIR`, else found beside MODEL or in its parent directory (for a Hub MODEL: its subfolder or
the repo root), else encode("") with BASE's text encoders at T5 length 256 (77 + 256 = 333 tokens, the upstream
test scripts' pipeline default). The log says which. `lr_key_bug` follows the published name: False for
dit4sr_r1 (the LR-key fix), True for every other release; the bundle meta records it and the variant name.

Cache (`cache_dir`, default $SMFSR_JAX_CACHE, else ~/.cache/smfsr_jax):

  CACHE/bundles/<variant>-<key>/    a bundle + cache_entry.json
  CACHE/text_encoders/<key>/        BASE's text encoders (`convert text` output) + cache_entry.json; the bundles
                                    reference it (save_bundle's text_encoders_dir), so T5-XXL is converted once

The cache may be a bucket URL (gs://...), shared by the hosts of a cluster. The key hashes the resolved path (or
URL), size and modification time of every source file used, and the options. An entry is written into a temporary
sibling and renamed into place when complete (in a bucket: its objects moved into place by the service);
cache_entry.json, written last, lists its files and sizes. An entry whose record is missing or invalid, whose files
do not match the record, or whose bundle fails to load is rebuilt, never used; in a bucket an entry without its
record is one still being written, or left by an interrupted write, and counts as absent.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid

from tqdm import tqdm

from smfsr_jax.convert import converted_dir
from smfsr_jax.convert import tensors as tensors_lib
from smfsr_jax.convert import text as text_convert
from smfsr_jax.convert import transformer as transformer_convert
from smfsr_jax.convert import vae as vae_convert
from smfsr_jax.core import files
from smfsr_jax.core.cache import cache_root
from smfsr_jax.core.errors import UserError, as_user_error
from smfsr_jax.models import text
from smfsr_jax.weights import bundle as bundle_lib

BUNDLES_DIR, TEXT_ENCODERS_DIR = "bundles", "text_encoders"
ENTRY_RECORD = "cache_entry.json"
ENTRY_FORMAT, ENTRY_VERSION = "smfsr_jax.cache_entry", 1
NULL_T5_LENGTH = 256
KEY_FIX_VARIANTS = ("dit4sr_r1",)  # released with the LR-key fix; the others were trained with the bug
TRANSFORMER_DIR, VAE_DIR = "transformer", "vae"
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model*"
TEXT_DIRS = tuple(sub for sub, _, _ in text_convert.SD35_ENCODERS) + text.TOKENIZER_DIRS
NULL_FILES = (text_convert.NULL_EMBEDS_FILE, text_convert.NULL_POOLED_FILE)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- sources

def _model_patterns(prefix: str) -> list[str]:
    return [f"{prefix}{TRANSFORMER_DIR}/*", f"{prefix}config.json", f"{prefix}{TRANSFORMER_WEIGHTS}",
            *(f"{prefix}{name}" for name in NULL_FILES), *NULL_FILES]


def _base_patterns(prefix: str) -> list[str]:
    return [f"{prefix}{VAE_DIR}/*", *(f"{prefix}{name}/*" for name in TEXT_DIRS)]


def _fetch(what: str, spec: str, patterns) -> tuple[str, str | None]:
    """(directory, Hub snapshot root or None) of MODEL or BASE `spec`: a bucket folder, a local directory, else a
    Hub id."""
    if files.is_remote(spec):
        if not files.is_dir(spec):
            raise UserError(f"{what} {spec}: no such bucket folder")
        return files.absolute(spec).rstrip("/"), None
    local = os.path.expanduser(spec)
    if os.path.exists(local):
        if not os.path.isdir(local):
            raise UserError(f"{what} {spec}: not a directory")
        return os.path.abspath(local), None
    if spec.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(spec):
        raise UserError(f"{what} {spec}: no such directory, and not a Hugging Face Hub id (owner/name[/subfolder])")
    owner, name, *sub = spec.split("/")
    repo, subfolder = f"{owner}/{name}", "/".join(sub)
    import huggingface_hub
    from huggingface_hub import constants
    tried = f"repo {repo}" + (f", subfolder {subfolder}" if subfolder else "")
    if constants.HF_HUB_OFFLINE:
        tried += f", in the local Hub cache {constants.HF_HUB_CACHE} only (HF_HUB_OFFLINE is set)"
    try:
        root = huggingface_hub.snapshot_download(repo, allow_patterns=patterns(f"{subfolder}/" if subfolder else ""))
    except (OSError, ValueError) as e:  # not found, gated, offline and not cached, invalid id
        raise UserError(f"{what} {spec}: no such local directory, and the Hugging Face Hub fetch failed ({tried}): "
                        f"{type(e).__name__}: {e}") from e
    path = os.path.join(root, subfolder)
    if not os.path.isdir(path):
        raise UserError(f"{what} {spec}: the snapshot {root} of {repo} has no {subfolder}/ folder ({tried})")
    return path, root


def _null_pair(folder: str) -> tuple[str, str] | None:
    pair = tuple(os.path.join(folder, name) for name in NULL_FILES)
    return pair if all(files.is_file(p) for p in pair) else None


def _identity(path: str) -> list:
    """The key of one source file: resolved path (a Hub snapshot's blob) or bucket URL, size and modification
    time."""
    if files.is_remote(path):
        stat = files.path(path).stat()
        return [path, stat.length, stat.mtime]
    real = os.path.realpath(path)
    stat = os.stat(real)
    return [real, stat.st_size, stat.st_mtime_ns]


def _key(files, options: dict) -> str:
    record = {"version": ENTRY_VERSION, "files": [_identity(p) for p in files], "options": options}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Plan:
    """A resolved MODEL + BASE: what a conversion reads and the options it records."""
    model: str
    base: str
    transformer_dir: str
    variant: str
    lr_key_bug: bool
    base_dir: str
    has_text_encoders: bool
    null_files: tuple[str, str] | None  # DiT4SR's NULL_*.pt; None: encode("") with BASE's text encoders

    @property
    def null_source(self) -> str:
        if self.null_files:
            return f"DiT4SR's {' + '.join(NULL_FILES)} from {os.path.dirname(self.null_files[0])}"
        return (f"encode(\"\") with BASE's text encoders (T5 length {NULL_T5_LENGTH}: "
                f"{text.CLIP_MAX_LENGTH + NULL_T5_LENGTH} tokens)")

    def text_files(self) -> list[str]:
        if not self.has_text_encoders:
            return []
        return [p for name in TEXT_DIRS for p in files.walk_files(os.path.join(self.base_dir, name))]

    def files(self) -> list[str]:
        """Every source file the bundle is made from."""
        weights = [os.path.join(self.transformer_dir, n) for n in files.listdir(self.transformer_dir)
                   if n == converted_dir.CONFIG_NAME or n.endswith((".safetensors", ".safetensors.index.json"))]
        vae_dir = os.path.join(self.base_dir, VAE_DIR)
        vae = [os.path.join(vae_dir, n) for n in files.listdir(vae_dir)
               if n == converted_dir.CONFIG_NAME or n.endswith(".safetensors")]
        return weights + vae + list(self.null_files or ()) + self.text_files()

    def options(self) -> dict:
        return {"variant": self.variant, "lr_key_bug": self.lr_key_bug,
                "null_t5_length": None if self.null_files else NULL_T5_LENGTH}

    def meta(self) -> dict:
        return {"source": "released", "variant": self.variant, "lr_key_bug": self.lr_key_bug, "model": self.model,
                "base": self.base, "null_embeddings": self.null_source}


def _transformer_dir(model: str, path: str) -> str:
    if files.is_dir(os.path.join(path, TRANSFORMER_DIR)):
        path = os.path.join(path, TRANSFORMER_DIR)
    names = files.listdir(path)
    if converted_dir.CONFIG_NAME not in names or not any(re.fullmatch(r"diffusion_pytorch_model.*\.safetensors", n)
                                                         for n in names):
        raise UserError(f"MODEL {model}: {path} holds neither {TRANSFORMER_DIR}/ nor {converted_dir.CONFIG_NAME} + "
                        "diffusion_pytorch_model*.safetensors (the published DiT4SR / SMFSR layout)")
    # The header names alone tell a released SR model from a plain SD3.5 transformer, before any conversion.
    tensors = tensors_lib.open_weights(path)
    if not any("_control." in k for k in tensors):
        raise UserError(f"MODEL {model}: {tensors.path} is a Stable Diffusion 3.5 transformer without DiT4SR's LR "
                        "stream (no *_control weights); MODEL must be an SR release (smfsr_q, smfsr_f, Teacher, "
                        "dit4sr_q, dit4sr_f, dit4sr_r1) and the SD3.5 directory goes to BASE")
    return path


def resolve(model: str, base: str, *, null_embeddings: str | None = None, lr_key_bug: bool | None = None) -> Plan:
    """MODEL and BASE as local directories (fetched when Hub ids), checked; see the module docstring."""
    model, base = os.fspath(model), os.fspath(base)
    model_path, model_root = _fetch("MODEL", model, _model_patterns)
    transformer_dir = _transformer_dir(model, model_path)
    named = model_path if os.path.basename(model_path) != TRANSFORMER_DIR else os.path.dirname(model_path)
    variant = os.path.basename(named.rstrip(os.sep))
    base_dir, _ = _fetch("BASE", base, _base_patterns)
    if not files.is_dir(os.path.join(base_dir, VAE_DIR)):
        raise UserError(f"BASE {base}: {base_dir} has no {VAE_DIR}/ folder (expected the Stable Diffusion 3.5 "
                        "Medium diffusers directory: vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/)")
    present = [name for name in TEXT_DIRS if files.is_dir(os.path.join(base_dir, name))]
    if present and len(present) < len(TEXT_DIRS):
        missing = [name for name in TEXT_DIRS if name not in present]
        raise UserError(f"BASE {base}: {base_dir} has {', '.join(present)} but not {', '.join(missing)}: give all "
                        "three text encoders with their tokenizers, or none")

    if null_embeddings is not None:
        null_files = _null_pair(files.absolute(os.fspath(null_embeddings)))
        if null_files is None:
            raise UserError(f"null_embeddings {null_embeddings}: no {' + '.join(NULL_FILES)} in this directory")
    else:
        searched = [model_path, os.path.dirname(model_path)] + ([model_root] if model_root else [])
        null_files = next((pair for pair in map(_null_pair, searched) if pair), None)
        if null_files is None and not present:
            raise UserError(f"no NULL embeddings for MODEL {model}: no {' + '.join(NULL_FILES)} in "
                            f"{', '.join(dict.fromkeys(searched))}, no null_embeddings directory given, and BASE "
                            f"{base_dir} has no text encoders (text_encoder{{,_2,_3}}/ + tokenizer{{,_2,_3}}/) to "
                            "encode \"\" with")
    plan = Plan(model=model, base=base, transformer_dir=transformer_dir, variant=variant,
                lr_key_bug=(variant.lower() not in KEY_FIX_VARIANTS) if lr_key_bug is None else bool(lr_key_bug),
                base_dir=base_dir, has_text_encoders=bool(present), null_files=null_files)
    log.info("%s: variant %s, lr_key_bug %s; NULL embeddings: %s", model, plan.variant, plan.lr_key_bug,
             plan.null_source)
    return plan


# ---------------------------------------------------------------------------------------------- conversion

def _write(plan: Plan, dst: str, text_encoders_dir: str | None) -> str:
    """Convert the transformer and the VAE, read or encode the NULL embeddings, write the bundle `dst`."""
    with tqdm(total=4, desc=f"converting {plan.variant}", unit="step") as bar:
        bar.set_postfix_str("transformer")
        config, params = transformer_convert.load_transformer(plan.transformer_dir, show_progress=True,
                                                              lr_key_bug=plan.lr_key_bug)
        bar.update()
        bar.set_postfix_str("vae")
        vae_config, vae_params = vae_convert.load_vae(os.path.join(plan.base_dir, VAE_DIR), show_progress=True)
        bar.update()
        bar.set_postfix_str("NULL embeddings")
        if plan.null_files:
            null = text_convert.load_null_embeddings(os.path.dirname(plan.null_files[0]))
        else:
            null = text.null_prompt_embeddings(text_convert.load_text_encoders(text_encoders_dir), NULL_T5_LENGTH)
        bar.update()
        bar.set_postfix_str("bundle")
        with as_user_error(f"MODEL {plan.model} with BASE {plan.base}"):  # channels or NULL widths that disagree
            bundle_lib.save_bundle(dst, student_config=config, student_params=params, autoencoder_config=vae_config,
                                   autoencoder_params=vae_params, null_embeddings=null,
                                   text_encoders_dir=text_encoders_dir, meta=plan.meta())
        bar.update()
    return files.absolute(dst)


def write_bundle(model: str, base: str, dst: str, *, null_embeddings: str | None = None,
                 lr_key_bug: bool | None = None) -> str:
    """Convert MODEL + BASE into the bundle directory `dst`, without the cache (`python -m smfsr_jax.convert
    bundle`); BASE's text encoders, when it has them, are converted into dst/text_encoders and referenced."""
    plan = resolve(model, base, null_embeddings=null_embeddings, lr_key_bug=lr_key_bug)
    text_encoders_dir = None
    if plan.has_text_encoders:
        text_encoders_dir = os.path.join(files.absolute(dst), bundle_lib.TEXT_ENCODERS_DIR)
        text_convert.convert(plan.base_dir, text_encoders_dir)
    return _write(plan, dst, text_encoders_dir)


# ---------------------------------------------------------------------------------------------- cache

def entry_problem(entry: str) -> str | None:
    """Why the cache entry `entry` cannot be used (absent, no or invalid record, files that differ from the
    record, a bundle record that cannot be read), or None. In a bucket an entry without its record is absent."""
    record_file = os.path.join(entry, ENTRY_RECORD)
    if not files.is_dir(entry) or (files.is_remote(entry) and not files.exists(record_file)):
        return "absent"
    try:
        record = json.loads(files.read_text(record_file))
    except (OSError, ValueError) as e:
        return f"no valid {ENTRY_RECORD} ({e})"
    if not isinstance(record, dict) or (record.get("format"), record.get("version")) != (ENTRY_FORMAT, ENTRY_VERSION):
        return f"{ENTRY_RECORD} is not a version {ENTRY_VERSION} cache record"
    present = files.sizes(entry)
    for name, size in record.get("files", {}).items():
        if name not in present:
            return f"{name} is missing"
        if present[name] != size:
            return f"{name} has {present[name]} bytes, the record says {size}"
    if files.is_file(os.path.join(entry, bundle_lib.BUNDLE_FILE)):
        try:
            bundle_record = bundle_lib.read_bundle_record(entry)
        except (OSError, ValueError) as e:
            return str(e)
        referenced = bundle_lib.text_encoders_path(entry, bundle_record)
        if referenced and entry_problem(referenced) is not None:
            return f"its text encoders {referenced} are not a complete cache entry"
    return None


def _entry_record(tmp: str, sources: dict) -> str:
    record = {"format": ENTRY_FORMAT, "version": ENTRY_VERSION, "sources": sources, "files": files.sizes(tmp)}
    return json.dumps(record, indent=2, sort_keys=True)


def _ensure(entry: str, what: str, build, sources: dict) -> str:
    """The cache entry `entry`, built by `build(tmp_dir)` into a temporary sibling when it is unusable."""
    problem = entry_problem(entry)
    if problem is None:
        log.info("using the cached %s at %s", what, entry)
        return entry
    if problem != "absent":
        log.warning("the cached %s at %s cannot be used (%s); rebuilding it", what, entry, problem)
    log.info("converting the %s into %s", what, entry)
    if files.is_remote(entry):
        _build_in_bucket(entry, build, sources)
    else:
        _build_locally(entry, build, sources)
    log.info("wrote the cached %s at %s", what, entry)
    return entry


def _build_locally(entry: str, build, sources: dict):
    parent = os.path.dirname(entry)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(entry)}.partial-", dir=parent)
    try:
        build(tmp)
        files.write_text(os.path.join(tmp, ENTRY_RECORD), _entry_record(tmp, sources))
        if os.path.lexists(entry):
            discard(entry)
        try:
            os.rename(tmp, entry)
        except OSError:
            if entry_problem(entry) is not None:  # not another process that completed the same entry first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_in_bucket(entry: str, build, sources: dict):
    """No rename in a bucket: the entry's objects are moved into place by the service, then its record written."""
    tmp = os.path.join(os.path.dirname(entry), f".{os.path.basename(entry)}.partial-{uuid.uuid4().hex[:8]}")
    try:
        build(tmp)
        record = _entry_record(tmp, sources)
        if entry_problem(entry) is None:  # another process completed the same entry first
            return
        if files.exists(entry):  # unusable, or left by an interrupted write
            discard(entry)
        files.move(tmp, entry)
        files.write_text(os.path.join(entry, ENTRY_RECORD), record)
    finally:
        files.remove_tree(tmp)


def discard(entry: str):
    """Remove a cache entry: renamed aside first (in a bucket: its record deleted first), so that no reader sees it
    half-deleted."""
    if files.is_remote(entry):
        record = os.path.join(entry, ENTRY_RECORD)
        if files.exists(record):
            files.remove(record)
        files.remove_tree(entry)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(entry)}.stale-", dir=os.path.dirname(entry))
    os.replace(entry, aside)
    shutil.rmtree(aside, ignore_errors=True)


def load_or_convert(model: str, base: str, *, null_embeddings: str | None = None, lr_key_bug: bool | None = None,
                    cache_dir: str | None = None) -> str:
    """The path of the cached bundle of MODEL + BASE, converted first when absent or unusable (module docstring)."""
    plan = resolve(model, base, null_embeddings=null_embeddings, lr_key_bug=lr_key_bug)
    root = cache_root(cache_dir)
    text_encoders_dir = None
    if plan.has_text_encoders:
        text_files = plan.text_files()
        text_encoders_dir = _ensure(os.path.join(root, TEXT_ENCODERS_DIR, _key(text_files, {})),
                                    f"text encoders of {plan.base}",
                                    lambda tmp: text_convert.convert(plan.base_dir, tmp),
                                    {"base": plan.base, "files": [_identity(p) for p in text_files]})
    files = plan.files()
    entry = os.path.join(root, BUNDLES_DIR, f"{plan.variant}-{_key(files, plan.options())}")
    return _ensure(entry, f"bundle of {plan.model} + {plan.base}", lambda tmp: _write(plan, tmp, text_encoders_dir),
                   {**plan.meta(), "files": [_identity(p) for p in files], "options": plan.options()})


def load_pretrained(model: str, base: str, *, null_embeddings: str | None = None, lr_key_bug: bool | None = None,
                    cache_dir: str | None = None, **transformer_overrides) -> bundle_lib.Bundle:
    """The loaded cached bundle of MODEL + BASE (`load_or_convert`); a cached bundle that fails to load is
    rebuilt once. `transformer_overrides` go to `load_bundle` (dtype, attention)."""
    options = dict(null_embeddings=null_embeddings, lr_key_bug=lr_key_bug, cache_dir=cache_dir)
    path = load_or_convert(model, base, **options)
    try:
        return bundle_lib.load_bundle(path, **transformer_overrides)
    except (OSError, ValueError) as e:  # unreadable parameters behind a complete record
        log.warning("the cached bundle at %s fails to load (%s); rebuilding it", path, e)
        discard(path)
    return bundle_lib.load_bundle(load_or_convert(model, base, **options), **transformer_overrides)
