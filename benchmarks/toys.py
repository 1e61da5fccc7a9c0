"""Known-answer problems for the ISC experiments (benchmarks/isc_toy.py): conditional distributions whose
truth can be sampled, so that a sampler's output can be compared with it.

- `modes`: per condition c ~ U(-1, 1)^2, four Gaussians in R^4 (weights 0.4/0.3/0.2/0.1, std 0.1), centres
  ~2 apart (20 std) that move together with c;
- `ring`: per condition c ~ U(-1, 1)^2, a circle in a plane of R^3 whose centre, radius (0.7-1.3) and phase
  move with c, the angle drawn with density 1 + 0.8 cos(theta - phase), std 0.05 around it: a curved,
  continuous conditional instead of separate blobs;
- `patches`: 8x8x3 HR patches of photographs conditioned on their x4 box-downscaled 2x2x3 LR, from the
  colour photographs scikit-image and gradio ship. Held-out patches are the truth; the distance is taken on
  the joint (LR, HR), so one real HR per LR suffices.

A toy draws training pairs (`train_pairs`) and evaluation cases (`cases`): the conditions to sample at, a
truth set and an independent twin of the truth at the same conditions (its distance to the truth is the
estimate's noise floor). `modes` and `ring` also sort samples into bins with known weights (mixture
components; 8 angular sectors) and flag samples more than 5 std from the support (`bins`).
"""

import dataclasses
import pathlib
from typing import Callable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.objectives.rewards import box_downscale

OFF_SUPPORT = 5.0  # stds from the support: a sample between modes, or off the ring


@dataclasses.dataclass(frozen=True)
class Case:
    """Evaluate by sampling at `cond`; compare (cond, samples) with `truth`; (cond, twin) is the floor."""
    cond: jax.Array
    truth: jax.Array
    twin: jax.Array


@dataclasses.dataclass(frozen=True)
class Toy:
    name: str
    dim: int
    cond_dim: int
    train_pairs: Callable  # (rng, batch) -> (cond, x)
    cases: Callable  # (seed, samples) -> List[Case]
    weights: Optional[np.ndarray] = None  # of the bins, where the toy has them
    bins: Optional[Callable] = None  # (cond, x) -> (bin index, off-support)


def _uniform_conditions(rng, batch, cond_dim):
    return jax.random.uniform(rng, (batch, cond_dim), minval=-1, maxval=1)


def _per_condition_cases(sample_at, cond_dim, conditions: int = 8):
    """Fixed test conditions (from the seed), `samples` draws each; truth and twin are independent draws."""
    def cases(seed, samples) -> List[Case]:
        points = np.random.default_rng(seed + 1).uniform(-1, 1, (conditions, cond_dim)).astype(np.float32)
        out = []
        for i, point in enumerate(points):
            cond = jnp.broadcast_to(jnp.asarray(point), (samples, cond_dim))
            rng_truth, rng_twin = jax.random.split(jax.random.PRNGKey(1000 * seed + 99 + i))
            out.append(Case(cond, jnp.concatenate([cond, sample_at(rng_truth, cond)], -1),
                            sample_at(rng_twin, cond)))
        return out
    return cases


def modes_toy() -> Toy:
    weights = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    dim, cond_dim, std = 4, 2, 0.1
    rng = np.random.default_rng(0)
    offsets = rng.normal(size=(len(weights), dim)).astype(np.float32)
    offsets *= 1.4 / np.linalg.norm(offsets, axis=1, keepdims=True)
    mix = (0.5 * rng.normal(size=(cond_dim, dim))).astype(np.float32)

    def centres(cond):
        return offsets[None] + (cond @ mix)[:, None]  # (B, K, D)

    def sample_at(rng, cond):
        rng_k, rng_e = jax.random.split(rng)
        k = jax.random.choice(rng_k, len(weights), (cond.shape[0],), p=jnp.asarray(weights))
        mu = jnp.take_along_axis(centres(cond), k[:, None, None], axis=1)[:, 0]
        return mu + std * jax.random.normal(rng_e, mu.shape)

    def train_pairs(rng, batch):
        rng_c, rng_x = jax.random.split(rng)
        cond = _uniform_conditions(rng_c, batch, cond_dim)
        return cond, sample_at(rng_x, cond)

    def bins(cond, x):
        dist = jnp.sqrt(jnp.sum(jnp.square(x[:, None] - centres(cond)), -1))
        return dist.argmin(1), dist.min(1) > OFF_SUPPORT * std

    return Toy("modes", dim, cond_dim, train_pairs, _per_condition_cases(sample_at, cond_dim), weights, bins)


