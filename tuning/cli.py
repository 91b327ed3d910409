"""Command line: `python -m tuning` (or `adam-plus-tune`).

    python -m tuning [options]        a search (default: digits, random)
    python -m tuning report DIR       rebuild tables, summary and plots of DIR
    python -m tuning replicate [...]  the paper's experiments (replicate)

Every option is checked before Keras is imported. A mistake is one line on
stderr and exit status 2 (a bad option) or 1 (a run that cannot go on);
Ctrl-C stops with one line and status 130, and the same command resumes.
Every command ends with its next step.
"""

import argparse
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

from tuning import benchmarks, rundir
from tuning import workers as machine
from tuning.confirm import MINIMUMS as CONFIRM_MINIMUMS
from tuning.confirm import confirm
from tuning.datasets import SUBSET_RULE, check_subset
from tuning.errors import (
    Parser,
    Stopped,
    TuningError,
    catch_interrupts,
    command,
    folder_path,
    quoted,
)
from tuning.rundir import is_distributed_child
from tuning.search_space import (
    LAYERWISE,
    NAMES,
    TUNABLE,
    SearchSpace,
    is_paper_default,
)
from tuning.sweep import (
    DEFAULT_TRIALS,
    MAXIMUMS,
    MINIMUMS,
    TUNERS,
    default_directory,
    search_settings,
)

INTERRUPTED = "interrupted; rerun the same command to resume"
CONFIRM_TOP, CONFIRM_SEEDS = 3, 5


# The smallest value of each integer option.
_MINIMUMS = {**MINIMUMS, "confirm": CONFIRM_MINIMUMS["top"],
             "seeds": CONFIRM_MINIMUMS["seeds"]}
# ... and the largest.
_MAXIMUMS = {**MAXIMUMS, "confirm": 1000, "seeds": 1000}


def _count(name):
    """An argparse type: an integer in [`_MINIMUMS[name]`,
    `_MAXIMUMS[name]`], written in ASCII digits."""
    minimum, maximum = _MINIMUMS[name], _MAXIMUMS[name]

    def count(text):
        # int() also takes "1_000", " 3 " and other scripts' digits.
        value = int(text) if re.fullmatch(r"-?[0-9]{1,30}", text) else None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}, got {text!r}")
        if value > maximum:
            raise argparse.ArgumentTypeError(
                f"must be an integer <= {maximum}, got {text!r}")
        return value

    return count


