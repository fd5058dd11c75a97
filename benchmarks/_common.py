# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""
Shared helpers of the benchmark scripts (not a benchmark itself).

* Timing: :func:`interleaved_times` runs every candidate once per repetition, in an order
  rotated each repetition, so that slow phases of a shared machine hit all candidates alike;
  results are summarised by medians.
* Gradient variance: :func:`gradient_draws` takes gradient draws at fixed parameters, draw ``d``
  of every estimator seeded alike (common random numbers: estimators that compute the same
  function of the guide sample give the same draw), and :func:`total_variance` /
  :func:`variance_ratio` give the total variance (the sum over all coordinates of the sample
  variance of the gradient) with standard errors from the per-draw contributions
  :math:`\\lVert g_n - \\bar g \\rVert^2`, paired across estimators.
* Memory: :func:`run_memory_children` runs a measurement in a fresh subprocess per estimator,
  with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so that freed tensor memory goes back
  to the OS and the resident set size (RSS) follows live memory (and ``malloc_trim(0)`` returns
  freed heap pages before each region, where small tensors live); :class:`PeakRSS` resets the
  kernel's high-water mark (``/proc/self/clear_refs``) before the region measured and reads it
  back as ``VmHWM``, falling back to ``getrusage(RUSAGE_SELF).ru_maxrss`` where that is not
  possible. (``ru_maxrss`` alone is not reliable in a child process: after fork and exec it
  also counts the parent's RSS at the time of the fork.)
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

SPDX = "2026 pyro-markov-kl developers"


# --- set-up ---------------------------------------------------------------------------------------
def add_common_args(parser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="smoke run of a few seconds (numbers not meaningful)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (torch.set_num_threads); 0 leaves torch's default",
    )
    parser.add_argument("--seed", type=int, default=0, help="base random seed")


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)  # inherited by the memory subprocesses


def header(title: str, args) -> None:
    print(f"# {title}")
    print(
        f"torch {torch.__version__}, pyro {_pyro_version()}, threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} at start"
        + (" -- QUICK RUN, numbers not meaningful" if getattr(args, "quick", False) else "")
    )
    print(f"command: python {' '.join(sys.argv)}")
    print()


def _pyro_version() -> str:
    import pyro

    return pyro.__version__


# --- statistics -----------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def iqr(xs: Sequence[float]) -> Tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def mean_se(xs: Sequence[float]) -> Tuple[float, float]:
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly))
    den = sum((a - mx) ** 2 for a in lx)
    return num / den


# --- timing ---------------------------------------------------------------------------------------
def interleaved_times(
    fns: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1
) -> Dict[str, List[float]]:
    """
    Wall-clock seconds of each ``fns[name]()``, ``reps`` times, interleaved: repetition ``r``
    runs every candidate once, starting from candidate ``r mod len(fns)``. ``warmup`` untimed
    interleaved rounds come first.
    """
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


# --- gradients ------------------------------------------------------------------------------------
def flat_grad(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
            for p in params
        ]
    )


def zero_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def gradient_draws(
    steps: Mapping[str, Callable[[], object]],
    params: Sequence[torch.Tensor],
    num_draws: int,
    seed: int,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[float]]]:
    """
    ``num_draws`` gradient draws of each estimator at the current (fixed) parameters, timed.

    ``steps[name]()`` must compute gradients into ``params`` (e.g. ``elbo.loss_and_grads``).
    Draw ``d`` of every estimator is taken right after ``pyro.set_rng_seed(seed + d)``; the
    estimators are interleaved draw by draw, in an order rotated every draw. Each call of
    ``steps[name]()`` plus zeroing the gradients is timed.

    :returns: for each estimator a ``(num_draws, num_coordinates)`` float32 tensor of draws, and
        for each estimator the ``num_draws`` step times in seconds
    """
    import pyro

    names = list(steps)
    out: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    times: Dict[str, List[float]] = {n: [] for n in names}
    for d in range(num_draws):
        k = d % len(names)
        for name in names[k:] + names[:k]:
            pyro.set_rng_seed(seed + d)
            start = time.perf_counter()
            zero_grads(params)
            steps[name]()
            times[name].append(time.perf_counter() - start)
            out[name].append(flat_grad(params))
    zero_grads(params)
    return {n: torch.stack(out[n]) for n in names}, times


def _contributions(draws: torch.Tensor) -> torch.Tensor:
    draws = draws.double()
    n = draws.shape[0]
    centred = draws - draws.mean(0)
    return centred.pow(2).sum(1) * (n / (n - 1))  # mean of these = the unbiased total variance


def total_variance(draws: torch.Tensor) -> Tuple[float, float]:
    """
    The total variance ``sum_j Var(g_j)`` (unbiased per coordinate) of ``(N, P)`` draws, and
    its standard error from the spread of the per-draw contributions.
    """
    c = _contributions(draws)
    return float(c.mean()), float(c.std() / math.sqrt(len(c)))


