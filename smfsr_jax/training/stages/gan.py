"""Stage `student_gan` (stage 2): GAN refinement of the ISC student (SMFSR §3.3, Eq. 14-20).

One jitted step holds three trainable parts, each with its own AdamW (state.make_optimizer(parts=...)):
    student        control + interval embedding, on L_stu = ISC + Rec + VSD + 0.5 adv_G (Eq. 20);
    regularizer    a trainable copy of the teacher's control weights (or LoRA adapters on them), on Eq. 16;
    discriminator  the heads on frozen DINOv3 features, on the hinge loss (Eq. 18).
All three losses are taken from the same batch and the same pre-update student output; each term sees the
other parts under stop-gradient, so one gradient of their sum is exactly the three separate gradients (the
test checks that every term reaches only its own part). The discriminator's spectral-norm vectors are the
step's model state, updated once per step on the real batch.
"""

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from smfsr_jax.core import flow, images
from smfsr_jax.models import dinov3
from smfsr_jax.models import discriminator as disc_lib
from smfsr_jax.models import lpips as lpips_lib
from smfsr_jax.models import mmdit, vae
from smfsr_jax.objectives import adversarial, isc, reconstruction, vsd
from smfsr_jax.training import lora, partition
from smfsr_jax.training.stages import batch as batch_lib
from smfsr_jax.training.stages import loading
from smfsr_jax.training.stages import stage as stage_lib

NAME = "student_gan"
PARTS = ("student", "regularizer", "discriminator")


def load_discriminator(config: ml_collections.ConfigDict, seed: int, abstract: bool = False):
    """(DiscriminatorConfig, frozen DINOv3 params, head params, spectral state)."""
    if abstract:
        backbone_config = dinov3.DINOv3Config.tiny() if config.get("random_init") else dinov3.DINOv3Config.vits16()
        backbone_params = dinov3.abstract_params(backbone_config)
    elif config.get("backbone"):
        from smfsr_jax.convert.dinov3 import load_dinov3
        backbone_config, backbone_params = load_dinov3(config.backbone)
    elif config.get("random_init"):
        backbone_config = dinov3.DINOv3Config.tiny()
        pixels = jnp.zeros((1, 32, 32, 3))
        backbone_params = jax.device_get(dinov3.DINOv3ViT(backbone_config).init(jax.random.PRNGKey(2), pixels)["params"])
    else:
        raise ValueError("disc.backbone is required (python -m smfsr_jax.convert dinov3 ...); "
                         "disc.random_init=True is for tiny runs without pretrained weights")
    resolution = config.resolution if config.resolution == "native" else int(config.resolution)
    disc_config = disc_lib.DiscriminatorConfig(backbone=backbone_config, blocks=tuple(config.blocks),
                                               resolution=resolution, group_size=config.group_size,
                                               diffaugment=tuple(config.diffaugment))
    size = 64 if resolution == "native" else resolution

    def init(backbone):
        features = disc_lib.backbone_features(backbone, jnp.zeros((2, size, size, 3)), disc_config,
                                              rng=jax.random.PRNGKey(0))
        return disc_lib.Discriminator(disc_config).init(jax.random.PRNGKey(seed + 3), features)

    variables = jax.eval_shape(init, backbone_params) if abstract else jax.device_get(init(backbone_params))
    return disc_config, backbone_params, variables["params"], {"spectral": variables["spectral"]}


def regularizer_parts(teacher_params: dict, teacher_config: mmdit.MMDiTConfig, config: ml_collections.ConfigDict):
    """(trainable, frozen-own) of the regularizer: the teacher's control weights as a trainable copy, or
    LoRA adapters on the control linears with the depthwise control conv trainable."""
    control, _ = partition.partition(teacher_params, ("control",))
    exclude = stage_lib.unused_keys(teacher_config)
    if config.mode == "full":
        return partition.partition(control, ("control",), exclude)
    if config.mode != "lora":
        raise ValueError(f"regularizer.mode must be 'full' or 'lora', got {config.mode!r}")
    targets = ["to_q_control", "to_v_control", "to_out_control"] + ([] if exclude else ["to_k_control"])
    conv, linears = partition.partition(control, ("control_conv",))
    adapters = lora.init_lora(linears, targets, config.lora_rank, jax.random.PRNGKey(config.get("seed", 0)))
    return {"lora": adapters, "conv": conv}, {"linears": linears}


