"""Experiments with a known answer: does ISC turn a flow-matching teacher into a one-step student?

On each toy of benchmarks/toys.py (a four-mode mixture, a ring, photograph patches given their x4 LR) a small
MLP teacher is trained with the project's `teacher_fm_loss`; a student that starts as the teacher (its
interval input has zero weights) is trained with the project's `isc_loss`. Both are sampled with the
project's Euler sampler (teacher on the SD3 grid, student on the cosine grid) and compared with held-out
truth:
- energy distance (2E|X-Y| - E|X-X'| - E|Y-Y'| on the joint (condition, sample), mean over the toy's cases;
  `floor` is the same between the truth and an independent twin: the estimate's own noise);
- where the toy has bins (mixture components, ring sectors): total variation between the bin histogram and the
  true weights, the number of bins holding at least half their weight ("modes kept"), and the fraction of
  samples more than 5 std from the support ("off-mode").
Every figure is a mean and std over `--seeds` training seeds (seed i also draws evaluation set i); the seeds
train side by side in one vmapped program.

  python benchmarks/isc_toy.py                                   # the defaults on every toy, 3 seeds
  python benchmarks/isc_toy.py --toy modes --compare options     # each option of isc_loss against the default
  python benchmarks/isc_toy.py --toy modes --compare samplers    # the ISC time samplers
  python benchmarks/isc_toy.py --toy modes --compare teacher     # the teacher objectives
  python benchmarks/isc_toy.py --toy ring --adaptive_p 1 --p_boundary 0.75 --seeds 5

Prints a Markdown table per toy and, last, one JSON line.
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

from benchmarks import toys as toys_lib  # noqa: E402
from smfsr_jax.core import schedules  # noqa: E402
from smfsr_jax.models.mmdit import timestep_sinusoid  # noqa: E402
from smfsr_jax.objectives import flow_matching, isc  # noqa: E402
from smfsr_jax.sampling import samplers  # noqa: E402
from smfsr_jax.training import state as state_lib  # noqa: E402

TEACHER_STEPS, STUDENT_STEPS = (1, 2, 4, 50), (1, 2, 4)


class VelocityMLP(nn.Module):
    """v(z, t | c), or u(z, r, t | c) when `interval`: the interval input t - r enters through its own
    zero-initialised projection, so a student copied from the teacher equals it for every r."""
    dim: int
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
        return nn.Dense(self.dim, name="out")(nn.silu(h))


@dataclasses.dataclass(frozen=True)
class Settings:
    teacher_loss: str = "velocity"
    sigma_sampler: str = "uniform"
    time_sampler: str = isc.DEFAULT_OPTIONS["time_sampler"]
    time_mean: float = isc.DEFAULT_OPTIONS["time_mean"]
    anchor_prob: float = isc.DEFAULT_OPTIONS["anchor_prob"]
    anchor: str = isc.DEFAULT_OPTIONS["anchor"]
    boundary_time: str = isc.DEFAULT_OPTIONS["boundary_time"]
    adaptive_p: float = isc.DEFAULT_OPTIONS["adaptive_p"]
    p_boundary: float = 0.6
    teacher_steps: int = 4000
    student_steps: int = 4000
    student_ema: float = 0.999  # 0: the last weights
    batch: int = 256
    lr: float = 1e-3

    def isc_options(self):
        return {name: getattr(self, name) for name in isc.DEFAULT_OPTIONS}

    def teacher(self):
        return (self.teacher_loss, self.sigma_sampler, self.teacher_steps, self.batch, self.lr)


def optimizer(lr: float):
    return state_lib.make_optimizer(ml_collections.ConfigDict(dict(lr=lr, b1=0.9, b2=0.999, eps=1e-8,
                                                                   weight_decay=0.0, clip=1.0)))


def train(loss_of, params, aux, seeds, steps: int, lr: float, ema: float, chunk: int = 250):
    """Adam on loss_of(params, aux, rng) for every seed at once (params and aux carry a leading seed axis),
    `chunk` steps per jitted scan; returns the EMA of the weights (the last weights when ema is 0)."""
    opt = optimizer(lr)

    def one_step(carry, aux, key):
        params, average, opt_state = carry
        grads = jax.grad(loss_of)(params, aux, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = jax.tree.map(jnp.add, params, updates)
        average = jax.tree.map(lambda e, p: ema * e + (1 - ema) * p, average, params)
        return params, average, opt_state

    @jax.jit
    def run(carry, aux, keys):
        return jax.lax.scan(lambda c, k: (jax.vmap(one_step)(c, aux, k), None), carry, keys)[0]

    carry = (params, params, jax.vmap(opt.init)(params))
    keys = jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s), steps), out_axes=1)(jnp.asarray(seeds))
    for start in range(0, steps, chunk):
        carry = run(carry, aux, keys[start:start + chunk])
    return carry[1]


def train_teachers(toy, s: Settings, seeds):
    model = VelocityMLP(toy.dim)
    params = jax.vmap(lambda k: model.init(k, jnp.zeros((1, toy.dim)), jnp.zeros((1, toy.cond_dim)),
                                           jnp.zeros(1)))(jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)))

    def loss_of(params, aux, rng):
        rng_data, rng_loss = jax.random.split(rng)
        cond, x0 = toy.train_pairs(rng_data, s.batch)
        velocity = lambda z, t: model.apply(params, z, cond, t)  # noqa: E731
        return flow_matching.teacher_fm_loss(velocity, x0, rng_loss, loss=s.teacher_loss,
                                             sigma_sampler=s.sigma_sampler)[0]

    return train(loss_of, params, jnp.zeros(len(seeds)), seeds, s.teacher_steps, s.lr, 0.999)


def student_from_teacher(toy, teacher_params, seeds):
    """The teachers of every seed with a zero interval projection: each student starts equal to its teacher."""
    shapes = jax.eval_shape(VelocityMLP(toy.dim, interval=True).init, jax.random.PRNGKey(0), jnp.zeros((1, toy.dim)),
                            jnp.zeros((1, toy.cond_dim)), jnp.zeros(1), jnp.zeros(1))
    interval = jax.tree.map(lambda a: jnp.zeros((len(seeds), *a.shape)), shapes["params"]["in_interval"])
    return {"params": {**teacher_params["params"], "in_interval": interval}}


def train_students(toy, teacher_params, s: Settings, seeds):
    teacher, student = VelocityMLP(toy.dim), VelocityMLP(toy.dim, interval=True)

    def loss_of(params, teacher_params, rng):
        rng_data, rng_loss = jax.random.split(rng)
        cond, x0 = toy.train_pairs(rng_data, s.batch)
        u_fn = lambda z, r, t: student.apply(params, z, cond, t, r)  # noqa: E731
        teacher_fn = lambda z, t: teacher.apply(teacher_params, z, cond, t)  # noqa: E731
        return isc.isc_loss(u_fn, teacher_fn, x0, rng_loss, p_boundary=s.p_boundary, **s.isc_options())[0]

    params = student_from_teacher(toy, teacher_params, seeds)
    return train(loss_of, params, teacher_params, [seed + 1000 for seed in seeds], s.student_steps, s.lr,
                 s.student_ema)


def energy_distance(x, y):
    def mean_dist(a, b):
        return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a[:, None] - b[None]), -1), 0.0) + 1e-12).mean()
    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def bin_stats(toy, cond, x):
    """(total variation to the true weights, bins kept, off-support fraction) of samples x at conditions."""
    index, off = toy.bins(cond, x)
    freq = jnp.bincount(index, length=len(toy.weights)) / x.shape[0]
    return 0.5 * jnp.abs(freq - toy.weights).sum(), jnp.sum(freq >= 0.5 * toy.weights), off.mean()


def sampler_of(toy, interval: bool, steps: int):
    """jit (params, noise, cond) -> samples of the teacher (SD3 grid) or the student (cosine grid)."""
    model = VelocityMLP(toy.dim, interval=interval)
    times = schedules.cosine_grid(steps) if interval else schedules.sd3_sampling_sigmas(steps)

    def sample(params, noise, cond):
        def velocity(z, c, _, t, r):
            batch = z.shape[:1]
            return model.apply(params, z, c, jnp.full(batch, t), *([jnp.full(batch, r)] if interval else []))
        return samplers.euler_sample(velocity, noise, cond, {}, times)
    return jax.jit(sample)


def evaluate(toy, sample_fn, params, cases, seed: int) -> dict:
    """Metrics of one model (params of one seed) over the cases of that seed."""
    rows = []
    for i, case in enumerate(cases):
        noise = jax.random.normal(jax.random.PRNGKey(7000 + 100 * seed + i), (case.cond.shape[0], toy.dim))
        x = sample_fn(params, noise, case.cond)
        row = [float(energy_distance(jnp.concatenate([case.cond, x], -1), case.truth))]
        if toy.bins is not None:
            row += [float(v) for v in bin_stats(toy, case.cond, x)]
        rows.append(row)
    names = ["energy_distance"] + (["mode_tv", "modes_kept", "off_mode"] if toy.bins is not None else [])
    return dict(zip(names, np.mean(rows, 0).tolist()))


def floor(cases) -> float:
    return float(np.mean([energy_distance(jnp.concatenate([c.cond, c.twin], -1), c.truth) for c in cases]))


def spread(values) -> dict:
    """Mean and std over the seeds whose value is finite; the others diverged and are counted, not averaged."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
            "diverged": int(values.size - finite.size), "seeds": [v if np.isfinite(v) else None for v in values.tolist()]}


