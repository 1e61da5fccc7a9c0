"""Experiment with a known answer: does ISC turn a flow-matching teacher into a one-step student?

Data: per condition c ~ U(-1, 1)^2, a mixture of four well separated Gaussians in R^4 whose centres move
with c (weights 0.4/0.3/0.2/0.1, std 0.1). A small MLP teacher is trained with the project's
`teacher_fm_loss`; a student that starts as the teacher (its interval input has zero weights) is trained with
the project's `isc_loss`. Both are sampled with the project's Euler sampler (teacher on the SD3 grid, student
on the cosine grid) for fixed test conditions and compared with ground-truth samples:
- energy distance (2E|X-Y| - E|X-X'| - E|Y-Y'|, mean over conditions; `floor` is the same between two
  ground-truth sets, the sampling noise of the estimate);
- mode balance: total variation between the nearest-centre histogram and the true weights, the number of
  modes holding at least half their weight, and the fraction of samples farther than 5 std from every centre.

  python benchmarks/isc_toy.py                                   # recommended settings, about a minute
  python benchmarks/isc_toy.py --compare samplers                # every ISC time sampler, one teacher
  python benchmarks/isc_toy.py --compare teacher                 # every teacher objective
  python benchmarks/isc_toy.py --teacher_loss x0 --sigma_sampler sd3 --anchor_prob 0 --boundary_time max

Prints a Markdown table and, last, one JSON line.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from smfsr_jax.models.mmdit import timestep_sinusoid  # noqa: E402
from smfsr_jax.objectives import flow_matching, isc  # noqa: E402
from smfsr_jax.core import schedules  # noqa: E402
from smfsr_jax.sampling import samplers  # noqa: E402
from smfsr_jax.training import state as state_lib  # noqa: E402

DIM, COND_DIM, STD = 4, 2, 0.1
WEIGHTS = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
TEACHER_STEPS, STUDENT_STEPS = (1, 2, 4, 50), (1, 2, 4)
OFF_MODE = 5.0  # stds from every centre


def make_problem(seed: int = 0):
    """Centres m_k + B c: the modes sit ~2 apart (20 std), and every condition moves them together."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(size=(len(WEIGHTS), DIM)).astype(np.float32)
    offsets *= 1.4 / np.linalg.norm(offsets, axis=1, keepdims=True)
    mix = (0.5 * rng.normal(size=(COND_DIM, DIM))).astype(np.float32)
    return jnp.asarray(offsets), jnp.asarray(mix)


def centres(problem, cond):
    offsets, mix = problem
    return offsets[None] + (cond @ mix)[:, None]  # (B, K, D)


def sample_data(problem, rng, cond):
    rng_k, rng_e = jax.random.split(rng)
    k = jax.random.choice(rng_k, len(WEIGHTS), (cond.shape[0],), p=jnp.asarray(WEIGHTS))
    mu = jnp.take_along_axis(centres(problem, cond), k[:, None, None], axis=1)[:, 0]
    return mu + STD * jax.random.normal(rng_e, mu.shape)


class VelocityMLP(nn.Module):
    """v(z, t | c), or u(z, r, t | c) when `interval`: the interval input t - r enters through its own
    zero-initialised projection, so a student copied from the teacher equals it for every r."""
    interval: bool = False
    width: int = 256
    depth: int = 4

    @nn.compact
    def __call__(self, z, cond, t, r=None):
        h = nn.Dense(self.width, name="in_z")(jnp.concatenate([z, cond], -1))
        h = h + nn.Dense(self.width, name="in_t")(timestep_sinusoid(1000 * t, 64))
        if self.interval:
            h = h + nn.Dense(self.width, kernel_init=nn.initializers.zeros, name="in_interval")(
                timestep_sinusoid(1000 * (t - r), 64))
        for i in range(self.depth - 1):
            h = nn.Dense(self.width, name=f"hidden_{i}")(nn.silu(h))
        return nn.Dense(DIM, name="out")(nn.silu(h))


