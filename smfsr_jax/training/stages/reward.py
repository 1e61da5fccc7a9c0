"""Stage `student_reward` (stage 3): reward fine-tuning of the one-step student (docs/design.md#student_reward).

The student keeps its noise start, so K seeds of one LR image give K different outputs that rewards can rank.
One training step is one rollout batch: B LR images, K seeds each, all B·K samples sharded over `data`.

- `reward.method = "nft"` (DiffusionNFT through the average-velocity head, objectives/reward.py): the old
  policy θ_old draws the K one-step samples, the rewards become group-normalised advantages, and the
  student regresses on them at fresh (t, ε). θ_old lives in the step's model state (so a resume restores it)
  and moves toward θ at the start of every epoch of `reward.rollout_batches` steps:
  θ_old ← d θ_old + (1 − d) θ, d = min(old_decay.per_epoch · epoch, old_decay.max).
- `reward.method = "direct"`: −Σ w_k R_k of the student's own one-step samples, back-propagated exactly
  through the decoder and the rewards.
Both add λ_KL mean (u_θ − u_ref)² against the frozen starting student, and optionally the ISC term against
the teacher (`weights.isc`, needs init.teacher) and the stage-2 reconstruction term (`weights.rec`).

A held-out set (`holdout`: crops of the training size from a fixed eval split, fixed noise, K seeds) is scored
before training and every `holdout.every` steps: each reward's mean and spread, PSNR (Y) against HR,
cross-seed diversity (per-pixel std over seeds, 8-bit levels) and, with LPIPS weights, LPIPS to HR and
between seeds, so that a reward bought with fidelity or diversity shows.
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from smfsr_jax.convert import clipiqa as clipiqa_convert
from smfsr_jax.convert import converted_dir
from smfsr_jax.convert import lpips as lpips_convert
from smfsr_jax.convert import maniqa as maniqa_convert
from smfsr_jax.convert import musiq as musiq_convert
from smfsr_jax.core import files, flow, images
from smfsr_jax.core import mesh as mesh_lib
from smfsr_jax.data import degradation, pipeline
from smfsr_jax.models import attention, clipiqa, maniqa, mmdit, musiq, vae
from smfsr_jax.models import lpips as lpips_lib
from smfsr_jax.objectives import isc, reconstruction, reward, rewards
from smfsr_jax.training import lora as lora_lib
from smfsr_jax.training import sharding
from smfsr_jax.training.stages import batch as batch_lib
from smfsr_jax.training.stages import loading
from smfsr_jax.training.stages import stage as stage_lib

NAME = "student_reward"
PSNR_EPS = 1e-8  # as the evaluator's PSNR: identical images give 80 dB


# ---------------------------------------------------------------------------------------------
# Reward networks.

# The evaluator's no-reference networks: converter name -> (network module, converter module, published size).
IQA_NETWORKS = {"musiq": (musiq, musiq_convert, musiq.KONIQ), "maniqa": (maniqa, maniqa_convert, maniqa.PIPAL),
                "clipiqa": (clipiqa, clipiqa_convert, clipiqa.RN50)}


def load_network(network: str, path, lpips_net: str):
    """(network config, params) of a reward network's weights at `path`."""
    if network == "lpips":
        return lpips_convert.load_lpips_from(path, lpips_net)
    config_dict, params = converted_dir.load_converted_of(path, network)
    return IQA_NETWORKS[network][0].config_from_dict(config_dict), params


def abstract_network(network: str, lpips_net: str):
    """(network config, parameter shapes) of a reward network at its published size."""
    if network == "lpips":
        config = lpips_lib.LPIPSConfig(net=lpips_net)
        return config, lpips_convert.abstract_params(config)
    _, converter, preset = IQA_NETWORKS[network]
    return preset, converter.abstract_params(preset)


def network_path(config: ml_collections.ConfigDict, network: str):
    """reward.networks.<network>, else reward.weights_dir/<network> (the evaluator's --weights_dir layout)."""
    if config.networks.get(network):
        return config.networks[network]
    if config.get("weights_dir"):
        return os.path.join(config.weights_dir, network)
    return None


