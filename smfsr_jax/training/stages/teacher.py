"""Stage `teacher_fm` (stage 0): DiT4SR's LR-conditioned flow-matching teacher.

Initial weights: an SD3.5-M base in any layout (given the LR stream by `teacher_from_base` when it has none),
or random weights for tiny runs. Loss: `flow_matching.teacher_fm_loss` (config.flow_matching).
"""

import jax
import ml_collections
import numpy as np

from smfsr_jax.convert import tensors
from smfsr_jax.models import mmdit, vae
from smfsr_jax.objectives import flow_matching
from smfsr_jax.training import partition
from smfsr_jax.training.stages import batch as batch_lib
from smfsr_jax.training.stages import loading
from smfsr_jax.training.stages import stage as stage_lib

NAME = "teacher_fm"


def teacher_from_base(base_config: mmdit.MMDiTConfig, base_params: dict):
    """SD3.5 weights + the LR stream: control q/k/v and conv start at zero, `to_out_control` as a copy of
    `to_out`, so the teacher starts as the base with the LR tokens attending but contributing nothing."""
    if base_config.lr_stream:
        raise ValueError("the base already has an LR stream")
    cfg = base_config.replace(lr_stream=True)
    flat = tensors.flatten(base_params)
    out = {}
    for path, leaf in tensors.flatten(mmdit.abstract_params(cfg)).items():
        if path in flat:
            out[path] = np.asarray(flat[path])
        elif "/to_out_control/" in path:
            out[path] = np.array(flat[path.replace("/to_out_control/", "/to_out/")])
        else:
            out[path] = np.zeros(leaf.shape, leaf.dtype)
    return cfg, tensors.unflatten(out)


def initial_weights(config: ml_collections.ConfigDict, abstract: bool = False):
    """(MMDiTConfig, params) the teacher starts from."""
    if abstract:
        model_config = mmdit.MMDiTConfig.from_dict(config.model.to_dict())
        return model_config, loading.random_params(model_config, config.seed, abstract=True)
    if config.init.get("base"):
        base_config, params = loading.load_transformer(config.init.base, config)
        if not base_config.lr_stream:
            base_config, params = teacher_from_base(base_config, params)
        return stage_lib.runtime_config(base_config, config.model), params
    if config.init.get("random"):
        model_config = mmdit.MMDiTConfig.from_dict(config.model.to_dict())
        return model_config, loading.random_params(model_config, config.seed)
    raise ValueError("the teacher needs initial weights: set --config.init.base (SD3.5-M in any layout) "
                     "or --config.init.random=True")


def network(config: ml_collections.ConfigDict, abstract: bool = False) -> stage_lib.Network:
    ae_config, ae_params = loading.load_autoencoder(config.autoencoder, abstract)
    model_config, params = initial_weights(config, abstract)
    trainable, frozen_model = stage_lib.split(params, config, model_config)
    return stage_lib.Network(model_config, ae_config, trainable, {
        "base": stage_lib.frozen_cast(frozen_model, config), "own": {}, "autoencoder": ae_params,
        "null": loading.null_embeddings(config.text, model_config, config.data, abstract)})


def build(config: ml_collections.ConfigDict, abstract: bool = False) -> stage_lib.Stage:
    net = network(config, abstract)
    return stage_lib.Stage(NAME, net.model_config, net.trainable, net.frozen,
                           make_loss(config, net.model_config, net.autoencoder_config), net.autoencoder_config)


def make_loss(config, model_config: mmdit.MMDiTConfig, ae_config: vae.VAEConfig):
    """The loss_fn (state.LossFn): flow matching (config.flow_matching) on the batch's HR latents."""
    model = mmdit.MMDiT(model_config)
    fm = config.flow_matching
    flow_matching.check_options(fm.loss, fm.sigma_sampler)

    def loss_fn(trainable_params, model_state, frozen, batch, rng):
        rng_latents, rng_loss = jax.random.split(rng)
        hr, lr = batch_lib.batch_latents(ae_config, frozen, batch, rng_latents)
        context, pooled = batch_lib.text_condition(frozen, batch, hr.shape[0])
        params = partition.merge(trainable_params, frozen["base"], frozen["own"])
        velocity = mmdit.velocity(model, params, context=context, pooled=pooled, lr_latents=lr)
        loss, metrics = flow_matching.teacher_fm_loss(velocity, hr, rng_loss, loss=fm.loss,
                                                      sigma_sampler=fm.sigma_sampler, shift=fm.shift)
        return loss, (metrics, model_state)

    return loss_fn
