"""The ``fastsample`` command line.

    fastsample run CONFIG [key=value ...]      run an experiment, write a results folder
    fastsample sample CONFIG [key=value ...] --out FILE.npy
                                               draw samples with the config's first solver and NFE
    fastsample fit CONFIG [key=value ...]      fit learned solvers (the config's fit section; resumes)
    fastsample train-model CONFIG [key=value ...]
                                               train a network (resumes from its checkpoints)
    fastsample solvers | schedules             list what is available
    fastsample list                            solvers, schedules, processes, models, experiments
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
from pathlib import Path

from .config import ConfigError, ExperimentConfig, config_to_dict, load_config

__all__ = ["main"]


def _find_experiment(name: str, config_path: Path) -> Path:
    """``experiments/NAME.py`` next to the config's project, in the working directory, or in the
    source checkout fastsample was installed from."""
    roots = [config_path.resolve().parent.parent, Path.cwd(), Path(__file__).resolve().parents[1]]
    for root in roots:
        candidate = root / "experiments" / f"{name}.py"
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(r / "experiments") for r in roots)
    raise ConfigError(f"experiment {name!r} not found: no {name}.py in {searched}.")


def _load_experiment(path: Path):
    spec = importlib.util.spec_from_file_location(f"fastsample_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the experiment resolve their module
    spec.loader.exec_module(module)
    return module


def _experiment_name(config_path, overrides) -> str:
    """The ``experiment`` key of a config (after overrides), read before validation."""
    from .config import read_config

    name = read_config(config_path, overrides).get("experiment", ExperimentConfig.experiment)
    if not isinstance(name, str):
        raise ConfigError(f"experiment must be the name of a file in experiments/; got {name!r}.")
    return name


@contextlib.contextmanager
def _precision(cfg):
    """float64 runs enable x64 for their duration (restored afterwards, for in-process callers)."""
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", cfg.dtype == "float64")
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def cmd_run(args) -> int:
    from . import results
    from .distributed import is_main_process

    experiment = _load_experiment(_find_experiment(_experiment_name(args.config, args.overrides), Path(args.config)))
    # an experiment with settings of its own declares its config class as CONFIG
    cfg = load_config(args.config, args.overrides, cls=getattr(experiment, "CONFIG", ExperimentConfig))
    if not is_main_process():  # every process runs the experiment; only process 0 keeps what it writes
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fastsample-worker-") as scratch, _precision(cfg):
            experiment.run(cfg, Path(scratch), progress=False)
        return 0
    folder = results.new_results_dir(cfg.output_dir, cfg.name)
    with _precision(cfg):
        results.write_config(folder, config_to_dict(cfg))
        (folder / "environment.json").write_text(json.dumps(results.environment(), indent=2))
        rows = experiment.run(cfg, folder, progress=not args.quiet)
    final = results.finalize(folder)
    table = (final / "table.md").read_text() if (final / "table.md").exists() else results.markdown_table(rows)
    print(table)
    print(f"results: {final}")
    return 0


def cmd_fit(args) -> int:
    """``run`` for a config whose ``fit`` section says what to fit (experiment ``fit_solvers``)."""
    args.overrides = ["experiment=fit_solvers", *args.overrides]
    return cmd_run(args)


def cmd_sample(args) -> int:
    import jax
    import numpy as np

    from . import prior, sample
    from .config import build_model, build_process
    from .distributed import gather, is_main_process

    cfg = load_config(args.config, args.overrides)
    with _precision(cfg):
        process = build_process(cfg.process)
        model = build_model(cfg.model)
        x_T = prior(process, jax.random.PRNGKey(cfg.seed), (cfg.num_samples, model.dim))
        # several devices (or processes) share the batch when it splits evenly; the samples are the same
        mesh = "all" if jax.device_count() > 1 and cfg.num_samples % jax.device_count() == 0 else None
        x = sample(model.denoiser(process), x_T, cfg.solvers[0], nfe=cfg.nfe[0], schedule=cfg.schedule,
                   schedule_options=cfg.schedule_options, mesh=mesh)
        x = gather(x)
    if not is_main_process():
        return 0
    np.save(args.out, x)
    print(f"wrote {cfg.num_samples} samples ({cfg.solvers[0]}, NFE {cfg.nfe[0]}) to {args.out}")
    return 0


def cmd_train_model(args) -> int:
    from . import results
    from .config import TrainConfig
    from .distributed import is_main_process
    from .models.training import evaluate, train

    cfg = load_config(args.config, args.overrides, cls=TrainConfig)
    run_dir = Path(cfg.output_dir) / cfg.name
    # every process trains (checkpoints are saved collectively); only process 0 writes the evaluation
    trained, state, losses = train(cfg, progress=not args.quiet and is_main_process(), run_dir=run_dir)
    row = {"name": cfg.name, "step": int(state.step), "final_loss": losses[-1] if losses else None}
    if not is_main_process():
        return 0
    if cfg.eval_samples > 0:
        metrics_row, x = evaluate(trained, cfg)
        row.update(metrics_row)
        (run_dir / "eval.json").write_text(json.dumps(row, indent=2))
        results.plot_samples(x, run_dir / "samples.png", f"{cfg.name}: {cfg.eval_solver}, NFE {cfg.eval_nfe}")
    print(results.markdown_table([row]))
    print(f"checkpoints: {run_dir}")
    return 0


def cmd_list(args) -> int:
    import dataclasses

    import fastsample

    from .config import TRAIN_DATA, ModelConfig, ProcessConfig
    from .models.networks import NETWORKS
    from .models.training import OBJECTIVES

    def choices(cls, name):
        return ", ".join(next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"])

    experiments = sorted({p.stem for root in (Path.cwd(), Path(__file__).resolve().parents[1])
                          for p in (root / "experiments").glob("*.py") if not p.stem.startswith("_")})
    sections = {
        "solvers": ", ".join(fastsample.available_solvers()),
        "schedules": ", ".join(fastsample.available_schedules()),
        "learned solvers": ", ".join(fastsample.learned.METHODS),
        "gradient modes": ", ".join(fastsample.available_gradients()),
        "processes": f"{choices(ProcessConfig, 'kind')} (vp_discrete presets: {choices(ProcessConfig, 'preset')})",
        "models": choices(ModelConfig, "kind"),
        "networks": ", ".join(NETWORKS),
        "objectives": ", ".join(OBJECTIVES),
        "training data": ", ".join(TRAIN_DATA),
        "experiments": ", ".join(experiments) or "(none found)",
    }
    for name, value in sections.items():
        print(f"{name}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastsample", description="Few-step sampling of diffusion and flow models.")
    sub = parser.add_subparsers(dest="command", required=True)
    multi = argparse.ArgumentParser(add_help=False)  # multi-process start-up (fastsample.distributed.initialize)
    group = multi.add_argument_group("multi-process (default: one process; or FASTSAMPLE_* / JAX_* environment)")
    group.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    group.add_argument("--num-processes", type=int, default=None, help="number of processes in the job")
    group.add_argument("--process-id", type=int, default=None, help="this process's id, 0 ... num-processes - 1")
    p_run = sub.add_parser("run", parents=[multi], help="run an experiment config and write a results folder")
    p_run.add_argument("config")
    p_run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. nfe=[5,10] model.seed=1")
    p_run.add_argument("--quiet", action="store_true", help="no progress bar")
    p_run.set_defaults(func=cmd_run)
    p_fit = sub.add_parser("fit", parents=[multi],
                           help="fit learned solvers (the config's fit section); resumes from checkpoints")
    p_fit.add_argument("config")
    p_fit.add_argument("overrides", nargs="*", help="key=value overrides, e.g. fit.steps=100 nfe=[5]")
    p_fit.add_argument("--quiet", action="store_true", help="no progress bar")
    p_fit.set_defaults(func=cmd_fit)
    p_sample = sub.add_parser("sample", parents=[multi], help="draw samples with the config's first solver and NFE")
    p_sample.add_argument("config")
    p_sample.add_argument("overrides", nargs="*")
    p_sample.add_argument("--out", default="samples.npy")
    p_sample.set_defaults(func=cmd_sample)
    p_train = sub.add_parser("train-model", parents=[multi], help="train a network from a training config (resumes)")
    p_train.add_argument("config")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=500 network.hidden=128")
    p_train.add_argument("--quiet", action="store_true", help="no progress bar")
    p_train.set_defaults(func=cmd_train_model)
    sub.add_parser("list", help="list solvers, schedules, processes, models and experiments").set_defaults(
        func=cmd_list)
    sub.add_parser("solvers", help="list solver names").set_defaults(
        func=lambda a: print("\n".join(__import__("fastsample").available_solvers())) or 0)
    sub.add_parser("schedules", help="list schedule names").set_defaults(
        func=lambda a: print("\n".join(__import__("fastsample").available_schedules())) or 0)
    args, extra = parser.parse_known_args(argv)  # key=value overrides may follow options too
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        if args.command in ("run", "fit", "sample", "train-model"):
            from .distributed import initialize

            initialize(args.coordinator_address, args.num_processes, args.process_id)
        return args.func(args)
    except ConfigError as e:
        print(f"fastsample: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"fastsample: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