def variance_ratio(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    """
    ``total_variance(a) / total_variance(b)`` for draws paired by index (same seeds), with a
    delta-method standard error that accounts for the pairing.
    """
    ca, cb = _contributions(a), _contributions(b)
    r = float(ca.mean() / cb.mean())
    resid = ca - r * cb
    se = float(resid.std() / math.sqrt(len(ca)) / cb.mean())
    return r, se


# --- memory ---------------------------------------------------------------------------------------
def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _maxrss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """
    Peak resident set size of a region, in MiB, relative to the RSS at its start (taken after a
    garbage collection and glibc's ``malloc_trim(0)``, so that memory freed earlier but kept by
    the allocator does not hide the region's own use)::

        with PeakRSS() as m:
            work()
        m.delta_mib, m.peak_mib, m.start_mib, m.method
    """

    def __enter__(self) -> PeakRSS:
        import gc

        gc.collect()
        _malloc_trim()
        self.resettable = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.resettable = _status_kb("VmHWM") is not None
        except OSError:
            pass
        if self.resettable:
            self.method = "VmHWM of /proc/self/status after a /proc/self/clear_refs reset"
            self.start_kb = _status_kb("VmHWM")
        else:
            # getrusage's ru_maxrss cannot be reset, and after fork+exec it also counts the
            # parent's RSS at the fork: only meaningful if the region raises the process peak
            self.method = "getrusage ru_maxrss (peak not resettable; a lower bound of the delta)"
            current = _status_kb("VmRSS")
            self.start_kb = current if current is not None else _maxrss_kb()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_kb = _status_kb("VmHWM") if self.resettable else _maxrss_kb()
        self.start_mib = self.start_kb / 1024
        self.peak_mib = self.peak_kb / 1024
        self.delta_mib = max(self.peak_kb - self.start_kb, 0) / 1024


def step_memory(step: Callable[[], object], num_cached: int = 3) -> dict:
    """
    Peak RSS of a first call of ``step`` and of ``num_cached`` further calls, each measured on
    its own with :class:`PeakRSS`: ``first_delta_mib``, ``cached_delta_mib`` (median of the
    further calls), ``run_delta_mib`` (the larger of the two), the RSS before the first call and
    the method.
    """
    with PeakRSS() as first:
        step()
    cached = []
    for _ in range(num_cached):
        with PeakRSS() as m:
            step()
        cached.append(m.delta_mib)
    cached_delta = median(cached)
    return {
        "start_mib": first.start_mib,
        "first_delta_mib": first.delta_mib,
        "cached_delta_mib": cached_delta,
        "cached_deltas_mib": cached,
        "run_delta_mib": max(first.delta_mib, max(cached)),
        "method": first.method,
    }


MEMORY_ENV = {
    # serve every allocation above 64 KiB with mmap and unmap it on free: the RSS then follows
    # live memory instead of glibc's retained heap (setting it also disables the dynamic
    # threshold)
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "MALLOC_ARENA_MAX": "1",
}


def run_memory_children(
    script: str, argvs: Sequence[Sequence[str]], parallel: bool = False, timeout: float = 1800
) -> List[dict]:
    """
    Run ``python script *argv`` for each ``argv`` in a fresh process with :data:`MEMORY_ENV`
    (one after the other unless ``parallel``, which is only for smoke runs). Each child prints
    one JSON line prefixed with ``MEMORY-RESULT``, returned as a dict.
    """
    env = dict(os.environ, **MEMORY_ENV)

    def start(argv):
        return subprocess.Popen(
            [sys.executable, script, *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(proc) -> dict:
        stdout, stderr = proc.communicate(timeout=timeout)
        for line in stdout.splitlines():
            if line.startswith("MEMORY-RESULT "):
                return json.loads(line[len("MEMORY-RESULT ") :])
        raise RuntimeError(
            f"memory subprocess {proc.args} failed (exit {proc.returncode}):\n{stdout}\n{stderr}"
        )

    if parallel:
        procs = [start(a) for a in argvs]
        return [finish(p) for p in procs]
    return [finish(start(a)) for a in argvs]


def emit_memory_result(result: dict) -> None:
    print("MEMORY-RESULT " + json.dumps(result), flush=True)


# --- output ---------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    print(fmt(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(fmt(r))
    print(flush=True)


def memory_rows(results: Mapping[str, dict], labels: Mapping[str, str], ref: str) -> list:
    """Table rows of :func:`step_memory` results, with ratios to ``results[ref]``."""
    r0 = results[ref]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b > 0 else "n/a"

    return [
        (
            labels[n],
            f"{r['start_mib']:.0f}",
            f"{r['first_delta_mib']:.1f}",
            f"{r['cached_delta_mib']:.1f}",
            f"{r['run_delta_mib']:.1f}",
            ratio(r["run_delta_mib"], r0["run_delta_mib"]),
            ratio(r["first_delta_mib"], r0["first_delta_mib"]),
            ratio(r["cached_delta_mib"], r0["cached_delta_mib"]),
        )
        for n, r in results.items()
    ]


MEMORY_HEADERS = (
    "ELBO",
    "RSS before MiB",
    "1st step +MiB",
    "cached step +MiB",
    "run peak +MiB",
    "run peak ratio",
    "1st step ratio",
    "cached ratio",
)


class Targets:
    """Collects PASS/MISS lines and prints them together."""

    def __init__(self) -> None:
        self.rows: List[Tuple[str, str, str, str]] = []

    def check(self, name: str, value: float, op: str, threshold: float, shown: str = "") -> bool:
        ok = {"<=": value <= threshold, "<": value < threshold, ">=": value >= threshold}[op]
        if math.isnan(value):
            ok = False
        self.rows.append(
            (name, shown or f"{value:.3g}", f"{op} {threshold:g}", "PASS" if ok else "MISS")
        )
        return ok

    def print(self, title: str = "Targets") -> None:
        print(f"## {title}")
        print()
        table(("target", "measured", "required", "result"), self.rows)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def fmt_pm(x: float, se: float, digits: int = 3) -> str:
    return f"{x:.{digits}g} ± {se:.2g}"
