"""Parity with diffusers' schedulers (DDIM, DPM-Solver(++) multistep and singlestep, UniPC, DEIS).

``tests/data/diffusers_parity.json`` holds diffusers' results on the exact noise prediction of a
small Gaussian mixture (float64, DDPM-linear and scaled-linear betas, 5/10/20 steps), written by
``scripts/make_diffusers_parity.py`` together with the fastsample call that corresponds to each
scheduler configuration. Here every recorded run is repeated with ``fastsample.sample`` and must
agree to 1e-10 (relative to the largest entry), its grid must give diffusers' noise levels, and
its NFE must be diffusers' number of model calls. Needs neither torch nor diffusers, except
:func:`test_regeneration_matches_stored_data`, skipped where diffusers is not installed.
"""

import importlib.util
import json
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import fastsample as fs

ROOT = Path(__file__).resolve().parents[1]
DATA = json.loads((ROOT / "tests" / "data" / "diffusers_parity.json").read_text())
_spec = importlib.util.spec_from_file_location("make_diffusers_parity", ROOT / "scripts" / "make_diffusers_parity.py")
SCRIPT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SCRIPT)  # imports numpy only; torch and diffusers are imported when it runs

PARITY_RTOL = 1e-10
#: Documented deviation: diffusers' DPMSolverSinglestep order 3 builds its second intermediate point
#: with its own second-order update (midpoint form for solver_type="midpoint") and, for "heun", ends
#: with the Taylor form (D1 and D2), where DPM-Solver-3 (Lu et al., DPM-Solver, 2022, Algorithm 1
#: with r1 = 1/3, r2 = 2/3; fastsample's) uses the phi_2 form for the intermediate point and only
#: D2 at the end. Both are third-order schemes for the same ODE, so their difference is of the
#: size of the discretisation error and shrinks with the step count (measured 0.12 / 0.029 /
#: 0.0049 and 0.10 / 0.034 / 0.0024 of max|x_0| at 5 / 10 / 20 steps).
SINGLESTEP3_SHRINK = 2.5  # at least this factor per doubling of the steps
SINGLESTEP3_AT_20 = 1e-2

#: the runs checked by default, each solver option at least once within the test budget (one
#: compilation per solver and step count): scaled-linear betas at these steps; every other
#: recorded run (all configurations x both betas x 5 / 10 / 20 steps) is marked slow
PRIMARY = {
    "ddim_leading": 10, "ddim_leading_alpha_one": 10, "ddim_trailing": 10,
    "dpmpp_2m_zero": 10, "dpmpp_2m_sigma_min": 10, "dpmpp_2m_leading": 10, "dpmpp_2m_karras": 10,
    "dpmpp_2m_heun_trailing": 10, "dpmpp_3m_zero": 10, "dpmpp_3m_sigma_min": 10, "dpmpp_3m_karras": 10,
    "dpm_solver_2m": 10, "dpmpp_2s_exponential": 10, "unipc_bh1_2": 10, "unipc_bh2_2_nocorrector": 10,
    "unipc_bh2_3": 20, "deis_3": 10,
}


class MixtureEps(eqx.Module):
    """The recorded mixture's exact noise prediction as a fastsample model ``(x, t, cond)``."""

    process: fs.VPDiscrete

    def __call__(self, x, t, cond):
        return SCRIPT.mixture_eps(jnp, x, self.process.sigma_edm(t), DATA["mixture"])


PROCESSES = {"scaled_linear": fs.VPDiscrete.scaled_linear, "linear": fs.VPDiscrete.ddpm_linear}


def process_for(betas: str) -> fs.VPDiscrete:
    lo, hi = DATA["betas"][betas]
    return PROCESSES[betas](num_steps=DATA["num_train_timesteps"], beta_start=lo, beta_end=hi)


def fastsample_run(case: dict, run: dict, process):
    """The fastsample call that corresponds to the diffusers configuration of ``case``:
    ``(x_0, info)``."""
    spec = case["fastsample"]
    den = fs.Denoiser(MixtureEps(process), process, prediction="eps")
    x_T = jnp.asarray(DATA["x_T"], jnp.float64)
    n = run["steps"]
    options = dict(spec["solver_options"])
    if spec.get("singlestep"):
        # diffusers' singlestep blocks of orders 1..k over the grid = fastsample steps of order k
        ts = fs.get_timesteps(process, n, spec["schedule"], final_zero=True)[np.asarray(run["singlestep_grid"])]
        options["orders"] = tuple(run["singlestep_orders"])
        sol = fs.solve(den, x_T, spec["solver"], timesteps=ts, solver_options=options)
    else:
        sol = fs.solve(den, x_T, spec["solver"], nfe=n, schedule=spec["schedule"], final_zero=spec["final_zero"],
                       schedule_options=spec["schedule_options"], solver_options=options)
    return sol.x, sol