def optimizer(lr: float):
    return state_lib.make_optimizer(ml_collections.ConfigDict(dict(lr=lr, b1=0.9, b2=0.999, eps=1e-8,
                                                                   weight_decay=0.0, clip=1.0)))


def train(loss_of, params, steps: int, lr: float, seed: int, chunk: int = 250):
    """Adam on loss_of(params, rng), `chunk` steps per jitted scan; an EMA (0.999) of the weights is returned."""
    opt = optimizer(lr)

    @jax.jit
    def run(carry, keys):
        def step(carry, key):
            params, ema, opt_state = carry
            grads = jax.grad(loss_of)(params, key)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = jax.tree.map(jnp.add, params, updates)
            ema = jax.tree.map(lambda e, p: 0.999 * e + 0.001 * p, ema, params)
            return (params, ema, opt_state), None
        return jax.lax.scan(step, carry, keys)[0]

    carry = (params, params, opt.init(params))
    keys = jax.random.split(jax.random.PRNGKey(seed), steps)
    for start in range(0, steps, chunk):
        carry = run(carry, keys[start:start + chunk])
    return carry[1]


@dataclasses.dataclass
class Settings:
    teacher_loss: str = "velocity"
    sigma_sampler: str = "uniform"
    time_sampler: str = isc.DEFAULT_TIMES["time_sampler"]
    anchor_prob: float = isc.DEFAULT_TIMES["anchor_prob"]
    anchor: str = isc.DEFAULT_TIMES["anchor"]
    boundary_time: str = isc.DEFAULT_TIMES["boundary_time"]
    p_boundary: float = 0.6
    teacher_steps: int = 4000
    student_steps: int = 4000
    batch: int = 256
    lr: float = 1e-3

    def isc_times(self):
        return dict(time_sampler=self.time_sampler, anchor_prob=self.anchor_prob, anchor=self.anchor,
                    boundary_time=self.boundary_time)


def train_teacher(problem, s: Settings, seed: int = 0):
    model = VelocityMLP()
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, DIM)), jnp.zeros((1, COND_DIM)), jnp.zeros(1))

    def loss_of(params, rng):
        rng_c, rng_x, rng_loss = jax.random.split(rng, 3)
        cond = jax.random.uniform(rng_c, (s.batch, COND_DIM), minval=-1, maxval=1)
        x0 = sample_data(problem, rng_x, cond)
        velocity = lambda z, t: model.apply(params, z, cond, t)  # noqa: E731
        return flow_matching.teacher_fm_loss(velocity, x0, rng_loss, loss=s.teacher_loss,
                                             sigma_sampler=s.sigma_sampler)[0]

    return train(loss_of, params, s.teacher_steps, s.lr, seed)


def student_from_teacher(teacher_params, seed: int = 0):
    student = VelocityMLP(interval=True)
    shapes = student.init(jax.random.PRNGKey(seed), jnp.zeros((1, DIM)), jnp.zeros((1, COND_DIM)), jnp.zeros(1),
                          jnp.zeros(1))
    params = {"params": {**teacher_params["params"], "in_interval": shapes["params"]["in_interval"]}}
    return params


def train_student(problem, teacher_params, s: Settings, seed: int = 0):
    teacher, student = VelocityMLP(), VelocityMLP(interval=True)
    params = student_from_teacher(teacher_params, seed)

    def loss_of(params, rng):
        rng_c, rng_x, rng_loss = jax.random.split(rng, 3)
        cond = jax.random.uniform(rng_c, (s.batch, COND_DIM), minval=-1, maxval=1)
        x0 = sample_data(problem, rng_x, cond)
        u_fn = lambda z, r, t: student.apply(params, z, cond, t, r)  # noqa: E731
        teacher_fn = lambda z, t: teacher.apply(teacher_params, z, cond, t)  # noqa: E731
        return isc.isc_loss(u_fn, teacher_fn, x0, rng_loss, p_boundary=s.p_boundary, **s.isc_times())[0]

    return train(loss_of, params, s.student_steps, s.lr, seed + 1)


