"""Runs every code block of README.md and docs/ that is marked runnable.

A block is runnable when the line just before its opening fence is the HTML
comment `<!-- run -->` (invisible on GitHub and in the built site):

    <!-- run -->
    ```python
    ...
    ```

`python` blocks run with this interpreter, `bash` blocks with `bash -e`, each
in a fresh temporary folder (removed afterwards, so files a block writes go
nowhere) with the repository on PYTHONPATH and in $REPO, one process per
block, so every block must stand on its own. The Keras backend is the
caller's KERAS_BACKEND.

    python .ci/doc_blocks.py            # run them all; exit 1 if one fails
    python .ci/doc_blocks.py --list     # only list them
    python .ci/doc_blocks.py --verbose  # and show what each prints
    python .ci/doc_blocks.py --jobs 1   # one at a time (default: 2)
"""

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- run -->"
FENCE = re.compile(r"^(\s*)```+\s*(\w+)")
RUNNERS = {"python": [sys.executable], "bash": ["bash", "-e"]}


def pages():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))


def blocks(path):
    """(line number, language, code) of each marked block of `path`."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if not fence or fence.group(2) not in RUNNERS:
            raise SystemExit(f"{path.relative_to(ROOT)}:{i + 1}: {MARKER} "
                             "must come just before a ```python or ```bash "
                             "fence")
        indent, code = len(fence.group(1)), []
        for body in lines[i + 2:]:
            if body.strip().startswith("```"):
                break
            code.append(body[indent:])
        yield i + 3, fence.group(2), "\n".join(code) + "\n"


def run(path, line, language, code):
    """Runs one block; returns (passed, a report: its line and output)."""
    env = dict(os.environ, REPO=str(ROOT))
    # TensorFlow's start-up lines off, as in the examples.
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="doc_block_") as folder:
        script = Path(folder) / ("block.py" if language == "python"
                                 else "block.sh")
        script.write_text(code)
        start = time.monotonic()
        out = subprocess.run([*RUNNERS[language], str(script)], cwd=folder,
                             env=env, capture_output=True, text=True)
    where = f"{path.relative_to(ROOT)}:{line}"
    head = (f"{'ok  ' if out.returncode == 0 else 'FAIL'} {where} "
            f"({language}, {time.monotonic() - start:.1f} s)")
    return out.returncode == 0, head, out.stdout[-3000:] + out.stderr[-3000:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true",
                        help="list the runnable blocks, run nothing")
    parser.add_argument("--verbose", action="store_true",
                        help="print every block's output")
    parser.add_argument("--jobs", type=int, default=2,
                        help="blocks run at a time (default: 2)")
    args = parser.parse_args()
    found = [(p, *b) for p in pages() for b in blocks(p)]
    if args.list:
        for path, line, language, _ in found:
            print(f"{path.relative_to(ROOT)}:{line} {language}")
        return 0
    failed = 0
    # Blocks are independent processes: run `--jobs` at a time, report each
    # as it ends.
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for future in concurrent.futures.as_completed(
                [pool.submit(run, *b) for b in found]):
            passed, head, output = future.result()
            failed += not passed
            print(head + ("\n" + output if output and (
                args.verbose or not passed) else ""), flush=True)
    print(f"{len(found) - failed}/{len(found)} runnable blocks ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
