"""Mutation testing (mutmut 3) of the format, recipe and mapping modules, in a git worktree.

    python -m tests.mutation [--worktree DIR] [--jobs N] [GROUP ...]   # make mutation

mutmut rewrites the modules it mutates, so it never runs in this checkout: the committed HEAD is
checked out (detached) in a worktree (default ../nemoq-mutation), each group's mutmut
configuration is written there as setup.cfg, and `mutmut run` mutates the copy under its
`mutants/` folder, running for each mutant only the tests of the group's selection that call the
mutated function. Prints killed / survived / timeout / no-test counts per group and writes the
surviving mutants' diffs to <worktree>/mutation-<group>.txt. docs/mutation.md has the last run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# group -> (modules mutated, the test files that exercise them)
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "formats": (
        ("nemoq/quant/formats/*",),
        ("tests/test_formats.py", "tests/test_format_searches.py", "tests/test_golden_bytes.py",
         "tests/test_mutants_formats.py"),
    ),
    "recipes": (
        ("nemoq/quant/recipes.py", "nemoq/quant/choose.py"),
        ("tests/test_recipes.py", "tests/test_quantize_labels.py", "tests/test_imatrix.py",
         "tests/test_mutants_recipes.py"),
    ),
    "convert": (
        ("nemoq/convert/mapping.py", "nemoq/convert/metadata.py"),
        ("tests/test_convert_readback.py", "tests/test_convert_golden.py", "tests/test_quantize_labels.py",
         "tests/test_mutants_convert.py"),
    ),
}

# mutmut's exit-code verdicts (mutmut/stats.py), folded into the columns we report
VERDICT = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout",
           24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", -9: "segfault", -11: "segfault",
           None: "not checked"}   # a run stopped before it reached the mutant


# Groups whose tests load torch (checkpoint fixtures) fork each mutant from a server process that
# has not started torch's threads: a fork of mutmut's own process deadlocks there.
FORKSERVER = {"recipes", "convert"}


def setup_cfg(modules, tests, forkserver: bool = False) -> str:
    lines = ["[mutmut]", "source_paths = nemoq", "only_mutate ="]
    lines += [f"    {m}" for m in modules]
    lines += ["pytest_add_cli_args = -p no:cacheprovider -q", "pytest_add_cli_args_test_selection ="]
    lines += [f"    {t}" for t in tests]
    lines += ["process_isolation = forkserver"] if forkserver else []
    return "\n".join(lines) + "\n"


def worktree(path: Path) -> None:
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    if not path.exists():
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, head], check=True)
    else:
        subprocess.run(["git", "-C", path, "checkout", "--detach", head], check=True)


def mutmut(path: Path, *args: str, log=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = ["nice", "-n", "10", sys.executable, "-m", "mutmut", *args]
    return subprocess.run(cmd, cwd=path, env=env, text=True, stdout=log or subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def tally(mutants: Path) -> dict[str, dict[str, int]]:
    """Per mutated module: verdict -> count, from mutmut's .meta files."""
    counts: dict[str, dict[str, int]] = {}
    for meta in sorted((mutants / "nemoq").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        c = counts.setdefault(module, {})
        for code in codes.values():
            verdict = VERDICT.get(code, "suspicious")
            c[verdict] = c.get(verdict, 0) + 1
    return counts


def survivors(path: Path) -> list[str]:
    out = mutmut(path, "results").stdout
    return [line.split(":")[0].strip() for line in out.splitlines() if line.strip().endswith(": survived")]


def head(path: Path) -> str:
    return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def run_group(path: Path, group: str, jobs: int) -> dict[str, dict[str, int]]:
    modules, tests = GROUPS[group]
    (path / "setup.cfg").write_text(setup_cfg(modules, tests, group in FORKSERVER))
    shutil.rmtree(path / "mutants", ignore_errors=True)
    with open(path / f"mutation-{group}.log", "w") as log:
        mutmut(path, "run", "--max-children", str(jobs), log=log)
    with open(path / f"mutation-{group}.txt", "w") as report:
        for name in survivors(path):
            report.write(mutmut(path, "show", name).stdout + "\n")
    (path / "mutants" / "RUN_COMMIT").write_text(head(path))
    counts = tally(path / "mutants")
    shutil.rmtree(path / f"mutants-{group}", ignore_errors=True)
    (path / "mutants").rename(path / f"mutants-{group}")
    return counts


def recheck(path: Path, group: str, jobs: int) -> dict[str, dict[str, int]]:
    """The mutants a run of the group left alive (survived, no tests), run again against the
    group's test_mutants_*.py alone: tests added since, so a mutant they fail is killed whatever the
    rest of the selection does. Cheap where a full run is not; verdicts merge into mutants-<group>."""
    modules, tests = GROUPS[group]
    done = path / f"mutants-{group}"
    run_commit = (done / "RUN_COMMIT").read_text().strip()
    if subprocess.run(["git", "-C", path, "diff", "--quiet", run_commit, "HEAD", "--", *modules]).returncode:
        sys.exit(f"tests.mutation: {', '.join(modules)} changed since the {group} run at {run_commit}: run it again")
    metas = {meta.relative_to(done): json.loads(meta.read_text()) for meta in (done / "nemoq").rglob("*.py.meta")}
    alive = [name for m in metas.values() for name, code in m["exit_code_by_key"].items()
             if VERDICT.get(code) in ("survived", "no tests")]
    new_tests = [t for t in tests if "/test_mutants_" in t]
    (path / "setup.cfg").write_text(setup_cfg(modules, new_tests, group in FORKSERVER))
    shutil.rmtree(path / "mutants", ignore_errors=True)
    with open(path / f"mutation-{group}-recheck.log", "w") as log:
        mutmut(path, "run", "--max-children", str(jobs), *alive, log=log)
    for rel, m in metas.items():
        again = json.loads((path / "mutants" / rel).read_text())["exit_code_by_key"]
        for name, code in m["exit_code_by_key"].items():
            if name in alive and VERDICT.get(again.get(name)) in ("killed", "timeout"):
                m["exit_code_by_key"][name] = again[name]
        (done / rel).write_text(json.dumps(m, indent=4))
    still = {name for m in metas.values() for name, code in m["exit_code_by_key"].items()
             if VERDICT.get(code) in ("survived", "no tests")}
    with open(path / f"mutation-{group}.txt", "w") as report:
        for name in sorted(still):
            report.write(mutmut(path, "show", name).stdout + "\n")
    shutil.rmtree(path / "mutants")
    return tally(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="*", default=list(GROUPS), help=f"any of {', '.join(GROUPS)}")
    parser.add_argument("--worktree", type=Path, default=ROOT.parent / "nemoq-mutation")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--recheck", action="store_true",
                        help="re-run only the mutants the last run left alive, against test_mutants_*.py")
    args = parser.parse_args()
    path = args.worktree.resolve()
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        sys.exit(f"tests.mutation: unknown group(s) {', '.join(sorted(unknown))}; the groups are {', '.join(GROUPS)}")
    if path == ROOT:
        sys.exit("tests.mutation: the worktree must not be this checkout (mutmut rewrites modules)")
    worktree(path)
    if args.recheck and not all((path / f"mutants-{g}").is_dir() for g in args.groups):
        sys.exit("tests.mutation: --recheck needs a finished run of each group first")
    print(f"{'module':44} {'killed':>7} {'survived':>8} {'timeout':>7} {'no tests':>8} {'other':>6} {'rate':>6}")
    for group in args.groups:
        counts = (recheck if args.recheck else run_group)(path, group, args.jobs)
        total: dict[str, int] = {}
        for module, c in counts.items():
            for k, v in c.items():
                total[k] = total.get(k, 0) + v
            print(row(module, c))
        print(row(f"{group} (all)", total))
    print(f"surviving mutants: {path}/mutation-<group>.txt")


def row(name: str, c: dict[str, int]) -> str:
    """Rate: killed or timed out (the mutant made the tests hang) over the mutants checked; "other"
    is mutants not checked (a stopped run), suspicious ones and crashes."""
    killed, timeout, survived, no_tests = (c.get(k, 0) for k in ("killed", "timeout", "survived", "no tests"))
    checked = killed + timeout + survived + no_tests
    rate = (killed + timeout) / max(checked, 1)
    return (f"{name:44} {killed:7d} {survived:8d} {timeout:7d} {no_tests:8d} {sum(c.values()) - checked:6d}"
            f" {100 * rate:5.1f}%")


if __name__ == "__main__":
    main()