def energy_distance(x, y):
    def mean_dist(a, b):
        return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a[:, None] - b[None]), -1), 0.0) + 1e-12).mean()
    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def mode_stats(problem, cond, x):
    """(total variation to the true weights, modes kept, off-mode fraction) of samples x (N, D) at cond."""
    mu = centres(problem, cond[None])[0]
    dist = jnp.sqrt(jnp.sum(jnp.square(x[:, None] - mu[None]), -1))
    freq = jnp.bincount(dist.argmin(1), length=len(WEIGHTS)) / x.shape[0]
    tv = 0.5 * jnp.abs(freq - WEIGHTS).sum()
    kept = jnp.sum(freq >= 0.5 * WEIGHTS)
    off = jnp.mean(dist.min(1) > OFF_MODE * STD)
    return tv, kept, off


def evaluate(problem, sample_fn, conditions, samples: int, seed: int = 7):
    """Metrics of `sample_fn(noise, cond)` against ground truth, averaged over the test conditions."""
    rows = []
    for i, c in enumerate(conditions):
        cond = jnp.broadcast_to(c, (samples, COND_DIM))
        rng_noise, rng_data = jax.random.split(jax.random.PRNGKey(seed * 1000 + i))
        x = sample_fn(jax.random.normal(rng_noise, (samples, DIM)), cond)
        truth = sample_data(problem, rng_data, cond)
        rows.append([float(energy_distance(x, truth)), *map(float, mode_stats(problem, c, x))])
    ed, tv, kept, off = np.mean(rows, 0)
    return {"energy_distance": round(ed, 5), "mode_tv": round(tv, 4), "modes_kept": round(kept, 2),
            "off_mode": round(off, 4)}


def sampler_of(model, params, interval: bool, steps: int):
    if interval:
        times = schedules.cosine_grid(steps)
        velocity = lambda z, c, cond, t, r: model.apply(params, z, c, jnp.full(z.shape[:1], t),  # noqa: E731
                                                        jnp.full(z.shape[:1], r))
    else:
        times = schedules.sd3_sampling_sigmas(steps)
        velocity = lambda z, c, cond, t, r: model.apply(params, z, c, jnp.full(z.shape[:1], t))  # noqa: E731
    return jax.jit(lambda noise, cond: samplers.euler_sample(velocity, noise, cond, {}, times))


def floor(problem, conditions, samples: int):
    """Energy distance between two independent ground-truth sets: the estimate's own noise."""
    values = []
    for i, c in enumerate(conditions):
        cond = jnp.broadcast_to(c, (samples, COND_DIM))
        a, b = jax.random.split(jax.random.PRNGKey(99 + i))
        values.append(float(energy_distance(sample_data(problem, a, cond), sample_data(problem, b, cond))))
    return round(float(np.mean(values)), 5)


def run(s: Settings, conditions: int = 8, samples: int = 1000, teacher_params=None, seed: int = 0) -> dict:
    problem = make_problem(seed)
    test_conditions = jnp.asarray(np.random.default_rng(seed + 1).uniform(-1, 1, (conditions, COND_DIM)),
                                  jnp.float32)
    start = time.perf_counter()
    if teacher_params is None:
        teacher_params = train_teacher(problem, s, seed)
    student_params = train_student(problem, teacher_params, s, seed)
    result = {"teacher": {n: evaluate(problem, sampler_of(VelocityMLP(), teacher_params, False, n),
                                      test_conditions, samples) for n in TEACHER_STEPS},
              "student": {n: evaluate(problem, sampler_of(VelocityMLP(interval=True), student_params, True, n),
                                      test_conditions, samples) for n in STUDENT_STEPS},
              "floor": floor(problem, test_conditions, samples), "seconds": round(time.perf_counter() - start, 1)}
    return result, teacher_params


def summary(result: dict) -> dict:
    student, teacher = result["student"], result["teacher"]
    return {"student_1_vs_2": round(student[1]["energy_distance"] / student[2]["energy_distance"], 3),
            "student_1_vs_teacher_50": round(student[1]["energy_distance"] / teacher[50]["energy_distance"], 3)}


