"""Run timm's own generic model tests (``tests/test_models.py`` of the installed timm version) on our
models and print a pass/fail table (``make compat``).

1. ``pip download --no-deps --no-binary :all: timm==<installed>`` fetches timm's source distribution
   (cached under ``build/timm-compat/<version>/``) and ``tests/test_models.py`` is taken from it;
2. ``compat/conftest.py`` goes next to it: it only chooses which models the registry-parametrised
   tests receive (one tiny variant per family) and skips, with the reason, those that cannot apply;
3. pytest runs the file (``-n`` workers, one torch thread each) and writes a JUnit report
   (``COMPAT_VARIANTS=tiny`` in the environment selects the *_tiny_* variants, see the conftest);
4. the table: one row per test, one column per family; ``ok`` passed, ``FAIL`` failed, ``n/a``
   not applicable (reasons below the table), ``skip`` skipped by timm itself (its reason too),
   ``-`` not selected by timm's own filters. Exit status 1 when any test failed.

Usage: ``python compat/run_timm_tests.py [--workers 2] [-k EXPR]``.
"""
from __future__ import annotations

import argparse
import collections
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAMILIES = ("stvit", "stvit_r", "stvit_r_det", "stvit_swin", "lookupvit", "vit_video", "stvit_video",
            "lookupvit_video", "video_swin", "stvit_video_swin")
# the name before '_tiny' of the families whose variant names say more than the family
_PREFIXES = {"stvit_deit": "stvit", "stvit_r_swin": "stvit_r", "stvit_r_det_swin": "stvit_r_det"}


def family(model: str) -> str | None:
    """Our family of a model name (test_stvit_r, stvit_r_swin_tiny_patch4_window7_224.tag, ...), else None."""
    name = model.split(".")[0]
    if name.startswith("test_"):
        name = name[len("test_"):]
    else:
        name = name.split("_tiny")[0]
        name = _PREFIXES.get(name, name)
    return name if name in FAMILIES else None


