"""Train state, optimizer and the jitted, sharded update step shared by every stage.

Only the trainable part of the parameters lives in the state (fp32 master weights + AdamW moments);
frozen parts (the SD3.5 base, the teacher, the autoencoder, NULL text embeddings) are a separate,
never-donated argument, so gradients and optimizer memory exist for trainable leaves only.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from smfsr_jax.core import mesh as mesh_lib
from smfsr_jax.models import attention
from smfsr_jax.training import sharding

# loss_fn(trainable params, model_state, frozen, batch, rng) -> (loss, (metrics dict of scalars, new model_state));
# model_state holds non-trained variables that the step updates (the discriminator's spectral-norm vectors).
LossFn = Callable[[Any, Any, Any, dict, jax.Array], tuple[jax.Array, tuple[dict, Any]]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    model_state: Any
    nonfinite_step: jax.Array  # first step whose loss or gradient was not finite; -1 while all are


def make_optimizer(config: ml_collections.ConfigDict, parts: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a constant learning rate, as the paper's recipe.

    With `parts` (the top-level keys of the trainable tree, e.g. stage 2's student, regularizer and
    discriminator) each part gets its own AdamW and its own clipping norm, as separate optimizers would.
    """
    def adamw():
        return optax.chain(
            optax.clip_by_global_norm(config.clip),
            optax.adamw(config.lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay))

    if not parts:
        return adamw()
    return optax.multi_transform({part: adamw() for part in parts},
                                 lambda params: {part: part for part in params})


def create_state(params, optimizer: optax.GradientTransformation, use_ema: bool, model_state=None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
                      model_state=model_state if model_state is not None else {},
                      nonfinite_step=jnp.full((), -1, jnp.int32))


def state_shardings(abstract_state: TrainState, mesh, rules=sharding.DEFAULT_RULES):
    """Moments follow the parameters' rule (same shapes); scalars are replicated."""
    return sharding.param_shardings(abstract_state, mesh, rules)


def init_state(params, optimizer, use_ema: bool, mesh, rules=sharding.DEFAULT_RULES, model_state=None):
    """Shape first, then shardings, then a jitted init: the state is born sharded.

    `params` (and `model_state`) are host (numpy) arrays; they are placed with their shardings before the
    optimizer init.
    """
    model_state = {} if model_state is None else model_state
    create = lambda p, m: create_state(p, optimizer, use_ema, m)  # noqa: E731
    abstract = jax.eval_shape(create, params, model_state)
    shardings = state_shardings(abstract, mesh, rules)
    params = sharding.put(params, shardings.params)
    model_state = sharding.put(model_state, shardings.model_state)
    state = jax.jit(create, out_shardings=shardings)(params, model_state)
    return state, shardings


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree) if jax.tree.leaves(tree) else jnp.zeros(())


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, seed: int,
                    ema_decay: float | None = None) -> Callable:
    """update(state, frozen, batch) -> (state, metrics), rng = fold_in(PRNGKey(seed), step)."""
    base_rng = jax.random.PRNGKey(seed)

    def update(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(base_rng, state.step)
        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, frozen, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
        ema = state.ema_params
        if ema_decay is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        metrics = dict(metrics, grad_norm=grad_norm, param_norm=global_norm(params),
                       update_norm=global_norm(updates), first_nonfinite_step=nonfinite_step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                                  model_state=model_state, nonfinite_step=nonfinite_step)
        return new_state, metrics

    return update


def jit_train_step(update: Callable, state_shardings_, frozen_shardings, mesh):
    """jit with explicit shardings; the state is donated, the frozen tree is not."""
    def update_on_mesh(state, frozen, batch):
        with attention.batch_mesh(mesh):  # fused attention kernels run per device on the batch's split
            return update(state, frozen, batch)

    return jax.jit(update_on_mesh, in_shardings=(state_shardings_, frozen_shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(state_shardings_, mesh_lib.replicated(mesh)), donate_argnums=(0,))