def _workers(text):
    """An argparse type: "auto" or an integer >= 0."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be an integer >= 0 or auto, got {text!r}")
    return value


def _address(text):
    """An argparse type: HOST:PORT (kept as text)."""
    try:
        machine.parse_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}, got {text!r}") from None
    return text


def _subset(text):
    """An argparse type: `check_subset` of a decimal number."""
    try:
        if not re.fullmatch(r"[0-9.eE+-]{1,40}", text):
            raise ValueError(text)
        return check_subset(float(text))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"must be {SUBSET_RULE}, got {text!r}") from None


def sweep_parser():
    """The parser of `python -m tuning [options]` (a search)."""
    prog = command()
    p = Parser(
        prog=prog,
        description="Sweep AdamPlus's learning_rate, beta_1, beta_2 and "
        "epsilon (and, with --tune, the layer-wise decay) through "
        "keras-tuner on a benchmark model; rerun the same command to "
        "resume.",
        epilog="subcommands:\n"
        f"  {prog} report DIR [--no-plots]   rebuild the tables, summary and "
        "plots of DIR\n"
        f"  {prog} replicate [options]       the Adam paper's experiments "
        "(see its --help)",
    )
    p.add_argument("--benchmark", default="digits",
                   choices=list(benchmarks.BENCHMARKS),
                   help="the model and data")
    p.add_argument("--dataset", default=None,
                   choices=list(benchmarks.MNIST_DATASETS),
                   help="for MNIST-shaped benchmarks (default: mnist)")
    p.add_argument("--mnist-idx", default=None, metavar="DIR", type=folder_path,
                   help="folder with the four LeCun MNIST IDX files "
                   "(default: $MNIST_IDX_DIR, then "
                   "$KERAS_HOME/datasets/mnist-idx)")
    p.add_argument("--tuner", default="random", choices=TUNERS,
                   help="keras-tuner's search algorithm")
    p.add_argument("--max-trials", type=_count("max_trials"),
                   default=DEFAULT_TRIALS,
                   help="trials in all (not Hyperband: it plans its own "
                   "from --epochs); may grow on a resume")
    p.add_argument("--epochs", type=_count("epochs"), default=None,
                   help="epochs per trial, Hyperband's most (default: the "
                   "scale's)")
    p.add_argument("--batch-size", type=_count("batch_size"), default=None,
                   help="default: the scale's")
    p.add_argument("--subset", type=_subset, default=None,
                   help=f"training examples: {SUBSET_RULE} (default: the "
                   "scale's)")
    p.add_argument("--scale", default="quick", choices=benchmarks.SCALES,
                   help="quick: CPU-sized; paper: the paper's batch size, "
                   "epochs and all the data")
    p.add_argument("--tune", nargs="+", default=list(TUNABLE),
                   choices=NAMES, metavar="NAME",
                   help=f"hyperparameters to search, of {' '.join(NAMES)} "
                   f"(default: {' '.join(TUNABLE)}; the others keep the "
                   "paper's values, and one learning rate for every layer)")
    p.add_argument("--modes", action="store_true",
                   help="also search amsgrad, epsilon_mode and weight decay")
    p.add_argument("--grid-steps", type=_count("grid_steps"), default=None,
                   help="--tuner grid only: values per decade (default: 1)")
    p.add_argument("--objective", default="val_loss",
                   help="what a trial is scored on: a name the benchmark's "
                   "fit logs (loss, val_loss, and accuracy, val_accuracy "
                   "for classifiers)")
    p.add_argument("--direction", default=None, choices=("min", "max"),
                   help="minimise or maximise the objective (default: "
                   "keras-tuner's rule from its name: losses min, accuracy "
                   "max)")
    p.add_argument("--directory", default=None, type=folder_path,
                   help="output folder; rerunning on it resumes (default: "
                   "tuning_runs/<benchmark>)")
    p.add_argument("--seed", type=_count("seed"), default=0,
                   help="seed of the oracle, the data subset and every "
                   "trial's initial weights")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh: remove the previous search's files "
                   "from --directory")
    p.add_argument("--workers", type=_workers, default=0, metavar="N",
                   help="run distributed: a chief and N worker processes on "
                   "this machine, at most one per GPU (per CPU core without "
                   "GPUs) and what memory covers; auto: that many")
    p.add_argument("--chief", type=_address, default=None,
                   metavar="HOST:PORT",
                   help="serve the search on HOST:PORT (unauthenticated: "
                   "trusted networks only) for --workers N local workers "
                   "and any that --join; ends when every trial has ended "
                   "(default: loopback, local workers only)")
    p.add_argument("--join", type=_address, default=None,
                   metavar="HOST:PORT",
                   help="run one worker of the chief at HOST:PORT (same "
                   "options, --directory shared with the chief)")
    p.add_argument("--no-plots", action="store_true",
                   help="skip the PNG plots")
    p.add_argument("--confirm", type=_count("confirm"), nargs="?",
                   const=CONFIRM_TOP, default=None, metavar="K",
                   help="after the search, retrain the K best configurations "
                   "and the paper's defaults with --seeds new seeds each and "
                   "test whether the best beats the defaults beyond seed "
                   f"noise (default: off; K = {CONFIRM_TOP} if omitted)")
    p.add_argument("--seeds", type=_count("seeds"), default=None,
                   metavar="N", help="--confirm's seeds per configuration, "
                   f"at least 2 (default: {CONFIRM_SEEDS})")
    return p



def report_parser():
    """The parser of `python -m tuning report DIR`."""
    p = Parser(prog=f"{command()} report",
               description="Rebuild trials.csv, trials.json, best.json, "
               "summary.txt and the plots of a search's directory.")
    p.add_argument("directory", metavar="DIR", type=folder_path)
    p.add_argument("--no-plots", action="store_true",
                   help="skip the PNG plots")
    return p


def main(argv=None):
    """Entry point of `python -m tuning` and `adam-plus-tune`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_tensorflow()
    machine.watch_launcher()  # in our launcher's chief and workers
    catch_interrupts()
    try:
        if argv[:1] == ["replicate"]:
            from tuning import replicate

            return replicate.main(argv[1:])
        if argv[:1] == ["report"]:
            return _report(report_parser().parse_args(argv[1:]))
        return _sweep(sweep_parser(), argv)
    except TuningError as err:
        print(f"{command()}: error: {err}", file=sys.stderr, flush=True)
        return 1
    except OSError as err:  # what no layer below could name better
        where = f"{quoted(err.filename)}: " if err.filename else ""
        print(f"{command()}: error: {where}{err.strerror or err}",
              file=sys.stderr,
              flush=True)
        return 1
    except Stopped as stop:
        name = signal.Signals(stop.signum).name
        print(f"stopped by {name}; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 128 + stop.signum
    except KeyboardInterrupt:
        if not os.environ.get(machine.LAUNCHER_PID):  # the launcher speaks
            print(INTERRUPTED, file=sys.stderr, flush=True)
        return 130


def _report(args):
    from tuning import report

    directory = Path(args.directory)
    report.write(directory, plots=not args.no_plots)
    _print_outputs(directory)
    confirmed = (directory / report.CONFIRM).is_file()
    running = rundir.running(directory)
    if running:  # its rerun would be refused: the folder is in use
        print(f"next step: a search is running there ({running}); rerun "
              "this report when it ends, or now for the trials done so far")
        return 0
    print("\n".join(next_steps(directory, None, confirmed) or [
        "next step: no trial has completed yet; rerun the search's command "
        "to resume it"]))
    return 0


def _sweep(parser, argv):
    from tuning.sweep import sweep

    args = parser.parse_args(argv)
    _check(parser, args)
    directory = args.directory or default_directory(args.benchmark)
    result = sweep(
        benchmark=args.benchmark, tuner=args.tuner,
        max_trials=args.max_trials, epochs=args.epochs, subset=args.subset,
        directory=directory, seed=args.seed, overwrite=args.overwrite,
        space=_space(args), dataset=args.dataset, idx_dir=args.mnist_idx,
        batch_size=args.batch_size, objective=args.objective,
        direction=args.direction, scale=args.scale, workers=args.workers,
        plots=not args.no_plots, child_argv=argv, chief=args.chief,
        join=args.join,
    )
    if result is None:
        return 0  # a chief or worker: the launcher reports
    if args.confirm:
        confirm(directory, top=args.confirm,
                seeds=args.seeds or CONFIRM_SEEDS, plots=not args.no_plots,
                idx_dir=args.mnist_idx)
    _print_outputs(Path(directory))
    print("\n".join(next_steps(Path(directory), argv, bool(args.confirm))))
    return 0


def next_steps(directory, argv, confirmed):
    """The lines printed after a search (or `report`: `argv` None): how to
    use best.json, and `--confirm` when it did not run after a search."""
    if not (directory / "best.json").is_file():
        return []
    lines = ["next steps:",
             "  train with the best configuration (its learning-rate "
             "schedule included):",
             "    import json; from keras_adam_plus import AdamPlus",
             "    optimizer = AdamPlus.from_config(json.load(open("
             f"{str(directory / 'best.json')!r})))"]
    if not confirmed and argv is not None:
        # Never --overwrite: rerun with it, the search would be deleted
        # and run again before the confirmation (found by a new user).
        kept = [a for a in argv if a != "--overwrite"]
        rerun = " ".join([command(), *map(quoted, kept)])
        if is_paper_default(rundir.read_json(directory / "best.json") or {
                "learning_rate": None}):
            # Nothing to check it against (a new user saw "tuned 1.2981,
            # paper defaults 1.2981").
            lines += ["  the best trial is the paper's defaults (AdamPlus() "
                      "as it is); to search further, add trials (a rerun "
                      "resumes):", f"    {rerun} --max-trials N"]
        else:
            lines += ["  check that it beats the paper's defaults beyond "
                      "seed noise (retrains the best and the defaults over "
                      "new seeds):", f"    {rerun} --confirm"]
    return lines


def _space(args):
    return SearchSpace(tune=tuple(args.tune), modes=args.modes,
                       grid_steps=args.grid_steps or 0)


def _check(parser, args):
    """Checks that need several options at once, before Keras loads."""
    twice = sorted({n for n in args.tune if args.tune.count(n) > 1})
    if twice:
        parser.error(f"argument --tune: {', '.join(twice)} given more than "
                     "once")
    if args.grid_steps is not None and args.tuner != "grid":
        parser.error("argument --grid-steps: only with --tuner grid")
    if args.seeds is not None and not args.confirm:
        parser.error("argument --seeds: only with --confirm")
    if args.join is not None:
        for given, option in ((args.workers, "--workers"),
                              (args.chief, "--chief"),
                              (args.overwrite, "--overwrite"),
                              (args.confirm, "--confirm")):
            if given:
                parser.error(f"argument --join: a joining worker takes no "
                             f"{option} (the chief's command does)")
    _check_workers(parser, args)
    if args.mnist_idx is not None and not Path(args.mnist_idx).is_dir():
        parser.error(f"argument --mnist-idx: no such folder: "
                     f"{quoted(args.mnist_idx)}")
    bench = benchmarks.get(args.benchmark)
    if args.dataset is not None and not bench.datasets:
        parser.error(f"argument --dataset: benchmark {args.benchmark} has no "
                     "dataset choice")
    if args.objective not in bench.objectives():
        parser.error(f"argument --objective: benchmark {args.benchmark} "
                     f"logs {', '.join(bench.objectives())}; got "
                     f"{args.objective!r}")
    layerwise = [n for n in args.tune if n in LAYERWISE]
    if layerwise and not bench.layerwise:
        parser.error(f"argument --tune: benchmark {args.benchmark}'s model "
                     "has one layer with variables, no depth for "
                     f"{' and '.join(layerwise)}")
    try:
        search_settings(
            args.benchmark, args.tuner, args.max_trials, args.epochs,
            args.subset, args.seed, _space(args), args.dataset,
            args.batch_size, args.objective, args.direction, args.scale)
    except ValueError as err:
        parser.error(str(err))


def _check_workers(parser, args):
    """`--workers` against what this machine holds, in argparse's words
    (the API's `sweep(workers=...)` says it in Keras's)."""
    most, why = machine.bound()
    if args.workers == "auto" and most < 1:
        parser.error(f"argument --workers: cannot be auto here: no worker "
                     f"fits ({why})")
    if args.workers != "auto" and args.workers > most:
        parser.error(f"argument --workers: must be at most {most} on this "
                     f"machine ({why}), or auto, got '{args.workers}'")
    args.workers = machine.check_workers(args.workers)


def quiet_tensorflow(environ=os.environ):
    """TensorFlow's start-up lines are noise in a command's output: its C++
    log below errors, and oneDNN's custom operations off (their notice is
    printed whatever the log level, through absl, before TensorFlow reads
    it). Each only where the user has not set it; `TF_ENABLE_ONEDNN_OPTS=1`
    keeps oneDNN's operations (and the notice). Before TensorFlow loads."""
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def run():
    """The console script's and `python -m tuning`'s entry point: `main`,
    then an exit that skips the interpreter's slow teardown of TensorFlow
    and JAX (seconds, after the last line), during which a Ctrl-C killed
    the process silently (signal handlers are gone by then). Every output
    file was written and closed (atomically) before `main` returned."""
    try:
        code = main()
        if is_distributed_child():
            sys.exit(code)  # keras-tuner's chief and workers end as they do
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # from here to exit
    except KeyboardInterrupt:  # as main returned
        print(INTERRUPTED, file=sys.stderr, flush=True)
        code = 130
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _print_outputs(directory):
    summary = directory / "summary.txt"
    if summary.is_file():
        print(summary.read_text(), end="")
    written = sorted(p.name for p in directory.iterdir()
                     if p.is_file() and not p.name.startswith("."))
    print(f"outputs in {quoted(f'{directory}/')}: {' '.join(written)}")