def run(toy, s: Settings, seeds, samples: int, teachers=None):
    """Train (or reuse) the teachers and the students of every seed; metrics as mean/std over the seeds."""
    start = time.perf_counter()
    if teachers is None:
        teachers = train_teachers(toy, s, seeds)
    students = train_students(toy, teachers, s, seeds)
    cases = {seed: toy.cases(seed, samples) for seed in seeds}
    per_seed = {("teacher", n): [] for n in TEACHER_STEPS} | {("student", n): [] for n in STUDENT_STEPS}
    for (kind, n), out in per_seed.items():
        sample_fn = sampler_of(toy, kind == "student", n)
        params = teachers if kind == "teacher" else students
        for i, seed in enumerate(seeds):
            out.append(evaluate(toy, sample_fn, jax.tree.map(lambda a: a[i], params), cases[seed], seed))
    result = {kind: {n: {m: spread([r[m] for r in per_seed[(kind, n)]]) for m in per_seed[(kind, n)][0]}
                     for (k, n) in per_seed if k == kind} for kind in ("teacher", "student")}
    ratio = [st["energy_distance"] / te["energy_distance"]
             for st, te in zip(per_seed[("student", 1)], per_seed[("teacher", 50)])]
    result["student_1_vs_teacher_50"] = spread(ratio)
    result["floor"] = spread([floor(cases[seed]) for seed in seeds])
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result, teachers