def table(label_rows) -> str:
    lines = ["| setting | model | steps | energy distance | mode TV | modes kept | off-mode |", "|---|---|---|---|---|---|---|"]
    for label, result in label_rows:
        for model in ("teacher", "student"):
            for n, m in result[model].items():
                lines.append(f"| {label} | {model} | {n} | {m['energy_distance']:.4f} | {m['mode_tv']:.3f} | "
                             f"{m['modes_kept']:.2f} | {m['off_mode']:.3f} |")
    return "\n".join(lines)


SAMPLER_VARIANTS = {
    "sorted logit-normal, boundary t = max (Algorithm 1)": dict(time_sampler="logit_normal", anchor_prob=0.0,
                                                                boundary_time="max"),
    "sorted logit-normal, independent boundary t": dict(time_sampler="logit_normal", anchor_prob=0.0,
                                                        boundary_time="independent"),
    "sorted uniform, boundary t = max": dict(time_sampler="uniform", anchor_prob=0.0, boundary_time="max"),
    "logit-normal + 25% (0, 1) anchors": dict(time_sampler="logit_normal", anchor_prob=0.25, anchor="interval",
                                              boundary_time="max"),
    "logit-normal + 25% r = 0 anchors": dict(time_sampler="logit_normal", anchor_prob=0.25, anchor="start",
                                             boundary_time="max"),
    "uniform + 25% (0, 1) anchors": dict(time_sampler="uniform", anchor_prob=0.25, anchor="interval",
                                         boundary_time="max"),
    "uniform + 25% r = 0 anchors, independent boundary t": dict(time_sampler="uniform", anchor_prob=0.25,
                                                                anchor="start", boundary_time="independent"),
    "uniform + 10% (0, 1) anchors, independent boundary t": dict(time_sampler="uniform", anchor_prob=0.1,
                                                                 anchor="interval", boundary_time="independent"),
    "uniform + 25% (0, 1) anchors, independent boundary t": dict(time_sampler="uniform", anchor_prob=0.25,
                                                                 anchor="interval", boundary_time="independent"),
    "uniform + 50% (0, 1) anchors, independent boundary t": dict(time_sampler="uniform", anchor_prob=0.5,
                                                                 anchor="interval", boundary_time="independent"),
}
TEACHER_VARIANTS = {
    "x0 loss, SD3 grid (DiT4SR)": dict(teacher_loss="x0", sigma_sampler="sd3"),
    "x0 loss, uniform": dict(teacher_loss="x0", sigma_sampler="uniform"),
    "velocity loss, SD3 grid": dict(teacher_loss="velocity", sigma_sampler="sd3"),
    "velocity loss, logit-normal": dict(teacher_loss="velocity", sigma_sampler="logit_normal"),
    "velocity loss, uniform (Eq. 3)": dict(teacher_loss="velocity", sigma_sampler="uniform"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    parser.add_argument("--compare", choices=("none", "samplers", "teacher"), default="none")
    parser.add_argument("--conditions", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    eval_kw = dict(conditions=args.conditions, samples=args.samples, seed=args.seed)
    rows = []
    if args.compare == "samplers":
        teacher = None
        for label, variant in SAMPLER_VARIANTS.items():
            result, teacher = run(dataclasses.replace(base, **variant), teacher_params=teacher, **eval_kw)
            rows.append((label, result))
    elif args.compare == "teacher":
        for label, variant in TEACHER_VARIANTS.items():
            rows.append((label, run(dataclasses.replace(base, **variant), **eval_kw)[0]))
    else:
        rows.append(("this run", run(base, **eval_kw)[0]))
    print(table(rows))
    print(f"ground-truth floor: {rows[0][1]['floor']}")
    label, result = rows[-1] if args.compare == "none" else min(
        rows, key=lambda row: row[1]["student"][1]["energy_distance"])
    print(json.dumps({"name": "isc_toy", "value": result["student"][1]["energy_distance"],
                      "unit": "energy distance (1-step student)", "setting": label,
                      "settings": dataclasses.asdict(base), "compare": args.compare, **summary(result),
                      "runs": {label: {**r, **summary(r)} for label, r in rows}}))


if __name__ == "__main__":
    main()