def load_rewards(config: ml_collections.ConfigDict, abstract: bool = False):
    """({name: RewardFn}, {name: frozen network params}) of the rewards weighted in config.reward.rewards.

    Every network's weights are located first, so one error names every missing file before anything loads.
    """
    names = [name for name, _ in config.rewards]
    rewards.check_names(names)
    specs = [rewards.REWARDS[name] for name in names]
    paths = {spec.name: network_path(config, spec.network) for spec in specs if spec.network}
    missing = [f"{name}: {path or 'no path'}" for name, path in paths.items()
               if not abstract and (path is None or not files.exists(path))]
    if missing:
        raise FileNotFoundError(
            "reward network weights not found (" + "; ".join(missing) + "): convert the published weights with "
            "python -m smfsr_jax.convert NETWORK --src FILE --dst DIR/NETWORK and pass --config.reward.weights_dir=DIR "
            "(or --config.reward.networks.NETWORK=PATH)")
    fns, params = {}, {}
    for spec in specs:
        network_config = None
        if spec.network:
            network_config, params[spec.name] = (abstract_network(spec.network, config.lpips_net) if abstract else
                                                 load_network(spec.network, paths[spec.name], config.lpips_net))
        fns[spec.name] = spec.make(network_config)
    return fns, params


# ---------------------------------------------------------------------------------------------
# Held-out crops.

def holdout_crops(config: ml_collections.ConfigDict, crop_size: int, scale: int) -> dict:
    """{"hr", "lr", "lr_up"} uint8 crops of the training size tiled from config.holdout's eval split, at most
    holdout.max_crops, in a fixed order."""
    data_dir = config.holdout.get("data_dir") or config.data.data_dir
    _, lrs, hrs = pipeline.eval_pairs(config.holdout.dataset, config.holdout.split, data_dir,
                                      config.holdout.image_size)
    crops = {"hr": [], "lr": []}
    lr_size = crop_size // scale
    for lr, hr in zip(lrs, hrs):
        for top in range(0, lr.shape[0] - lr_size + 1, lr_size):
            for left in range(0, lr.shape[1] - lr_size + 1, lr_size):
                crops["lr"].append(lr[top:top + lr_size, left:left + lr_size])
                crops["hr"].append(hr[scale * top:scale * (top + lr_size), scale * left:scale * (left + lr_size)])
    if not crops["lr"]:
        raise ValueError(f"holdout {config.holdout.dataset}/{config.holdout.split}: no image holds a "
                         f"{lr_size}-pixel LR crop")
    out = {k: np.stack(v[:config.holdout.max_crops]) for k, v in crops.items()}
    out["lr_up"] = np.stack([degradation.to_uint8(degradation.upsample_lr(lr.astype(np.float32) / 255.0, scale))
                             for lr in out["lr"]])
    return out


# ---------------------------------------------------------------------------------------------
# The stage.

def _student(config: ml_collections.ConfigDict, abstract: bool):
    """(student config, trainable, frozen student parts, lora, uncast base): the trainable set as it is, or
    (lora.rank > 0) LoRA adapters on its kernels matching lora.targets, the set itself frozen as `adapted` (kept
    in fp32: the adapters' small updates are added to it)."""
    student_config, trainable, own, base = loading.student_parts(config, abstract)
    parts = {"base": stage_lib.frozen_cast(base, config), "own": stage_lib.frozen_cast(own, config)}
    if not config.lora.rank:
        return student_config, trainable, parts, None, base
    adapters = lora_lib.init_lora(trainable, tuple(config.lora.targets), config.lora.rank,
                                  jax.random.PRNGKey(config.seed))
    parts["adapted"] = trainable
    lora = (config.lora.alpha, config.lora.rank)
    return student_config, {"lora": stage_lib.shapes(adapters) if abstract else adapters}, parts, lora, base


def network(config: ml_collections.ConfigDict, abstract: bool = False) -> stage_lib.Network:
    """The student alone (no teacher, reference, reward networks or LPIPS)."""
    ae_config, ae_params = loading.load_autoencoder(config.autoencoder, abstract)
    student_config, trainable, parts, lora, _ = _student(config, abstract)
    null = loading.null_embeddings(config.text, student_config, config.data, abstract)
    return stage_lib.Network(student_config, ae_config, trainable, {**parts, "autoencoder": ae_params, "null": null},
                             lora=lora)