def ring_toy() -> Toy:
    dim, cond_dim, std, skew, sectors = 3, 2, 0.05, 0.8, 8
    rng = np.random.default_rng(1)
    plane = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)  # columns: u1, u2, normal
    mix = (0.5 * rng.normal(size=(cond_dim, dim))).astype(np.float32)
    grid = np.linspace(0, 2 * np.pi, 4097, dtype=np.float64)
    cdf = grid + skew * np.sin(grid)  # integral of 1 + skew cos(theta), increasing for skew < 1
    edges = np.linspace(0, 2 * np.pi, sectors + 1)
    weights = (np.diff(edges + skew * np.sin(edges)) / (2 * np.pi)).astype(np.float32)

    def geometry(cond):
        return cond @ mix, 1.0 + 0.3 * cond[:, 0], np.pi * cond[:, 1]  # centre, radius, phase

    def sample_at(rng, cond):
        rng_a, rng_e = jax.random.split(rng)
        centre, radius, phase = geometry(cond)
        offset = jnp.interp(jax.random.uniform(rng_a, (cond.shape[0],), maxval=2 * np.pi), jnp.asarray(cdf),
                            jnp.asarray(grid))  # inverse CDF of the angle relative to the phase
        theta = phase + offset
        circle = (jnp.cos(theta)[:, None] * plane[:, 0] + jnp.sin(theta)[:, None] * plane[:, 1]) * radius[:, None]
        return centre + circle + std * jax.random.normal(rng_e, centre.shape)

    def train_pairs(rng, batch):
        rng_c, rng_x = jax.random.split(rng)
        cond = _uniform_conditions(rng_c, batch, cond_dim)
        return cond, sample_at(rng_x, cond)

    def bins(cond, x):
        centre, radius, phase = geometry(cond)
        local = (x - centre) @ plane  # (u1, u2, normal) coordinates
        in_plane = jnp.sqrt(jnp.sum(jnp.square(local[:, :2]), -1))
        away = jnp.sqrt(jnp.square(in_plane - radius) + jnp.square(local[:, 2]))
        angle = jnp.mod(jnp.arctan2(local[:, 1], local[:, 0]) - phase, 2 * np.pi)
        sector = jnp.minimum((angle / (2 * np.pi) * sectors).astype(jnp.int32), sectors - 1)
        return sector, away > OFF_SUPPORT * std

    return Toy("ring", dim, cond_dim, train_pairs, _per_condition_cases(sample_at, cond_dim), weights, bins)


PATCH, FACTOR = 8, 4
# Colour photographs installed with the requirements: scikit-image's data folder and gradio's media assets.
PHOTOGRAPH_PACKAGES = {"skimage": ("data", ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
                                            "ihc.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")),
                       "gradio": ("media_assets/images", ("bus.png", "cheetah.jpg", "lion.jpg", "tower.jpg"))}


def photographs() -> List[np.ndarray]:
    """The installed photographs as float32 HxWx3 in [-1, 1]; a package or file that is missing is left out."""
    import importlib.util

    from PIL import Image
    out = []
    for package, (folder, names) in PHOTOGRAPH_PACKAGES.items():
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        for name in names:
            path = pathlib.Path(spec.origin).parent / folder / name
            if path.is_file():
                out.append(np.asarray(Image.open(path).convert("RGB"), np.float32) / 127.5 - 1.0)
    if not out:
        raise FileNotFoundError(f"no photographs found in {sorted(PHOTOGRAPH_PACKAGES)}")
    return out


def patch_pool(per_photo: int = 4000, seed: int = 0) -> np.ndarray:
    """(N, 8*8*3) HR patches on each photograph's 8-pixel grid, at most `per_photo` of each."""
    rng = np.random.default_rng(seed)
    pools = []
    for photo in photographs():
        h, w = (s // PATCH for s in photo.shape[:2])
        grid = photo[:h * PATCH, :w * PATCH].reshape(h, PATCH, w, PATCH, 3).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(h * w, PATCH * PATCH * 3)
        pools.append(grid[rng.permutation(len(grid))[:per_photo]])
    return np.concatenate(pools)


def downscale(hr):
    """x4 box average of flattened 8x8x3 patches -> flattened 2x2x3."""
    lr = box_downscale(hr.reshape(-1, PATCH, PATCH, 3), FACTOR)
    return lr.reshape(lr.shape[0], -1)


def patches_toy(held_out: int = 2000) -> Toy:
    pool = patch_pool()
    order = np.random.default_rng(1).permutation(len(pool))
    # Two held-out sets per evaluation seed (up to 3 seeds); the rest trains.
    held = pool[order[:6 * held_out]].reshape(6, held_out, -1)
    train = jnp.asarray(pool[order[6 * held_out:]])
    lr_dim = downscale(pool[:1]).shape[1]

    def train_pairs(rng, batch):
        hr = train[jax.random.randint(rng, (batch,), 0, train.shape[0])]
        return downscale(hr), hr

    def cases(seed, samples) -> List[Case]:
        a, b = held[(2 * seed) % 6][:samples], held[(2 * seed + 1) % 6][:samples]
        cond = jnp.asarray(downscale(a))
        return [Case(cond, jnp.concatenate([downscale(b), b], -1), jnp.asarray(a))]

    return Toy("patches", pool.shape[1], lr_dim, train_pairs, cases)


TOYS = {"modes": modes_toy, "ring": ring_toy, "patches": patches_toy}