def fmt(stat: dict, digits: int) -> str:
    diverged = f" ({stat['diverged']} of {len(stat['seeds'])} diverged)" if stat["diverged"] else ""
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}{diverged}"


def table(toy_name: str, label_rows) -> str:
    lines = [f"**{toy_name}**", "", "| setting | model | steps | energy distance | mode TV | modes kept | off-mode |",
             "|---|---|---|---|---|---|---|"]
    for label, result in label_rows:
        for model in ("teacher", "student"):
            for n, m in result[model].items():
                cells = [fmt(m["energy_distance"], 4)] + [fmt(m[k], d) if k in m else "–" for k, d in
                                                          (("mode_tv", 3), ("modes_kept", 2), ("off_mode", 3))]
                lines.append(f"| {label} | {model} | {n} | " + " | ".join(cells) + " |")
        lines.append(f"| {label} | student 1 / teacher 50 | | {fmt(result['student_1_vs_teacher_50'], 2)} | | | |")
    lines.append(f"\nfloor (truth against its twin): {fmt(label_rows[0][1]['floor'], 4)}")
    return "\n".join(lines)


def summary_table(toy_name: str, label_rows) -> str:
    """One row per setting: the one-step student against the 50-step teacher of the same seeds."""
    lines = [f"**{toy_name}**: 1-step student against the 50-step teacher (mean ± std over seeds)", "",
             "| setting | student 1 step | 2 steps | student 1 / teacher 50 | modes kept | off-mode | teacher-50 "
             "off-mode |", "|---|---|---|---|---|---|---|"]
    for label, result in label_rows:
        one, two, teacher = result["student"][1], result["student"][2], result["teacher"][50]
        modes = [fmt(one[k], d) if k in one else "–" for k, d in (("modes_kept", 2), ("off_mode", 3))]
        teacher_off = fmt(teacher["off_mode"], 3) if "off_mode" in teacher else "–"
        lines.append(f"| {label} | {fmt(one['energy_distance'], 4)} | {fmt(two['energy_distance'], 4)} | "
                     f"{fmt(result['student_1_vs_teacher_50'], 2)} | {modes[0]} | {modes[1]} | {teacher_off} |")
    return "\n".join(lines)