def build(config: ml_collections.ConfigDict, abstract: bool = False) -> stage_lib.Stage:
    check_config(config, abstract)
    ae_config, ae_params = loading.load_autoencoder(config.autoencoder, abstract)
    student_config, trainable, parts, lora, base = _student(config, abstract)
    null = loading.null_embeddings(config.text, student_config, config.data, abstract)
    cast = lambda tree: stage_lib.frozen_cast(tree, config)  # noqa: E731
    reward_fns, reward_params = load_rewards(config.reward, abstract)
    frozen = {**parts, "reference": cast(trainable), "autoencoder": ae_params, "null": null,
              "rewards": reward_params}
    teacher_config = lpips_config = None
    if config.weights.isc:
        teacher_config, _, entries = loading.teacher_for_student(config, student_config, base, null, abstract)
        frozen.update({k: cast(v) for k, v in entries.items()})
    if config.weights.rec:
        lpips_config, frozen["lpips"] = loading.load_lpips(config.rec.lpips, abstract)
    model_state = {}
    if config.reward.method == "nft":
        old = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32) if abstract
                           else np.array(x, np.float32), trainable)
        # The loss does not see the train step: `rollouts` counts rollout batches, which fixes the epoch.
        model_state = {"old": old, "rollouts": jax.ShapeDtypeStruct((), jnp.int32) if abstract else np.int32(0)}
    loss_fn = make_loss(config, student_config, ae_config, reward_fns, lora, teacher_config, lpips_config)
    evaluate = None
    if not abstract and config.holdout.get("dataset"):
        crops = holdout_crops(config, config.data.degradation.crop_size, config.data.degradation.scale)
        evaluate = make_evaluate(config, student_config, ae_config, reward_fns, lora, crops)
    stage = stage_lib.Stage(NAME, student_config, trainable, frozen, loss_fn, ae_config, teacher_config,
                            model_state=model_state, evaluate=evaluate, evaluate_every=config.holdout.every, lora=lora)
    logging.info("%s: %s", NAME, stage_lib.describe(stage))
    return stage


def check_config(config: ml_collections.ConfigDict, abstract: bool = False):
    """ValueError naming the bad stage-3 option (input paths are not needed to build shapes)."""
    if config.reward.method not in reward.METHODS:
        raise ValueError(f"reward.method must be one of {reward.METHODS}, got {config.reward.method!r}")
    if not config.reward.rewards:
        raise ValueError("reward.rewards is empty: give (name, weight) pairs, e.g. (('musiq', 1.0),)")
    rewards.check_names([name for name, _ in config.reward.rewards])
    if config.reward.seeds < 2 and config.reward.method == "nft":
        raise ValueError("reward.seeds must be at least 2 for nft: advantages compare the seeds of one image")
    for name in ("reward.rollout_batches", "holdout.every"):
        section, field = name.split(".")
        if config[section][field] < 1:
            raise ValueError(f"{name} must be >= 1, got {config[section][field]}")
    if config.weights.isc and not config.init.get("teacher") and not abstract:
        raise ValueError("weights.isc > 0 needs --config.init.teacher (the ISC boundary term's teacher); "
                         "or set --config.weights.isc=0")