def fetch_test_file(version: str, cache: str) -> str:
    """tests/test_models.py of timm ``version`` from its sdist (downloaded once into ``cache``)."""
    target = os.path.join(cache, "test_models.py")
    if os.path.isfile(target):
        return target
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"timm=={version}", "-d", tmp]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        sdists = [f for f in os.listdir(tmp) if f.endswith((".tar.gz", ".zip"))]
        if not sdists:
            sys.exit(f"pip download gave no source distribution of timm {version} in {tmp}")
        with tarfile.open(os.path.join(tmp, sdists[0])) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/tests/test_models.py")), None)
            if member is None:
                sys.exit(f"{sdists[0]} holds no tests/test_models.py")
            with tar.extractfile(member) as src, open(target + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(target + ".part", target)
    return target


def registry_tests(test_file: str) -> dict[str, str]:
    """Test functions parametrised over the model registry -> the call that selects their models."""
    src = open(test_file).read()
    out = {}
    for m in re.finditer(r"parametrize\(\s*'model_name',\s*(list_(?:models|pretrained)\((?:[^()]|\([^()]*\))*\))"
                         r"\s*,?\s*\)(?:\s*@[^\n]*)*\s*def (test_\w+)", src):
        out[m.group(2)] = " ".join(m.group(1).split())
    return out


def parse_report(path: str):
    """JUnit XML -> {(test, model): (status, message)}."""
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        m = re.match(r"(test_\w+)\[(.*)\]$", case.get("name", ""))
        if not m:
            continue
        test, params = m.groups()
        model = next((family(p) for p in params.split("-") if family(p)), None)
        if model is None:
            continue
        status, msg = "ok", ""
        for tag, st in (("failure", "FAIL"), ("error", "FAIL"), ("skipped", "skip")):
            node = case.find(tag)
            if node is not None:
                status, msg = st, (node.get("message") or node.text or "").strip()
                break
        if status == "skip" and "not applicable:" in msg:
            status, msg = "n/a", msg.split("not applicable:", 1)[1].strip()
        results[(test, model)] = (status, msg)
    return results


def first_line(msg: str, width: int = 150) -> str:
    """The message's first line, with the next one when the first only names the exception."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    line = " ".join(lines[:2]) if lines and re.fullmatch(r"[\w.]+:", lines[0]) else (lines[0] if lines else "")
    return line if len(line) <= width else line[:width - 3] + "..."


def print_table(results, selectors, elapsed: float) -> int:
    tests = list(dict.fromkeys(list(selectors) + sorted({t for t, _ in results})))
    models = FAMILIES
    w0 = max(len(t) for t in tests)
    widths = [max(len(m), 4) for m in models]
    print()
    print(" ".join([f"{'test':<{w0}}"] + [f"{m:>{w}}" for m, w in zip(models, widths)]))
    counts = collections.Counter()
    for t in tests:
        row = []
        for m, w in zip(models, widths):
            status = results.get((t, m), ("-", ""))[0]
            counts[status] += status != "-"
            row.append(f"{status:>{w}}")
        print(" ".join([f"{t:<{w0}}"] + row))
    print()
    print(f"{sum(counts.values())} items: {counts['ok']} passed, {counts['FAIL']} failed, {counts['n/a']} not "
          f"applicable, {counts['skip']} skipped by timm; {elapsed:.0f} s")

    unselected = [t for t in selectors if not any(k[0] == t for k in results)]
    if unselected:
        print("\nselect none of our models by timm's own filters:")
        for t in unselected:
            print(f"  {t}: {selectors[t]}")
    reasons = collections.defaultdict(list)
    for (t, m), (status, msg) in results.items():
        if status in ("n/a", "skip"):
            reasons[(status, t, first_line(msg))].append(m)
    if reasons:
        print("\nnot applicable / skipped:")
        for (status, t, msg), ms in sorted(reasons.items()):
            print(f"  {status} {t} [{', '.join(ms)}]: {msg}")
    failures = [(t, m, first_line(msg)) for (t, m), (status, msg) in sorted(results.items()) if status == "FAIL"]
    if failures:
        print("\nfailures:")
        for t, m, msg in failures:
            print(f"  {t}[{m}]: {msg}")
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=int(os.environ.get("COMPAT_WORKERS", 2)),
                   help="pytest-xdist workers (default 2; 0 runs in one process)")
    p.add_argument("-k", default=None, help="pytest -k expression (a subset of the tests)")
    p.add_argument("--cache", default=os.path.join(ROOT, "build", "timm-compat"),
                   help="where timm's test file and the report go (default build/timm-compat)")
    args = p.parse_args(argv)

    version = importlib.metadata.version("timm")
    work = os.path.join(args.cache, version)
    test_file = fetch_test_file(version, work)
    shutil.copy(os.path.join(HERE, "conftest.py"), os.path.join(work, "conftest.py"))
    report = os.path.join(work, f"report-{os.environ.get('COMPAT_VARIANTS', 'test')}.xml")
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "--rootdir", work,
           "-c", os.devnull, "--junitxml", report, "-o", "junit_family=xunit1", "--tb=line"]
    if args.workers > 0:
        cmd += ["-n", str(args.workers)]
    if args.k:
        cmd += ["-k", args.k]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "src"), env.get("PYTHONPATH")]))
    env.pop("GITHUB_ACTIONS", None)   # timm's test file picks other model lists on GitHub's runners
    print(f"timm {version}: {test_file}", flush=True)
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=work)
    elapsed = time.perf_counter() - start
    if not os.path.isfile(report):
        print(f"pytest wrote no report (exit status {proc.returncode})")
        return proc.returncode or 1
    results, selectors = parse_report(report), registry_tests(test_file)
    if args.k:   # a subset: leave out the tests that -k deselected
        selectors = {t: s for t, s in selectors.items() if any(k[0] == t for k in results)}
    return print_table(results, selectors, elapsed) or (
        proc.returncode if proc.returncode not in (0, 1, 5) else 0)


if __name__ == "__main__":
    sys.exit(main())
