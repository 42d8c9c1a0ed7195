"""fastsample: few-step samplers, learned solvers and gradients through sampling, in JAX.

The public API is re-exported here; everything else is private.
"""

from . import (
    checkpoints,
    data,
    distributed,
    gradients,
    guidance,
    learned,
    loop,
    metrics,
    models,
    noise,
    optimization,
    parallel,
    plan,
    processes,
    solvers,
    timesteps,
)
from .denoisers import Denoiser, Thresholding, convert_prediction
from .gradients import available_gradients
from .grid import Grid
from .inversion import bdia_invert, bdia_sample, invert
from .noise import BrownianNoise, IndependentNoise
from .parallel import sample_picard
from .processes import EDM, VE, AbstractProcess, FlowMatching, VPCosine, VPDiscrete, VPLinear
from .sampling import SaveAt, Solution, grid, prior, reference_solve, sample, solve
from .solvers import (
    BDIADDIM,
    SOLVERS,
    AbstractAdaptiveSolver,
    AbstractFastSolver,
    AbstractLinearSolver,
    AbstractStochasticSolver,
    available_solvers,
    get_solver,
)
from .terms import ProbabilityFlowTerm
from .timesteps import available_schedules, get_timesteps

__version__ = "0.1.0"

__all__ = [
    "AbstractAdaptiveSolver",
    "AbstractFastSolver",
    "AbstractLinearSolver",
    "AbstractProcess",
    "AbstractStochasticSolver",
    "BDIADDIM",
    "BrownianNoise",
    "Denoiser",
    "EDM",
    "FlowMatching",
    "Grid",
    "IndependentNoise",
    "ProbabilityFlowTerm",
    "SOLVERS",
    "SaveAt",
    "Solution",
    "Thresholding",
    "VE",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "available_gradients",
    "available_schedules",
    "available_solvers",
    "bdia_invert",
    "bdia_sample",
    "checkpoints",
    "convert_prediction",
    "data",
    "distributed",
    "get_solver",
    "get_timesteps",
    "gradients",
    "grid",
    "guidance",
    "invert",
    "learned",
    "loop",
    "metrics",
    "models",
    "noise",
    "optimization",
    "parallel",
    "plan",
    "prior",
    "processes",
    "reference_solve",
    "sample",
    "sample_picard",
    "solve",
    "solvers",
    "timesteps",
]