def old_policy_decay(rollouts, config: ml_collections.ConfigDict):
    """d of θ_old ← d θ_old + (1 − d) θ at the start of the epoch that rollout batch `rollouts` opens."""
    epoch = (rollouts // config.rollout_batches).astype(jnp.float32)
    return jnp.minimum(config.old_decay.per_epoch * epoch, config.old_decay.max)


def make_loss(config, student_config: mmdit.MMDiTConfig, ae_config: vae.VAEConfig, reward_fns: dict, lora=None,
              teacher_config=None, lpips_config=None):
    """The loss_fn (state.LossFn) of the configured method (module docstring)."""
    student = mmdit.MMDiT(student_config)
    autoencoder = vae.make_autoencoder(ae_config)
    score = rewards.combined(reward_fns)
    rc, weights = config.reward, dict(config.reward.rewards)
    seeds = rc.seeds
    sg = jax.lax.stop_gradient
    if teacher_config is not None:
        teacher = mmdit.MMDiT(teacher_config)
        isc.check_options(**batch_lib.isc_options(config.isc))

    def loss_fn(trainable, model_state, frozen, batch, rng):
        keys = dict(zip(("latents", "rollout", "nft", "isc", "rec"), jax.random.split(rng, 5)))
        hr, lr = batch_lib.batch_latents(ae_config, frozen, batch, keys["latents"])
        context, pooled = batch_lib.text_condition(frozen, batch, hr.shape[0])
        repeat = lambda x: jnp.repeat(x, seeds, axis=0)  # noqa: E731  image-major: rows b*K .. b*K+K-1
        conditioning = dict(context=repeat(context), pooled=repeat(pooled), lr_latents=repeat(lr))
        seeded = {"hr": repeat(batch["hr"]), "lr": repeat(batch["lr"])}

        def u_of(weights_, cond=conditioning):
            return mmdit.average_velocity(student, stage_lib.model_weights(weights_, frozen, lora), **cond)

        def decode(z):
            return autoencoder.apply({"params": sg(frozen["autoencoder"])}, vae.denormalize_latents(z, ae_config),
                                     method="decode")

        u_ref = u_of(sg(frozen["reference"]))
        noise = jax.random.normal(keys["rollout"], (hr.shape[0] * seeds, *hr.shape[1:]), hr.dtype)
        metrics, new_state = {}, model_state
        if rc.method == "nft":
            rollouts = model_state["rollouts"]
            decay = old_policy_decay(rollouts, rc)
            refresh = (rollouts % rc.rollout_batches == 0) & (rollouts > 0)
            old = jax.tree.map(lambda o, p: jnp.where(refresh, decay * o + (1 - decay) * sg(p), o),
                               model_state["old"], trainable)
            u_old = u_of(old)
            x0 = sg(flow.one_step(u_old, noise))
            samples = sg(decode(x0))
            scores = score(frozen["rewards"], samples, seeded)
            advantage, optimality = reward.group_advantages(
                {k: v.reshape(-1, seeds) for k, v in scores.items()}, weights, std=rc.advantage_std, clip=rc.clip)
            loss, metrics = reward.nft_regression(u_of(trainable), u_old, u_ref, x0, optimality.reshape(-1),
                                                  keys["nft"], p_one=rc.p_t_one, beta=rc.beta, clip=rc.clip,
                                                  kl_weight=rc.kl_weight)
            metrics.update(advantage_abs_mean=jnp.abs(advantage).mean(), optimality_mean=optimality.mean(),
                           old_decay=jnp.where(refresh, decay, 0.0))
            new_state = {"old": old, "rollouts": rollouts + 1}
        else:
            zero, one = jnp.zeros(noise.shape[:1]), jnp.ones(noise.shape[:1])
            u = u_of(trainable)(noise, zero, one)
            reward_loss, scores, samples = reward.direct_reward_loss(
                noise - u, decode, lambda x: score(frozen["rewards"], x, seeded), weights)
            kl = jnp.mean(jnp.square(u - sg(u_ref(noise, zero, one))))
            loss = reward_loss + rc.kl_weight * kl
            metrics = {"reward_loss": reward_loss, "kl": kl}
        for name, value in scores.items():
            per_image = value.reshape(-1, seeds)
            metrics[f"reward/{name}"] = value.mean()
            metrics[f"reward/{name}_seed_std"] = per_image.std(axis=1).mean()
        metrics["rollout_diversity"] = seed_diversity(sg(samples), seeds)

        if config.weights.isc:
            u_student = u_of(trainable, dict(context=context, pooled=pooled, lr_latents=lr))
            teacher_params = sg(stage_lib.teacher_params(frozen))
            teacher_fn = mmdit.velocity(teacher, teacher_params, context=context, pooled=pooled, lr_latents=lr)
            isc_loss, isc_metrics = isc.isc_loss(u_student, teacher_fn, hr, keys["isc"],
                                                 p_boundary=config.isc.p_boundary, per_sample=config.isc.per_sample,
                                                 **batch_lib.isc_options(config.isc))
            loss = loss + config.weights.isc * isc_loss
            metrics.update(isc_loss=isc_loss, boundary_fraction=isc_metrics["boundary_fraction"])
        if config.weights.rec:
            if rc.method == "direct":
                own_samples = samples
            else:
                own_samples = decode(flow.one_step(u_of(trainable), jax.random.normal(keys["rec"], noise.shape)))
            lpips_model = lpips_lib.LPIPS(lpips_config)
            lpips_fn = lambda a, b: lpips_model.apply({"params": sg(frozen["lpips"])}, a, b)  # noqa: E731
            rec_loss, rec_metrics = reconstruction.reconstruction_loss(own_samples, images.to_signed(seeded["hr"]),
                                                                       lpips_fn, config.rec.lpips_weight)
            loss = loss + config.weights.rec * rec_loss
            metrics.update(rec_metrics)
        metrics["loss"] = loss
        return loss, (metrics, new_state)

    return loss_fn


def seed_diversity(samples, seeds: int):
    """Mean over pixels of the per-pixel standard deviation across the K seeds of each image, in 8-bit levels."""
    unit = images.signed_to_unit(samples)
    return 255.0 * unit.reshape(-1, seeds, *unit.shape[1:]).std(axis=1).mean()


# ---------------------------------------------------------------------------------------------
# Held-out evaluation.

def holdout_function(config, student_config: mmdit.MMDiTConfig, ae_config: vae.VAEConfig, reward_fns: dict, lora,
                     lpips_config, mesh):
    """jitted (trainable, frozen, crops, lpips_weights) -> {"holdout/...": scalar}, the scores replicated over
    `mesh`. The crops x seeds samples are split over the mesh (no device repeats another's work)."""
    student = mmdit.MMDiT(student_config)
    autoencoder = vae.make_autoencoder(ae_config)
    score = rewards.combined(reward_fns)
    seeds = config.holdout.seeds
    split = lambda x: jax.lax.with_sharding_constraint(x, mesh_lib.batch_sharding(mesh))  # noqa: E731

    def evaluate_crops(trainable, frozen, data, lpips_weights):
        rng = jax.random.PRNGKey(config.holdout.seed)
        rng_latents, rng_noise = jax.random.split(rng)
        lr = batch_lib.encode_images(ae_config, frozen["autoencoder"], data["lr_up"], rng_latents)
        context, pooled = batch_lib.text_condition(frozen, {}, lr.shape[0])
        repeat = lambda x: split(jnp.repeat(x, seeds, axis=0))  # noqa: E731
        params = stage_lib.model_weights(trainable, frozen, lora)
        u_fn = mmdit.average_velocity(student, params, context=repeat(context), pooled=repeat(pooled),
                                      lr_latents=repeat(lr))
        noise = split(jax.random.normal(rng_noise, (lr.shape[0] * seeds, *lr.shape[1:])))
        samples = autoencoder.apply({"params": frozen["autoencoder"]},
                                    vae.denormalize_latents(flow.one_step(u_fn, noise), ae_config), method="decode")
        samples = images.to_signed(images.from_signed(samples))  # scored as the saved 8-bit images
        seeded = {"hr": repeat(data["hr"]), "lr": repeat(data["lr"])}
        out = {}
        for name, value in score(frozen["rewards"], samples, seeded).items():
            out[f"holdout/{name}"] = value.mean()
            out[f"holdout/{name}_std"] = value.std()
        diff = images.luma(images.signed_to_unit(samples)) - images.luma(images.to_unit(seeded["hr"]))
        out["holdout/psnr"] = jnp.mean(10.0 * jnp.log10(1.0 / (jnp.mean(diff * diff, axis=(1, 2)) + PSNR_EPS)))
        out["holdout/diversity"] = seed_diversity(samples, seeds)
        if lpips_weights is not None:
            distance = functools.partial(lpips_lib.LPIPS(lpips_config).apply, {"params": lpips_weights})
            out["holdout/lpips"] = distance(samples, images.to_signed(seeded["hr"])).mean()
            by_image = samples.reshape(-1, seeds, *samples.shape[1:])
            shifted = jnp.roll(by_image, 1, axis=1).reshape(samples.shape)
            out["holdout/lpips_between_seeds"] = distance(samples, shifted).mean()
        return out

    def on_mesh(*args):
        with attention.batch_mesh(mesh):  # fused attention kernels run per device on the split samples
            return evaluate_crops(*args)

    return jax.jit(on_mesh, out_shardings=mesh_lib.replicated(mesh))


def make_evaluate(config, student_config: mmdit.MMDiTConfig, ae_config: vae.VAEConfig, reward_fns: dict, lora,
                  crops: dict):
    """evaluate(trainable, frozen, mesh) -> {"holdout/...": float} on the fixed held-out crops (module
    docstring); one compiled function, the crops placed (replicated) once."""
    lpips_config = lpips_params = None
    if config.holdout.get("lpips"):
        lpips_config, lpips_params = load_network("lpips", config.holdout.lpips, config.reward.lpips_net)
    placed = {}

    def evaluate(trainable, frozen, mesh) -> dict:
        if not placed:  # every process holds the replicated scores, so each can read them
            replicated = mesh_lib.replicated(mesh)
            replicate = lambda tree: sharding.put(tree, jax.tree.map(lambda _: replicated, tree))  # noqa: E731
            placed.update(data=replicate(crops), lpips=None if lpips_params is None else replicate(lpips_params),
                          compiled=holdout_function(config, student_config, ae_config, reward_fns, lora,
                                                    lpips_config, mesh))
        values = placed["compiled"](trainable, frozen, placed["data"], placed["lpips"])
        return {k: float(v) for k, v in jax.device_get(values).items()}

    return evaluate
