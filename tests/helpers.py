"""Independent oracles for the tests (numpy / POT / SciPy), written without otloss's coupling code."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import otloss


def np_cost(cost: otloss.Cost, z: np.ndarray) -> np.ndarray:
    return cost(torch.as_tensor(z, dtype=torch.float64)).numpy()


def pot_value(u, v, cost, a=None, b=None) -> float:
    """Exact LP value from POT: ``ot.emd2(a, b, M)`` with ``M[i, j] = h(u_i - v_j)``."""
    import ot

    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    a = np.full(len(u), 1.0 / len(u)) if a is None else np.asarray(a, np.float64) / np.sum(a)
    b = np.full(len(v), 1.0 / len(v)) if b is None else np.asarray(b, np.float64) / np.sum(b)
    M = np_cost(cost, u[:, None] - v[None, :])
    return float(ot.emd2(a, b, M, numItermax=1_000_000))


def quantile_integral(u, v, h, a=None, b=None, grid: int | None = None) -> float:
    """``int_0^1 h(Q_u(t) - Q_v(t)) dt`` from the two quantile functions.

    Exact piecewise integration over the merged breakpoints when ``grid`` is None,
    else midpoint quadrature on ``grid`` points (independent of the breakpoints).
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    a = np.ones(len(u)) if a is None else np.asarray(a, np.float64)
    b = np.ones(len(v)) if b is None else np.asarray(b, np.float64)
    ou, ov = np.argsort(u, kind="stable"), np.argsort(v, kind="stable")
    us, vs = u[ou], v[ov]
    cu = np.cumsum(a[ou]) / a.sum()
    cv = np.cumsum(b[ov]) / b.sum()

    def Q(xs, c, t):
        return xs[np.minimum(np.searchsorted(c, t, side="left"), len(xs) - 1)]

    if grid is not None:
        t = (np.arange(grid) + 0.5) / grid
        return float(np.mean(h(Q(us, cu, t) - Q(vs, cv, t))))
    knots = np.unique(np.concatenate([[0.0], cu, cv, [1.0]]))
    knots = knots[(knots >= 0) & (knots <= 1)]
    lo, hi = knots[:-1], knots[1:]
    mid = (lo + hi) / 2
    return float(np.sum((hi - lo) * h(Q(us, cu, mid) - Q(vs, cv, mid))))


def trl_aot_reference(pc, pr, rc, rr, beta, label_smoothing, paired):
    """TRL 1.16's ``aot`` / ``aot_unpaired`` formula, written out (``DPOTrainer._compute_loss``)."""
    import torch.nn.functional as F

    if paired:
        logratios = pc - pr
        ref_logratios = rc - rr
        a, _ = torch.sort(logratios, dim=0)
        b, _ = torch.sort(ref_logratios, dim=0)
    else:
        a, _ = torch.sort(pc - rc, dim=0)
        b, _ = torch.sort(pr - rr, dim=0)
    delta = a - b
    losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    return losses.mean()


# Skip markers: conftest.py turns each into a skip where its requirement is missing.
requires_cuda = pytest.mark.requires_cuda
requires_torchsort = pytest.mark.requires_torchsort
requires_pot = pytest.mark.requires_pot


def init_gloo(rank: int, world: int, port: int, timeout_s: float = 30.0) -> None:
    """In a :func:`spawn_world` worker: one torch thread, then the gloo process group on ``127.0.0.1:port``."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


#: what a process prints when the gloo stack aborts it (a C++ thread destroyed while still joinable)
GLOO_ABORT = "terminate called without an active exception"
_TRACEBACK = "Traceback (most recent call last)"


def spawn_world(worker, world: int, outdir: Path, attempts: int = 2) -> list[dict]:
    """Run ``worker(rank, world, port, outdir)`` in ``world`` gloo processes; load each rank's ``rank<r>.pt``.

    A worker that raises, crashes or exits non-zero fails the test at once. A process killed by
    ``SIGABRT`` (a rare abort of the gloo stack: "terminate called without an active exception")
    is not a result of the code under test: while ``attempts`` remain, the world is launched again
    on a fresh port after a warning that names the signal, and the last try fails the test. A
    worker that returns leaves at once (:func:`_leave`), skipping the interpreter's teardown of
    the gloo threads.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    outdir = Path(outdir)
    for attempt in range(1, attempts + 1):
        for stale in outdir.glob("rank*.pt"):
            stale.unlink()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_leave, args=(worker, world, port, str(outdir)), nprocs=world, join=True)
        except mp.ProcessExitedException as exc:
            if exc.signal_name != "SIGABRT":  # any other death (a crash, a non-zero exit) fails at once
                raise
            report = f"a {world}-process gloo world died (try {attempt} of {attempts}): {exc}"
            if attempt == attempts:
                pytest.fail(report)
            warnings.warn(report, RuntimeWarning, stacklevel=2)
            continue
        return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    raise AssertionError("unreachable: the last try returns or fails")


def _leave(rank: int, worker, world: int, port: int, outdir: str) -> None:
    """Run one rank of :func:`spawn_world`, then exit without the interpreter's teardown.

    The worker has saved its results and left its process group; what is left to tear down
    (gloo's threads at interpreter exit) is not under test. An exception propagates as usual.
    """
    import sys

    worker(rank, world, port, outdir)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_process(
    cmd: list[str], *, cwd, env: dict[str, str] | None = None, timeout: float = 240.0, attempts: int = 1
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a script, or a launcher and its worker processes); fail with its output if it exits non-zero.

    A run still going after ``timeout`` seconds is taken as hung: each of its processes is sent
    ``SIGABRT`` with ``PYTHONFAULTHANDLER`` set, so that every Python process prints the stack of each
    of its threads, and the failure (or, while ``attempts`` remain, a warning before the next try)
    carries those stacks. Multi-process CPU launches take ``attempts=2``: a rare hang of the gloo
    launch stack must not pass unnoticed, nor stop the suite without saying where it hung. A run
    that fails with the gloo stack's rare abort (:data:`GLOO_ABORT` in its stderr) and no Python
    traceback is likewise tried again after a warning that carries its output (a traceback means a
    real error, after which other ranks may abort too); any other failure fails at once.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}
    for attempt in range(1, attempts + 1):
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = _abort_tree(proc)
            report = f"{cmd[:4]} hung for {timeout:.0f} s (try {attempt} of {attempts}); its stacks:\n{err[-12000:]}"
            if attempt == attempts:
                pytest.fail(f"{report}\nstdout:\n{out[-3000:]}")
            warnings.warn(report, RuntimeWarning, stacklevel=2)
            continue
        report = f"exit code {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}"
        if proc.returncode != 0 and GLOO_ABORT in err and _TRACEBACK not in err and attempt < attempts:
            warnings.warn(f"{cmd[:4]} aborted (try {attempt} of {attempts}): {report}", RuntimeWarning, stacklevel=2)
            continue
        assert proc.returncode == 0, report
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    raise AssertionError("unreachable: the last try returns or fails")


def _abort_tree(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGABRT to ``proc`` and its descendants (faulthandler prints their stacks), then kill the session."""
    import psutil

    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:  # workers first: the launcher would otherwise stop them before they print
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGABRT)
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()
