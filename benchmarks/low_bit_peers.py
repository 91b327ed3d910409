"""Step time of AdamPlus's 8-bit state against torchao's and bitsandbytes'
8-bit Adam, on the torch backend of this machine.

    python benchmarks/low_bit_peers.py            # 10M in 1 and in 200
    python benchmarks/low_bit_peers.py --quick    # 1M in 1 and in 100

Each optimizer runs in its own process (importing torchao slows other
torch code in the same process), `--rounds` times in turn, so that drift in
the machine's speed hits each alike; a process times the median of
`--steps` steps after warm-up (torchao compiles its step). The table
prints each median over the rounds and its ratio to "AdamPlus 8bit" and to
AdamPlus with float32 state ("AdamPlus"), measured in the same run. A peer
that does not import here (neither is a dependency) is reported as not
timed.

The sizes are multiples of 256: torchao quantizes only a tensor whose
size is (its `_new_buffer`: at least 4096 values and a whole number of
blocks) and keeps float32 state for the others, so a case of other sizes
would time its float32 step.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {"10M x 1": [10_240_000], "10M x 200": [51_200] * 200}
QUICK_CASES = {"1M x 1": [1_024_000], "1M x 100": [10_240] * 100}
ROWS = ("AdamPlus", "AdamPlus 8bit", "torchao Adam8bit",
        "bitsandbytes Adam8bit")


def _optimizer(row, sizes):
    """`(step, state bytes)` of `row` on fresh parameters of `sizes`."""
    import importlib

    import keras
    import torch

    grads = [torch.randn(n) for n in sizes]
    if row.startswith("AdamPlus"):
        from keras_adam_plus import AdamPlus

        variables = [keras.Variable(torch.zeros(n)) for n in sizes]
        optimizer = AdamPlus(state_format="8bit" if "8bit" in row
                             else "native")
        optimizer.build(variables)
        return lambda: optimizer.apply(grads, variables)
    module = {"torchao": "torchao.optim",
              "bitsandbytes": "bitsandbytes.optim"}[row.split()[0]]
    make = importlib.import_module(module).Adam8bit
    params = [torch.zeros(n, requires_grad=True) for n in sizes]
    for p, g in zip(params, grads):
        p.grad = g
    return make(params, lr=1e-3).step


def worker(row, case, steps, warmup=3):
    """Median seconds of one step of `row` on `case`, or an error line."""
    sizes = {**CASES, **QUICK_CASES}[case]
    try:
        step = _optimizer(row, sizes)
    except (ImportError, AttributeError, RuntimeError) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1M parameters: a smoke run")
    p.add_argument("--rounds", type=int, default=3,
                   help="turns each optimizer takes (default: 3)")
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps a turn (default: 5)")
    p.add_argument("--json", metavar="FILE", help="also write the table")
    p.add_argument("--worker", nargs=2, metavar=("ROW", "CASE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name}: must be at least 1, got "
                    f"{getattr(args, name)}")
    if args.worker:
        print("@@" + json.dumps(worker(*args.worker, args.steps)))
        return 0
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3")
    table = {}
    for case in QUICK_CASES if args.quick else CASES:
        samples = {row: [] for row in ROWS}
        for _ in range(args.rounds):
            for row in ROWS:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", row, case,
                     f"--steps={args.steps}"], env=env, text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                result = (json.loads(out.stdout.rpartition("@@")[2])
                          if "@@" in out.stdout else
                          f"exit {out.returncode}")
                samples[row].append(result)
        table[case] = {row: (statistics.median(s) if all(
            isinstance(x, float) for x in s) else s[0])
            for row, s in samples.items()}
        _print(case, table[case])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return 0


def _print(case, times):
    print(f"\n## torch, {case}\n")
    print("| optimizer | ms/step | x AdamPlus 8bit | x AdamPlus |")
    print("| --- | ---: | ---: | ---: |")
    for row, seconds in times.items():
        if not isinstance(seconds, float):
            print(f"| {row} | not timed ({seconds}) | | |")
            continue
        ratios = [f"{seconds / times[peer]:.2f}"
                  if isinstance(times.get(peer), float) else ""
                  for peer in ("AdamPlus 8bit", "AdamPlus")]
        print(f"| {row} | {1e3 * seconds:.1f} | {ratios[0]} | "
              f"{ratios[1]} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
