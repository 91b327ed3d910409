"""Replicate one figure of the Adam paper with `python -m tuning replicate`.

    python examples/replicate_figure.py --figure 2   # needs MNIST
    python examples/replicate_figure.py --small      # seconds (CI)
    python examples/replicate_figure.py --keep out/  # keep figure, report

The run's folder is temporary unless `--keep DIR` is given. The script
prints each claim's PASS, FAIL, UNDECIDED or NOT RUN line from report.md.
`--small` runs the counterexample figure (Reddi et al.'s, no data) at the
quick scale, which
takes seconds; the other figures at the quick scale take minutes each and
need their data (see docs/replicate.md).
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main(figure, scale, keep=None):
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet children
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(keep or scratch)
        subprocess.run([sys.executable, "-m", "tuning", "replicate",
                        "--figure", figure, "--scale", scale,
                        "--directory", str(folder)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        report = (folder / "report.md").read_text()
        claims = [line for line in report.splitlines()
                  if any(w in line for w in ("PASS", "FAIL", "NOT RUN",
                                             "UNDECIDED"))]
        print(f"figure {figure}, {scale} scale:")
        print("\n".join(claims))
        if keep:
            print(f"figure and report kept in {folder}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", default="amsgrad",
                        choices=["1", "2", "3", "4", "amsgrad"])
    parser.add_argument("--scale", default="quick",
                        choices=["tiny", "quick", "full"])
    parser.add_argument("--keep", metavar="DIR",
                        help="write the run to DIR and keep it")
    parser.add_argument("--small", action="store_true",
                        help="the counterexample at the quick scale (CI)")
    args = parser.parse_args()
    main("amsgrad" if args.small else args.figure,
         "quick" if args.small else args.scale, args.keep)