SAMPLER_VARIANTS = {
    "sorted logit-normal, boundary t = max (Algorithm 1)": dict(time_sampler="logit_normal", anchor_prob=0.0,
                                                                boundary_time="max"),
    "sorted uniform, boundary t = max": dict(time_sampler="uniform", anchor_prob=0.0, boundary_time="max"),
    "logit-normal + 25% (0, 1) anchors": dict(time_sampler="logit_normal", anchor_prob=0.25, anchor="interval",
                                              boundary_time="max"),
    "uniform + 25% r = 0 anchors": dict(anchor="start"),
    "uniform + 10% (0, 1) anchors": dict(anchor_prob=0.1),
    "uniform + 50% (0, 1) anchors": dict(anchor_prob=0.5),
}
OPTION_VARIANTS = {
    "adaptive weighting p = 0.5": dict(adaptive_p=0.5),
    "adaptive weighting p = 1": dict(adaptive_p=1.0),
    "boundary probability 0.25": dict(p_boundary=0.25),
    "boundary probability 0.5": dict(p_boundary=0.5),
    "boundary probability 0.75": dict(p_boundary=0.75),
    "10% grid anchors (0, 1), (0, .5), (.5, 1)": dict(anchor="grid", anchor_prob=0.1),
    "25% grid anchors": dict(anchor="grid"),
    "logit-normal(-0.4, 1) pairs + 25% (0, 1) anchors": dict(time_sampler="logit_normal", time_mean=-0.4),
    "student 2x longer": dict(student_steps=8000),
    "student 4x longer": dict(student_steps=16000),
    "no student EMA": dict(student_ema=0.0),
}
TEACHER_VARIANTS = {
    "x0 loss, SD3 grid (DiT4SR)": dict(teacher_loss="x0", sigma_sampler="sd3"),
    "x0 loss, uniform": dict(teacher_loss="x0", sigma_sampler="uniform"),
    "velocity loss, SD3 grid": dict(teacher_loss="velocity", sigma_sampler="sd3"),
    "velocity loss, logit-normal": dict(teacher_loss="velocity", sigma_sampler="logit_normal"),
}
COMPARE = {"none": {}, "samplers": SAMPLER_VARIANTS, "options": OPTION_VARIANTS, "teacher": TEACHER_VARIANTS}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    parser.add_argument("--toy", choices=(*toys_lib.TOYS, "all"), default="all")
    parser.add_argument("--compare", choices=tuple(COMPARE), default="none")
    parser.add_argument("--only", default="", help="';'-separated labels of --compare to run (default: all)")
    parser.add_argument("--samples", type=int, default=1000, help="samples per evaluation case")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    base = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    only = [label for label in args.only.split(";") if label]
    unknown = [label for label in only if label not in COMPARE[args.compare]]
    if unknown:
        parser.error(f"--only {unknown} not among --compare {args.compare}'s labels {list(COMPARE[args.compare])}")
    variants = {"this run": {}} | {k: v for k, v in COMPARE[args.compare].items() if not only or k in only}
    seeds = list(range(args.seeds))
    runs = {}
    for toy_name in (toys_lib.TOYS if args.toy == "all" else [args.toy]):
        toy = toys_lib.TOYS[toy_name]()
        teachers, rows = {}, []
        for label, variant in variants.items():
            settings = dataclasses.replace(base, **variant)
            result, teachers[settings.teacher()] = run(toy, settings, seeds, args.samples,
                                                       teachers.get(settings.teacher()))
            rows.append((label, result))
            print(f"{toy_name} / {label}: {result['seconds']} s", file=sys.stderr, flush=True)
        print(table(toy_name, rows) + "\n\n" + summary_table(toy_name, rows) + "\n", flush=True)
        runs[toy_name] = {label: {**r, "settings": dataclasses.asdict(dataclasses.replace(base, **variants[label]))}
                          for label, r in rows}
    first = next(iter(runs.values()))["this run"]
    print(json.dumps({"name": "isc_toy", "value": first["student_1_vs_teacher_50"]["mean"],
                      "unit": "energy distance, 1-step student / 50-step teacher (first toy, mean over seeds)",
                      "toys": list(runs), "seeds": args.seeds, "compare": args.compare, "runs": runs}))


if __name__ == "__main__":
    main()
