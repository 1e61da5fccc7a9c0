"""SD3 / SMFSR time grids, used by training (the teacher's σ grid) and sampling: flow times in [0, 1]
(1 = noise), descending, ending at 0.

- `cosine_grid(N)`: the SMFSR student's t_k = ½(1 − cos(πk/N)), k = N…0 (SMFSR `create_cosine_schedule`, flipped).
- `sd3_sampling_sigmas(N)`: the teacher's grid, diffusers `FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(N)`
  `.sigmas`, including its double shift of the small end and the appended 0. The teacher network gets τ = 1000·σ
  through its config's `time_scale`.
"""

import numpy as np

SD3_SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000


def cosine_grid(steps: int) -> np.ndarray:
    """(steps + 1,) float32 from 1 down to 0: N = 1 -> (1, 0); N = 2 -> (1, 0.5, 0); N = 4 -> (1, .854, .5, .146, 0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    # float32 throughout, as the torch original (linspace, cos and the affine map in float32)
    s = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    grid = np.float32(0.5) * (np.float32(1.0) - np.cos(np.float32(np.pi) * s))
    return grid[::-1].astype(np.float32)


def shift_sigmas(sigmas, shift: float = SD3_SHIFT):
    """SD3's time shift σ ↦ shift·σ / (1 + (shift − 1)·σ), in the dtype of `sigmas`."""
    sigmas = np.asarray(sigmas)
    shift = sigmas.dtype.type(shift)
    return shift * sigmas / (sigmas.dtype.type(1.0) + (shift - sigmas.dtype.type(1.0)) * sigmas)


def sd3_training_sigmas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = SD3_SHIFT) -> np.ndarray:
    """The scheduler's descending training grid shift((N - i) / N), i = 0..N-1, in float32 as diffusers builds it
    (no terminal zero); the teacher's flow-matching times are drawn from it."""
    timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
    return shift_sigmas(timesteps / np.float32(num_train_timesteps), shift)


def sd3_sampling_sigmas(steps: int, shift: float = SD3_SHIFT,
                        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """(steps + 1,) float32: diffusers' `set_timesteps(steps)` sigmas with the terminal 0.

    The scheduler's σ_min is the *shifted* last training sigma, shift(1/1000) ≈ 0.002994 (float32). set_timesteps
    spaces timesteps linearly from 1000·σ_max to 1000·σ_min in float64 and shifts them again, so the smallest
    non-zero σ is shift(shift(0.001)) ≈ 0.00893. Reproduced for teacher parity.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    train_sigmas = sd3_training_sigmas(num_train_timesteps, shift)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    timesteps = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps)
    sigmas = shift_sigmas(timesteps / num_train_timesteps, shift).astype(np.float32)
    return np.append(sigmas, np.float32(0.0))
