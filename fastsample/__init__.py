"""fastsample: few-step samplers, learned solvers and gradients through sampling, in JAX.

The public API is re-exported here; everything else is private.
"""

from . import (
    data,
    distributed,
    gradients,
    guidance,
    learned,
    metrics,
    models,
    noise,
    parallel,
    processes,
    solvers,
    timesteps,
    training,
)
from .denoisers import Denoiser, Thresholding, convert_prediction
from .gradients import available_gradients
from .inversion import BDIADDIM, bdia_invert, bdia_sample, invert
from .noise import BrownianNoise, IndependentNoise
from .parallel import PicardInfo, sample_picard
from .processes import EDM, VE, AbstractProcess, FlowMatching, VPCosine, VPDiscrete, VPLinear
from .sample import SampleInfo, prior, reference_solve, sample
from .solvers import SOLVERS, AbstractFastSolver, AbstractStochasticSolver, available_solvers, get_solver
from .terms import ProbabilityFlowTerm
from .timesteps import available_schedules, get_timesteps

__version__ = "0.1.0"

__all__ = [
    "BDIADDIM",
    "bdia_invert",
    "bdia_sample",
    "invert",
    "AbstractFastSolver",
    "AbstractStochasticSolver",
    "BrownianNoise",
    "IndependentNoise",
    "AbstractProcess",
    "Denoiser",
    "EDM",
    "FlowMatching",
    "ProbabilityFlowTerm",
    "SOLVERS",
    "SampleInfo",
    "Thresholding",
    "VE",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "available_gradients",
    "available_schedules",
    "available_solvers",
    "convert_prediction",
    "get_solver",
    "get_timesteps",
    "data",
    "distributed",
    "gradients",
    "guidance",
    "learned",
    "metrics",
    "parallel",
    "models",
    "noise",
    "prior",
    "processes",
    "reference_solve",
    "sample_picard",
    "PicardInfo",
    "sample",
    "solvers",
    "timesteps",
    "training",
]