def regularizer_control(trainable: dict, frozen_own: dict, config: ml_collections.ConfigDict) -> dict:
    """The regularizer's control weights from its trainable and frozen parts."""
    if config.mode == "full":
        return partition.merge(trainable, frozen_own)
    linears = lora.apply_lora(frozen_own["linears"], trainable["lora"], config.lora_rank, config.lora_rank)
    return partition.merge(linears, trainable["conv"])


def network(config: ml_collections.ConfigDict, abstract: bool = False) -> stage_lib.Network:
    """The student alone (no teacher, LPIPS or discriminator)."""
    return loading.student_network(config, abstract, part="student")


def build(config: ml_collections.ConfigDict, abstract: bool = False) -> stage_lib.Stage:
    ae_config, ae_params = loading.load_autoencoder(config.autoencoder, abstract)
    student_config, student_trainable, student_own, base = loading.student_parts(config, abstract)
    null = loading.null_embeddings(config.text, student_config, config.data, abstract)
    teacher_config, teacher_params, teacher_entries = loading.teacher_for_student(config, student_config, base, null,
                                                                                  abstract)
    reg_trainable, reg_frozen = regularizer_parts(teacher_params, teacher_config, config.regularizer)
    if abstract:
        reg_trainable = stage_lib.shapes(reg_trainable)
    lpips_config, lpips_params = loading.load_lpips(config.rec.lpips, abstract)
    disc_config, dino_params, heads, spectral = load_discriminator(config.disc, config.seed, abstract)
    cast = lambda tree: stage_lib.frozen_cast(tree, config)  # noqa: E731
    frozen = {"base": cast(base), "own": cast(student_own), **{k: cast(v) for k, v in teacher_entries.items()},
              "regularizer": cast(reg_frozen), "autoencoder": ae_params, "lpips": lpips_params,
              "dinov3": dino_params, "null": null}
    trainable = {"student": student_trainable, "regularizer": reg_trainable, "discriminator": heads}
    losses = make_losses(config, student_config, teacher_config, ae_config, lpips_config, disc_config)
    stage = stage_lib.Stage(NAME, student_config, trainable, frozen, combine_losses(losses, config.weights),
                            ae_config, teacher_config, model_state=spectral, parts=PARTS, student_part="student")
    logging.info("%s: %s", NAME, stage_lib.describe(stage))
    return stage


def combine_losses(losses, weights: ml_collections.ConfigDict):
    """The stage-2 loss_fn (state.LossFn): Eq. 20 for the student plus the regularizer and D losses."""

    def loss_fn(params, model_state, frozen, batch, rng):
        terms, metrics, new_state = losses(params, model_state, frozen, batch, rng)
        student_loss = (weights.isc * terms["isc"] + weights.rec * terms["rec"] + weights.vsd * terms["vsd"]
                        + weights.adv * terms["adv_g"])
        total = student_loss + terms["regularizer"] + terms["disc"]
        metrics = dict(metrics, loss=total, student_loss=student_loss, **{f"{k}_term": v for k, v in terms.items()})
        return total, (metrics, new_state)

    return loss_fn


