"""The previous release's code as a peer in the same benchmark run: a git revision's `src/`
and `bench/` unpacked into a temporary directory (`git archive`, nothing checked out over the
work tree), and a function of one of its benchmark modules run in a child process whose
`sys.path` starts with that tree, so the child imports that revision's `hivenet`.

`run(tree, module, snippet)` runs `snippet` (Python source that may use `module` imported as
`bench` and must end by printing one JSON line) in a child; the current tree is run the same
way (`current_tree()`), so both sides pay the same process and import costs.

Clock: in the child, `time.perf_counter` is replaced by `time.process_time` before the
module is imported, so every interval the benchmark code times is CPU time of that process.
The machine these runs share has more busy processes than cores: wall-clock rates of
back-to-back runs varied 3x, CPU-time rates by a few percent.
Owns nothing else: no network, files only under the temporary directory it removes at exit.
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_trees: dict[str, Path] = {}


def current_tree() -> Path:
    return ROOT


def checkout(revision: str) -> Path:
    """`revision`'s src/ and bench/ in a temporary directory (once per revision)."""
    if revision in _trees:
        return _trees[revision]
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{revision}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"--base: cannot resolve git revision {revision!r}: {error}") from None
    target = Path(tempfile.mkdtemp(prefix="hn-bench-base-"))
    atexit.register(shutil.rmtree, target, True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "src", "bench"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    _trees[revision] = target
    return target


def describe(revision: str) -> str:
    """`revision` as a short commit id (for the table and the JSON line)."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or revision


def run(tree: Path, module: str, snippet: str) -> dict[str, object]:
    """Run `snippet` with `bench` = `tree`/bench/`module`.py, importing `tree`'s hivenet;
    returns the JSON object of its last output line."""
    prologue = (
        "import sys, json, time\n"
        "time.perf_counter = time.process_time\n"
        f"sys.path[:0] = [{str(tree / 'src')!r}, {str(tree / 'bench')!r}]\n"
        f"import {module} as bench\n"
        "import hivenet\n"
        f"assert hivenet.__file__.startswith({str(tree / 'src')!r}), hivenet.__file__\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", prologue + snippet],
        capture_output=True,
        text=True,
        cwd=str(tree),
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark child in {tree} failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"benchmark child in {tree} printed nothing:\n{done.stderr[-3000:]}")
    result: dict[str, object] = json.loads(lines[-1])
    return result