def rel_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _params():
    out = []
    for case in DATA["cases"]:
        if "deviation" in case:
            continue
        for run in case["runs"]:
            primary = run["betas"] == "scaled_linear" and PRIMARY.get(case["name"]) == run["steps"]
            out.append(pytest.param(case, run, id=f"{case['name']}-{run['betas']}-{run['steps']}",
                                    marks=() if primary else pytest.mark.slow))
    return out


def check_grid(case, run, process, info):
    """The grid gives diffusers' noise levels (sigma / alpha; the final 0 or sigma_min included)
    and one model call per diffusers step."""
    where = f"{case['name']} ({run['betas']}, {run['steps']} steps)"
    ref = np.asarray(run["sigmas"])
    if case["fastsample"].get("singlestep"):
        ref = ref[np.asarray(run["singlestep_grid"])]
    np.testing.assert_allclose(np.asarray(process.sigma_edm(info.grid.times)), ref, rtol=1e-12, atol=0, err_msg=where)
    assert info.stats["nfe"] == len(run["timesteps"]), where


@pytest.mark.parametrize("case, run", _params())
def test_matches_diffusers(case, run, x64):
    process = process_for(run["betas"])
    x0, info = fastsample_run(case, run, process)
    check_grid(case, run, process, info)
    d = rel_diff(x0, run["x0"])
    assert d < PARITY_RTOL, f"{case['name']} ({run['betas']}, {run['steps']} steps): relative difference {d:.3g}"


@pytest.mark.slow
def test_singlestep_order3_deviation(x64):
    """diffusers' DPMSolverSinglestep order 3 (both solver types) is a different third-order
    scheme than DPM-Solver-3 (see :data:`SINGLESTEP3_SHRINK`): not equal, but converging together."""
    cases = [c for c in DATA["cases"] if c.get("deviation") == "singlestep3"]
    assert len(cases) == 2
    for case in cases:
        diffs = []
        for run in sorted(case["runs"], key=lambda r: r["steps"]):
            process = process_for(run["betas"])
            x0, info = fastsample_run(case, run, process)
            check_grid(case, run, process, info)
            diffs.append(rel_diff(x0, run["x0"]))
        assert min(diffs) > 1e-6, (case["name"], diffs)  # really a different scheme
        shrink = [a / b for a, b in zip(diffs[:-1], diffs[1:], strict=True)]
        assert min(shrink) > SINGLESTEP3_SHRINK, (case["name"], diffs)
        assert diffs[-1] < SINGLESTEP3_AT_20, (case["name"], diffs)


def test_parity_cases_discriminate(x64):
    """The comparison can fail: fastsample's third-order DPM-Solver++(3M) (``exact_third_order``)
    and DPM-Solver-2 with the noise-prediction DPM-Solver++ grid move far from diffusers'
    published-formula numbers, and a grid shifted by one training step does too."""
    case = next(c for c in DATA["cases"] if c["name"] == "dpmpp_3m_zero")
    run = next(r for r in case["runs"] if r["steps"] == 10)
    process = process_for(run["betas"])
    exact = dict(case, fastsample=dict(case["fastsample"], solver_options={"exact_third_order": True}))
    assert rel_diff(fastsample_run(exact, run, process)[0], run["x0"]) > 1e-5
    shifted = dict(case, fastsample=dict(case["fastsample"], schedule="leading",
                                         schedule_options={"drop_zero": True, "steps_offset": 1}))
    assert rel_diff(fastsample_run(shifted, run, process)[0], run["x0"]) > 1e-5


def test_index_spacings_match_recorded_timesteps():
    """fastsample's diffusers spacings give the recorded integer timesteps (``drop_zero``: the
    DPM-Solver / UniPC / DEIS schedulers' variant of ``linspace`` and ``leading``)."""
    checked = 0
    for case in DATA["cases"]:
        spec = case["fastsample"]
        if spec["schedule"] not in ("leading", "linspace", "trailing"):
            continue
        index_fn = fs.timesteps.SCHEDULES[spec["schedule"]].index_fn
        for run in case["runs"]:
            idx = index_fn(DATA["num_train_timesteps"], run["steps"], **spec["schedule_options"])
            assert idx.tolist() == run["timesteps"], (case["name"], run["steps"])
            checked += 1
    assert checked >= 40
    with pytest.raises(ValueError, match="drop_zero must be True or False"):
        fs.timesteps.linspace_indices(1000, 10, drop_zero="yes")


def test_regeneration_matches_stored_data():
    """Where diffusers is installed, re-running the generation reproduces the stored numbers."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    case = next(c for c in SCRIPT.CONFIGS if c["name"] == "dpmpp_3m_zero")
    stored = next(c for c in DATA["cases"] if c["name"] == "dpmpp_3m_zero")
    run = next(r for r in stored["runs"] if r["steps"] == 10 and r["betas"] == "scaled_linear")
    again = SCRIPT.run(case, "scaled_linear", 10, np.asarray(DATA["x_T"]))
    assert again["timesteps"] == run["timesteps"]
    np.testing.assert_allclose(again["sigmas"], run["sigmas"], rtol=1e-13)
    assert rel_diff(again["x0"], run["x0"]) < 1e-12