def make_losses(config, student_config, teacher_config, ae_config, lpips_config, disc_config):
    """(params, model_state, frozen, batch, rng) -> (terms, metrics, new model_state), each term a scalar."""
    isc.check_options(**batch_lib.isc_options(config.isc))
    student, teacher = mmdit.MMDiT(student_config), mmdit.MMDiT(teacher_config)
    autoencoder = vae.make_autoencoder(ae_config)
    lpips_model = lpips_lib.LPIPS(lpips_config)
    heads = disc_lib.Discriminator(disc_config)
    sg = jax.lax.stop_gradient

    def losses(params, model_state, frozen, batch, rng):
        keys = dict(zip(("latents", "noise", "isc", "vsd", "reg", "aug_fake", "aug_real"), jax.random.split(rng, 7)))
        hr, lr = batch_lib.batch_latents(ae_config, frozen, batch, keys["latents"])
        context, pooled = batch_lib.text_condition(frozen, batch, hr.shape[0])
        null_context, null_pooled = batch_lib.text_condition(frozen, {}, hr.shape[0])
        student_params = partition.merge(params["student"], frozen["base"], frozen["own"])
        teacher_params = sg(stage_lib.teacher_params(frozen))
        reg_control = regularizer_control(params["regularizer"], frozen["regularizer"], config.regularizer)
        teacher_time, _ = partition.partition(frozen["teacher"], (r"^time_text_embed/",))
        reg_params = partition.merge(frozen.get("teacher_base", frozen["base"]), teacher_time, reg_control)

        u_fn = mmdit.average_velocity(student, student_params, context=context, pooled=pooled, lr_latents=lr)

        def velocity(params_):
            return mmdit.velocity(teacher, params_, context=context, pooled=pooled, lr_latents=lr)

        twice = lambda a, b: jnp.concatenate([a, b])  # noqa: E731
        both_branches = mmdit.velocity(teacher, teacher_params, context=twice(null_context, context),
                                       pooled=twice(null_pooled, pooled), lr_latents=twice(lr, lr))

        def teacher_cfg_fn(z, t):  # both branches in one 2B batch
            v = both_branches(twice(z, z), twice(t, t))
            return flow.cfg_mix(*jnp.split(v, 2), config.vsd.cfg_scale)

        # Eq. 14: one-step generation from noise, decoded through the frozen decoder (unclamped).
        z_hat = flow.one_step(u_fn, jax.random.normal(keys["noise"], hr.shape, hr.dtype))
        x_hat = autoencoder.apply({"params": sg(frozen["autoencoder"])}, vae.denormalize_latents(z_hat, ae_config),
                                  method="decode")
        x = images.to_signed(batch["hr"])

        isc_loss, isc_metrics = isc.isc_loss(u_fn, velocity(teacher_params), hr, keys["isc"],
                                             p_boundary=config.isc.p_boundary, per_sample=config.isc.per_sample,
                                             **batch_lib.isc_options(config.isc))
        lpips_fn = lambda a, b: lpips_model.apply({"params": sg(frozen["lpips"])}, a, b)  # noqa: E731
        rec_loss, rec_metrics = reconstruction.reconstruction_loss(x_hat, x, lpips_fn, config.rec.lpips_weight)
        times = dict(t_min=config.vsd.t_min, t_max=config.vsd.t_max)
        vsd_loss_, vsd_metrics = vsd.vsd_loss(z_hat, teacher_cfg_fn, velocity(sg(reg_params)), keys["vsd"], **times)
        reg_loss, reg_metrics = vsd.regularizer_loss(velocity(reg_params), z_hat, keys["reg"], **times)

        fake_features = disc_lib.backbone_features(frozen["dinov3"], x_hat, disc_config, rng=keys["aug_fake"])
        fake_logits_g = heads.apply({"params": sg(params["discriminator"]), **model_state}, fake_features)
        real_features = disc_lib.backbone_features(frozen["dinov3"], x, disc_config, rng=keys["aug_real"])
        real_logits, new_state = heads.apply({"params": params["discriminator"], **model_state}, real_features,
                                             update_spectral_norm=True, mutable=["spectral"])
        fake_logits = heads.apply({"params": params["discriminator"], **new_state}, [sg(f) for f in fake_features])

        terms = {"isc": isc_loss, "rec": rec_loss, "vsd": vsd_loss_, "adv_g": adversarial.hinge_g_loss(fake_logits_g),
                 "regularizer": reg_loss, "disc": adversarial.hinge_d_loss(real_logits, fake_logits)}
        metrics = {**isc_metrics, **rec_metrics, **vsd_metrics, **reg_metrics,
                   "d_real_logit": real_logits.mean(), "d_fake_logit": fake_logits.mean()}
        return terms, metrics, dict(new_state)

    return losses
