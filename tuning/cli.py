"""Command line: `python -m tuning` (or `adam-plus-tune`).

    python -m tuning [sweep options]      a sweep (default: digits, random)
    python -m tuning report DIR           rebuild tables and plots of DIR
    python -m tuning replicate [...]      the paper's experiments (replicate)
"""

import argparse
import sys

from tuning import benchmarks, report
from tuning.search_space import TUNABLE, SearchSpace
from tuning.sweep import TUNERS, sweep


def _subset(text):
    value = float(text)
    return int(value) if value > 1 else value


def sweep_parser():
    p = argparse.ArgumentParser(
        prog="python -m tuning",
        description="Sweep AdamPlus's learning_rate, beta_1, beta_2 and "
        "epsilon through keras-tuner on a benchmark model. Subcommand: "
        "'report DIR' rebuilds tables and plots.",
    )
    p.add_argument("--benchmark", default="digits",
                   choices=list(benchmarks.BENCHMARKS))
    p.add_argument("--dataset", default=None,
                   choices=list(benchmarks.MNIST_DATASETS),
                   help="for MNIST-shaped benchmarks (default mnist)")
    p.add_argument("--mnist-idx", default=None, metavar="DIR",
                   help="folder with the four LeCun MNIST IDX files")
    p.add_argument("--tuner", default="random", choices=TUNERS)
    p.add_argument("--max-trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per trial (default: the scale's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--subset", type=_subset, default=None,
                   help="fraction (<= 1) or count of training examples")
    p.add_argument("--scale", default="quick", choices=["quick", "paper"])
    p.add_argument("--tune", nargs="+", default=list(TUNABLE),
                   choices=TUNABLE, help="hyperparameters to search")
    p.add_argument("--modes", action="store_true",
                   help="also search amsgrad, epsilon_mode, weight decay")
    p.add_argument("--grid-steps", type=int, default=1,
                   help="GridSearch: values per decade (default 1)")
    p.add_argument("--objective", default="val_loss")
    p.add_argument("--directory", default="tuning_runs/digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh instead of resuming")
    p.add_argument("--workers", type=int, default=0,
                   help="run distributed: one chief and N worker processes")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv=None):
    """Entry point of `python -m tuning` and `adam-plus-tune`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["replicate"]:
        from tuning import replicate

        return replicate.main(argv[1:])
    if argv[:1] == ["report"]:
        if len(argv) != 2:
            sys.exit("usage: python -m tuning report DIR")
        result = report.write(argv[1])
        print(report.summary(result, report.collect(argv[1])[1]), end="")
        return 0
    args = sweep_parser().parse_args(argv)
    space = SearchSpace(tune=tuple(args.tune), modes=args.modes,
                        grid_steps=args.grid_steps if args.tuner == "grid"
                        else 0)
    result = sweep(
        benchmark=args.benchmark, tuner=args.tuner,
        max_trials=args.max_trials, epochs=args.epochs, subset=args.subset,
        directory=args.directory, seed=args.seed, overwrite=args.overwrite,
        space=space, dataset=args.dataset, idx_dir=args.mnist_idx,
        batch_size=args.batch_size, objective=args.objective,
        scale=args.scale, workers=args.workers, plots=not args.no_plots,
        child_argv=argv,
    )
    if result is not None:
        print(report.summary(result, report.collect(args.directory)[1]),
              end="")
        print(f"outputs in {args.directory}/: trials.csv trials.json "
              "best.json summary.txt *.png")
    return 0
