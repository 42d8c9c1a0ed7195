"""Record diffusers' schedulers on an analytic model, for ``tests/test_diffusers_parity.py``.

Runs diffusers' ``DDIMScheduler``, ``DPMSolverMultistepScheduler``, ``DPMSolverSinglestepScheduler``,
``UniPCMultistepScheduler`` and ``DEISMultistepScheduler`` in float64 on the exact noise prediction
of a small Gaussian mixture (:func:`mixture_eps`, shared with the test), with DDPM's linear and
Stable Diffusion's scaled-linear betas (1000 steps), at 5, 10 and 20 inference steps, and writes
the inputs (``x_T``, scheduler configuration, its timesteps and sigmas), the outputs and the
matching fastsample call (:data:`CONFIGS`) to ``tests/data/diffusers_parity.json``.

Needs torch and diffusers, which fastsample does not depend on; use a separate environment::

    python -m venv /tmp/parity-venv
    /tmp/parity-venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/parity-venv/bin/pip install diffusers numpy -e .
    /tmp/parity-venv/bin/python scripts/make_diffusers_parity.py

float64: diffusers builds its betas and its sigma grid in float32 and casts the sample to float32
in ``DPMSolverMultistepScheduler.step``. To compare algorithms rather than float32 rounding, the
scheduler code runs with ``torch.float32`` / ``numpy.float32`` aliased to float64 (see
:func:`float64_diffusers`); nothing else of diffusers is changed.

The model is evaluated at the scheduler's own noise level ``sigmas[i]`` (EDM ``sigma = sigma/alpha``).
For integer timesteps this is the training step's noise level, as a model would see it; with
``use_karras_sigmas`` diffusers' pipelines pass the model the timestep rounded to an integer, a
model-input convention outside the solver that this comparison leaves out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "diffusers_parity.json"

#: a 3-component isotropic Gaussian mixture in 4-D: weights, means, standard deviations
MIXTURE = {
    "weights": [0.2, 0.5, 0.3],
    "means": [[1.0, -0.5, 0.3, 0.8], [-0.7, 0.4, -1.1, 0.2], [0.2, 1.3, 0.6, -0.9]],
    "stds": [0.3, 0.6, 1.0],
}
BETAS = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}
STEPS = (5, 10, 20)
NUM_SAMPLES, SEED = 3, 0


def mixture_eps(xp, x, sigma, mixture=MIXTURE):
    """Exact noise prediction ``E[eps | x_t = x]`` of the isotropic Gaussian ``mixture`` under the
    VP process at EDM noise level ``sigma`` (``alpha = 1/sqrt(1 + sigma^2)``, ``sigma_t = sigma alpha``),
    for ``x`` of shape ``(batch, dim)``; ``xp`` is ``numpy`` or ``jax.numpy``.

    Given component ``k`` (weight ``w``, mean ``mu``, std ``s``), ``x_t ~ N(alpha mu, v I)`` with
    ``v = alpha^2 s^2 + sigma_t^2`` and ``E[eps | x_t, k] = sigma_t (x_t - alpha mu) / v``; the
    components are weighted by their posterior responsibilities."""
    w = xp.asarray(mixture["weights"], dtype=x.dtype)
    mu = xp.asarray(mixture["means"], dtype=x.dtype)
    s = xp.asarray(mixture["stds"], dtype=x.dtype)
    alpha = 1.0 / xp.sqrt(1.0 + sigma**2)
    sig = sigma * alpha
    v = alpha**2 * s**2 + sig**2  # (K,)
    diff = x[:, None, :] - alpha * mu[None]  # (B, K, D)
    logp = xp.log(w) - 0.5 * x.shape[-1] * xp.log(v) - 0.5 * xp.sum(diff**2, axis=-1) / v
    logp = logp - xp.max(logp, axis=-1, keepdims=True)
    resp = xp.exp(logp)
    resp = resp / xp.sum(resp, axis=-1, keepdims=True)
    return xp.sum(resp[..., None] * (sig * diff / v[:, None]), axis=1)


def x_T() -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((NUM_SAMPLES, len(MIXTURE["means"][0])))


# ------------------------------------------------------------------------------------ the cases
#
# Each entry: the diffusers scheduler and configuration, the fastsample call that corresponds
# (solver name + options, schedule + options, final_zero), the betas and step counts recorded.
# ``tolerance`` > 1e-10 only where diffusers deliberately deviates (``note`` says why).

_DPM = "DPMSolverMultistepScheduler"
_LINSPACE = {"schedule": "linspace", "schedule_options": {"drop_zero": True}}
_BOTH = ("scaled_linear", "linear")


def _c(name, scheduler, config, solver, solver_options, grid, final_zero, betas=("scaled_linear",), **extra):
    return dict(name=name, scheduler=scheduler, config=config, betas=list(betas), steps=list(STEPS),
                fastsample=dict(solver=solver, solver_options=solver_options, final_zero=final_zero, **grid),
                **extra)


def _unipc(order, variant, corrector):
    # bh1 with diffusers' default final_sigmas_type="zero" gives NaN (B(h) = h = -inf on the step to
    # sigma = 0, times a zero correction): bh1 is recorded with "sigma_min"
    final = "zero" if variant == "bh2" else "sigma_min"
    config = {"solver_order": order, "solver_type": variant, "predict_x0": True, "final_sigmas_type": final}
    name = f"unipc_{variant}_{order}" + ("" if corrector else "_nocorrector")
    options = {"order": order, "variant": variant, "use_corrector": corrector, "lower_order_final_below": None}
    return _c(name, "UniPCMultistepScheduler", config | ({} if corrector else {"disable_corrector": "all"}),
              "unipc", options, _LINSPACE, final == "zero",
              betas=_BOTH if (order, variant, corrector) == (2, "bh2", True) else ("scaled_linear",))


_NOCLIP = {"clip_sample": False}  # DDIMScheduler clips x_0 to [-1, 1] by default

CONFIGS = [
    # DDIM (eta = 0)
    _c("ddim_leading", "DDIMScheduler",
       {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False} | _NOCLIP,
       "ddim", {}, {"schedule": "leading", "schedule_options": {"steps_offset": 1}}, False, betas=_BOTH),
    _c("ddim_leading_alpha_one", "DDIMScheduler",
       {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": True} | _NOCLIP,
       "ddim", {}, {"schedule": "leading", "schedule_options": {"steps_offset": 1}}, True),
    _c("ddim_trailing", "DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": False} | _NOCLIP,
       "ddim", {}, {"schedule": "trailing", "schedule_options": {}}, False),
    # DPM-Solver++ multistep
    _c("dpmpp_2m_zero", _DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"},
       "dpmpp_2m", {}, _LINSPACE, True, betas=_BOTH),
    _c("dpmpp_2m_sigma_min", _DPM,
       {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "sigma_min"},
       "dpmpp_2m", {}, _LINSPACE, False, betas=_BOTH),
    _c("dpmpp_2m_heun_trailing", _DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "heun",
                                        "timestep_spacing": "trailing", "final_sigmas_type": "zero"},
       "dpmpp_2m", {"solver_type": "heun"}, {"schedule": "trailing", "schedule_options": {}}, True),
    _c("dpmpp_2m_leading", _DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                  "timestep_spacing": "leading", "final_sigmas_type": "zero"},
       "dpmpp_2m", {}, {"schedule": "leading", "schedule_options": {"drop_zero": True}}, True),
    _c("dpmpp_2m_karras", _DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True,
                                 "final_sigmas_type": "zero"},
       "dpmpp_2m", {}, {"schedule": "karras", "schedule_options": {}, "karras": True}, True, betas=_BOTH),
    _c("dpmpp_2m_no_lower_order_final", _DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                               "lower_order_final": False, "final_sigmas_type": "sigma_min"},
       "dpmpp_2m", {"lower_order_final": False}, _LINSPACE, False),
    _c("dpmpp_3m_zero", _DPM, {"algorithm_type": "dpmsolver++", "solver_order": 3, "final_sigmas_type": "zero"},
       "dpmpp_3m", {}, _LINSPACE, True, betas=_BOTH),
    _c("dpmpp_3m_sigma_min", _DPM,
       {"algorithm_type": "dpmsolver++", "solver_order": 3, "final_sigmas_type": "sigma_min"},
       "dpmpp_3m", {}, _LINSPACE, False),
    _c("dpmpp_3m_karras", _DPM, {"algorithm_type": "dpmsolver++", "solver_order": 3, "use_karras_sigmas": True,
                                 "final_sigmas_type": "zero"},
       "dpmpp_3m", {}, {"schedule": "karras", "schedule_options": {}, "karras": True}, True),
    # DPM-Solver (noise prediction) multistep: diffusers allows only final_sigmas_type="sigma_min"
    _c("dpm_solver_2m", _DPM, {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"},
       "dpm_solver_2m", {}, _LINSPACE, False, betas=_BOTH),
    _c("dpm_solver_3m_trailing", _DPM, {"algorithm_type": "dpmsolver", "solver_order": 3,
                                        "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"},
       "dpm_solver_3m", {}, {"schedule": "trailing", "schedule_options": {}}, False),
    # DPM-Solver(++) singlestep: diffusers' intermediate points are grid points; on a grid uniform in
    # log-SNR (use_exponential_sigmas) they sit where DPM-Solver puts them (r = 1/2; 1/3, 2/3)
    _c("dpmpp_2s_exponential", "DPMSolverSinglestepScheduler",
       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_exponential_sigmas": True,
        "final_sigmas_type": "zero"},
       "dpm_solver_fast", {"prediction": "x0"}, {"schedule": "logsnr_uniform", "schedule_options": {},
                                                 "singlestep": True}, True, betas=_BOTH),
    _c("dpmpp_3s_exponential", "DPMSolverSinglestepScheduler",
       {"algorithm_type": "dpmsolver++", "solver_order": 3, "use_exponential_sigmas": True,
        "final_sigmas_type": "zero"},
       "dpm_solver_fast", {"prediction": "x0"}, {"schedule": "logsnr_uniform", "schedule_options": {},
                                                 "singlestep": True}, True, deviation="singlestep3"),
    _c("dpmpp_3s_heun_exponential", "DPMSolverSinglestepScheduler",
       {"algorithm_type": "dpmsolver++", "solver_order": 3, "solver_type": "heun", "use_exponential_sigmas": True,
        "final_sigmas_type": "zero"},
       "dpm_solver_fast", {"prediction": "x0"}, {"schedule": "logsnr_uniform", "schedule_options": {},
                                                 "singlestep": True}, True, deviation="singlestep3"),
    # UniPC (B(h) variants, orders 2 and 3, with and without the corrector)
    *[_unipc(order, variant, corrector)
      for order in (2, 3) for variant in ("bh1", "bh2") for corrector in (True, False)],
    _c("unipc_bh2_2_karras", "UniPCMultistepScheduler",
       {"solver_order": 2, "solver_type": "bh2", "use_karras_sigmas": True},
       "unipc", {"order": 2, "variant": "bh2", "lower_order_final_below": None},
       {"schedule": "karras", "schedule_options": {}, "karras": True}, True),
    # DEIS (log-rho, noise prediction): diffusers ends at sigma_min
    _c("deis_2", "DEISMultistepScheduler", {"solver_order": 2}, "deis", {"order": 2}, _LINSPACE, False),
    _c("deis_3", "DEISMultistepScheduler", {"solver_order": 3}, "deis", {"order": 3}, _LINSPACE, False,
       betas=_BOTH),
]


# ------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def float64_diffusers():
    """Alias ``torch.float32`` and ``numpy.float32`` to float64 (and make float64 torch's
    default) while diffusers' scheduler code runs, so its betas, sigma grids and updates are
    computed in float64 (diffusers hard-codes float32 there)."""
    import torch

    saved = torch.float32, np.float32, torch.get_default_dtype()
    torch.float32, np.float32 = torch.float64, np.float64
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.float32, np.float32 = saved[:2]
        torch.set_default_dtype(saved[2])


def singlestep_blocks(order_list) -> tuple[list[int], list[int]]:
    """diffusers' singlestep ``order_list`` (a block of order ``k`` reads ``1, 2, ..., k``) as
    fastsample steps: ``(orders, grid_indices)``, the per-step orders and the indices of the grid
    points the steps start from (plus the last point)."""
    starts = [i for i, o in enumerate(order_list) if o == 1]
    orders = [b - a for a, b in zip(starts, starts[1:] + [len(order_list)], strict=True)]
    return orders, starts + [len(order_list)]


def run(case: dict, betas: str, steps: int, x: np.ndarray) -> dict:
    """One diffusers run: its timesteps, sigmas (EDM noise levels, final one included) and x_0."""
    import diffusers
    import torch

    config = dict(case["config"])
    disable = config.pop("disable_corrector", None)
    lo, hi = BETAS[betas]
    with float64_diffusers():
        sched = getattr(diffusers, case["scheduler"])(
            num_train_timesteps=1000, beta_start=lo, beta_end=hi, beta_schedule=betas, **config,
            **({"disable_corrector": list(range(steps))} if disable == "all" else {}),
        )
        sched.set_timesteps(steps)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        ac = sched.alphas_cumprod.numpy()
        timesteps = sched.timesteps.numpy()
        if case["scheduler"] == "DDIMScheduler":
            prev = timesteps - 1000 // steps
            final = 1.0 if case["config"]["set_alpha_to_one"] else ac[0]
            ac_grid = np.append(ac[timesteps], [ac[p] if p >= 0 else final for p in prev[-1:]])
            sigmas = np.sqrt((1.0 - ac_grid) / ac_grid)
        else:
            sigmas = sched.sigmas.numpy().copy()
        assert sched.alphas_cumprod.dtype == torch.float64 and sigmas.dtype == np.float64
        sample = torch.from_numpy(x.copy())
        for i, t in enumerate(sched.timesteps):
            eps = torch.from_numpy(mixture_eps(np, sample.numpy(), sigmas[i]))
            sample = sched.step(eps, t, sample).prev_sample
        assert sample.dtype == torch.float64
        out = dict(betas=betas, steps=steps, timesteps=timesteps.tolist(), sigmas=sigmas.tolist(),
                   x0=sample.numpy().tolist())
        if hasattr(sched, "order_list"):
            out["singlestep_orders"], out["singlestep_grid"] = singlestep_blocks(sched.order_list)
    if not np.all(np.isfinite(out["x0"])):
        raise RuntimeError(f"diffusers gave a non-finite result for {case['name']} ({betas}, {steps} steps).")
    return out


def generate(configs=CONFIGS) -> dict:
    import diffusers
    import torch

    x = x_T()
    cases = []
    for case in configs:
        runs = [run(case, b, n, x) for b in case["betas"] for n in case["steps"]]
        cases.append({k: v for k, v in case.items() if k not in ("betas", "steps")} | {"runs": runs})
    return {
        "generated_by": "scripts/make_diffusers_parity.py",
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "mixture": MIXTURE,
        "betas": {k: list(v) for k, v in BETAS.items()},
        "num_train_timesteps": 1000,
        "x_T": x.tolist(),
        "cases": cases,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = generate()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    n = sum(len(c["runs"]) for c in data["cases"])
    print(f"wrote {n} runs of {len(data['cases'])} configurations to {args.out} "
          f"({args.out.stat().st_size / 1024:.0f} KiB; diffusers {data['versions']['diffusers']})")


if __name__ == "__main__":
    main()
