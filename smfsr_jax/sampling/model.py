"""SRModel: a model loaded for SR. The transformer and autoencoder parameters are replicated on a 1-D mesh over
this process's devices (each device runs whole images), with the NULL and negative text embeddings and, for
bundles with text encoders, the encoders (loaded at the first caption) and a cache of encoded captions.

One SRModel serves any number of settings (settings.py): changing steps, tiles or colour fix never copies the
parameters again.
"""

import logging

import jax
import numpy as np

from smfsr_jax.core import mesh as mesh_lib
from smfsr_jax.models import text
from smfsr_jax.sampling import samplers
from smfsr_jax.sampling.pipeline import DATA
from smfsr_jax.sampling.settings import SRSettings
from smfsr_jax.weights import bundle as bundle_lib

log = logging.getLogger(__name__)


class SRModel:
    """`SRModel(bundle)`, or `SRModel.from_checkpoint(path)` / `SRModel.from_pretrained(model, base)`.

    devices: the devices a batch is split over (default: every local device of this process).
    """

    def __init__(self, bundle: bundle_lib.Bundle, devices=None):
        self.path, self.meta = bundle.path, bundle.meta
        self.transformer_config, self.autoencoder_config = bundle.transformer_config, bundle.autoencoder_config
        self.mesh = mesh_lib.make_mesh([(DATA, -1)], jax.local_devices() if devices is None else devices)
        self.transformer_params = jax.device_put(bundle.transformer_params, mesh_lib.replicated(self.mesh))
        self.autoencoder_params = jax.device_put(bundle.autoencoder_params, mesh_lib.replicated(self.mesh))
        self.null_embeddings = tuple(np.asarray(a, np.float32) for a in bundle.null_embeddings)
        self.negative_embeddings = (None if bundle.negative_embeddings is None
                                    else tuple(np.asarray(a, np.float32) for a in bundle.negative_embeddings))
        self.text_encoders_dir = bundle.text_encoders_dir
        self._text_encoders = None
        self._embedding_cache = {}
        self._warned_no_encoders = False

    @classmethod
    def from_checkpoint(cls, path: str, *, dtype: str | None = None, attention: str | None = None, devices=None):
        """A bundle directory (weights/bundle.py); dtype/attention override the transformer config."""
        overrides = {k: v for k, v in (("dtype", dtype), ("attention", attention)) if v is not None}
        return cls(bundle_lib.load_bundle(path, **overrides), devices)

    @classmethod
    def from_pretrained(cls, model: str, base: str, *, null_embeddings: str | None = None,
                        lr_key_bug: bool | None = None, cache_dir: str | None = None, dtype: str | None = None,
                        attention: str | None = None, devices=None):
        """Released weights: MODEL (smfsr_q, dit4sr_r1, ...: a directory or a Hugging Face Hub id such as
        zw121/SMFSR/smfsr_q) with BASE (Stable Diffusion 3.5 Medium), converted once into the cache and loaded
        from it afterwards (weights/pretrained.py). null_embeddings: a directory with DiT4SR's NULL_*.pt;
        lr_key_bug: overrides the published name's."""
        from smfsr_jax.weights import pretrained  # huggingface_hub only for released weights
        overrides = {k: v for k, v in (("dtype", dtype), ("attention", attention)) if v is not None}
        return cls(pretrained.load_pretrained(model, base, null_embeddings=null_embeddings, lr_key_bug=lr_key_bug,
                                              cache_dir=cache_dir, **overrides), devices)

    @property
    def kind(self) -> str:
        return bundle_lib.transformer_kind(self.transformer_config)

    def resolve(self, settings: SRSettings) -> SRSettings:
        """`settings` resolved for this model (SRSettings.resolve with its configs, trained tile and text length)."""
        return settings.resolve(self.transformer_config, self.autoencoder_config, self.trained_tile,
                                self.null_embeddings[0].shape[0])

    @property
    def trained_tile(self) -> int | None:
        """The latent side the network was trained on (written by training), the default tile."""
        return self.meta.get("tile_size")

    # ------------------------------------------------------------------------------------------- text

    def _encode(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        if prompt not in self._embedding_cache:
            t5_length = self.null_embeddings[0].shape[0] - text.CLIP_MAX_LENGTH
            if t5_length < 1:
                raise ValueError(f"the NULL embeddings have {self.null_embeddings[0].shape[0]} tokens; captions need "
                                 f"{text.CLIP_MAX_LENGTH} CLIP + n T5 tokens to match them")
            if self._text_encoders is None:
                from smfsr_jax.convert.text import load_text_encoders
                self._text_encoders = load_text_encoders(self.text_encoders_dir)
            prompt_embeds, pooled = text.encode_prompts(self._text_encoders, [prompt], t5_length)
            self._embedding_cache[prompt] = (np.asarray(prompt_embeds[0]), np.asarray(pooled[0]))
        return self._embedding_cache[prompt]

    def caption_embeddings(self, caption: str | None, caption_rule: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds, pooled) of a caption; NULL for None, and (with a warning, once) without text encoders."""
        if caption is None:
            return self.null_embeddings
        if self.text_encoders_dir is None:
            if not self._warned_no_encoders:
                log.warning("captions need text encoders in the bundle; using the NULL embeddings instead")
                self._warned_no_encoders = True
            return self.null_embeddings
        return self._encode(text.postprocess_caption(caption) if caption_rule else caption)

    def negative_embeddings_or_null(self) -> tuple[np.ndarray, np.ndarray]:
        """CFG's unconditional text: stored negative embeddings, else the encoded negative prompt, else NULL."""
        if self.negative_embeddings is not None:
            return self.negative_embeddings
        if self.text_encoders_dir is not None:
            return self._encode(text.NEGATIVE_PROMPT)
        return self.null_embeddings

    def condition(self, captions, caption_rule: bool, guided: bool) -> dict:
        """The text condition of a batch, one caption (or None) per image: {context, pooled} stacked, and with
        CFG the negative text broadcast to the batch."""
        embeddings = [self.caption_embeddings(caption, caption_rule) for caption in captions]
        cond = {samplers.CONTEXT: np.stack([e[0] for e in embeddings]),
                samplers.POOLED: np.stack([e[1] for e in embeddings])}
        if guided:
            negative = self.negative_embeddings_or_null()
            cond[samplers.NEGATIVE_CONTEXT] = np.broadcast_to(negative[0], cond[samplers.CONTEXT].shape)
            cond[samplers.NEGATIVE_POOLED] = np.broadcast_to(negative[1], cond[samplers.POOLED].shape)
        return cond
