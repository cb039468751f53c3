"""Test helpers that launch processes.

``run_process``: a hung run prints every process's Python stacks, then fails or tries again.
``spawn_world``: a process killed by a signal is launched again after a warning; a worker's error fails at once.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import GLOO_ABORT, run_process, spawn_world

# A parent that starts a child and waits for it; both block in ``time.sleep`` unless ``flag`` exists.
HANG = textwrap.dedent(
    """
    import contextlib, pathlib, subprocess, sys, time
    if len(sys.argv) > 2:  # the child
        time.sleep(float(sys.argv[2]))
        sys.exit(0)
    flag = pathlib.Path(sys.argv[1])
    again = flag.exists()
    with contextlib.suppress(OSError):
        flag.touch()  # a later run finishes
    subprocess.run([sys.executable, __file__, str(flag), "0" if again else "600"], check=True)
    print("finished", again)
    """
)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "hang.py"
    path.write_text(HANG)
    return path


def test_a_hung_run_fails_with_the_stacks_of_each_process(script, tmp_path):
    never = tmp_path / "missing" / "flag"  # cannot be created: every run hangs
    with pytest.raises(pytest.fail.Exception) as info:
        run_process([sys.executable, str(script), str(never)], cwd=tmp_path, timeout=3)
    text = str(info.value)
    assert "hung for 3 s (try 1 of 1)" in text
    assert text.count("in <module>") >= 2  # the parent's stack and the child's
    assert "subprocess.py" in text  # the parent waits in subprocess.run


def test_a_second_try_runs_after_a_warning_that_holds_the_stacks(script, tmp_path):
    flag = tmp_path / "flag"
    with pytest.warns(RuntimeWarning, match=r"hung for 3 s \(try 1 of 2\)(?s:.*)in <module>"):
        proc = run_process([sys.executable, str(script), str(flag)], cwd=tmp_path, timeout=3, attempts=2)
    assert proc.stdout.strip() == "finished True"


def test_a_run_aborted_by_the_gloo_stack_is_tried_again(tmp_path):
    flag = tmp_path / "flag"
    code = (
        "import os, pathlib, sys; flag = pathlib.Path(sys.argv[1])\n"
        "if not flag.exists():\n"
        f"    flag.touch(); print({GLOO_ABORT!r}, file=sys.stderr, flush=True); os.abort()\n"
        "print('second')"
    )
    with pytest.warns(RuntimeWarning, match=r"aborted \(try 1 of 2\)(?s:.*)without an active exception"):
        proc = run_process([sys.executable, "-c", code, str(flag)], cwd=tmp_path, attempts=2)
    assert proc.stdout.strip() == "second"


def test_an_abort_after_a_python_error_is_not_tried_again(tmp_path):
    code = (
        "import os, sys, traceback\n"
        "try:\n    raise ValueError('real error')\nexcept ValueError:\n    traceback.print_exc()\n"
        f"print({GLOO_ABORT!r}, file=sys.stderr, flush=True); os.abort()"
    )
    with pytest.raises(AssertionError, match=r"(?s)real error.*without an active exception"):
        run_process([sys.executable, "-c", code], cwd=tmp_path, attempts=2)


def test_a_failing_run_fails_at_once_with_its_output(tmp_path):
    with pytest.raises(AssertionError, match=r"exit code 3(?s:.*)boom"):
        run_process([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], cwd=tmp_path, attempts=2)


# spawn_world workers (module level, so that the spawned processes import them by name)


def _save(rank: int, outdir: str) -> None:
    torch.save({"rank": rank}, Path(outdir) / f"rank{rank}.pt")


def _abort_rank1_once(rank: int, world: int, port: int, outdir: str) -> None:
    mark = Path(outdir) / "aborted"
    if rank == 1 and not mark.exists():
        mark.touch()
        os.abort()
    _save(rank, outdir)


def _abort_rank1(rank: int, world: int, port: int, outdir: str) -> None:
    if rank == 1:
        os.abort()
    _save(rank, outdir)


def _raise_on_rank0(rank: int, world: int, port: int, outdir: str) -> None:
    with open(Path(outdir) / f"tries{rank}", "a") as f:
        f.write("x")
    if rank == 0:
        raise ValueError("worker error")
    _save(rank, outdir)


def test_a_world_killed_by_a_signal_is_launched_again_after_a_warning(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"died \(try 1 of 2\)(?s:.*)SIGABRT"):
        results = spawn_world(_abort_rank1_once, 2, tmp_path)
    assert [r["rank"] for r in results] == [0, 1]


def test_a_world_killed_on_every_try_fails_the_test(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"try 1 of 2"), pytest.raises(pytest.fail.Exception, match=r"try 2 of 2"):
        spawn_world(_abort_rank1, 2, tmp_path)


def test_a_worker_error_fails_at_once_with_its_traceback(tmp_path):
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessRaisedException, match="worker error"):
        spawn_world(_raise_on_rank0, 2, tmp_path)
    assert (tmp_path / "tries0").read_text() == "x"  # launched once


def _exit_3_on_rank1(rank: int, world: int, port: int, outdir: str) -> None:
    with open(Path(outdir) / f"tries{rank}", "a") as f:
        f.write("x")
    if rank == 1:
        os._exit(3)
    _save(rank, outdir)


def test_a_worker_that_exits_non_zero_fails_at_once(tmp_path):
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessExitedException, match="exit code 3"):
        spawn_world(_exit_3_on_rank1, 2, tmp_path)
    assert (tmp_path / "tries1").read_text() == "x"  # launched once


def test_spawn_world_validates_attempts(tmp_path):
    with pytest.raises(ValueError, match="attempts"):
        spawn_world(_save, 2, tmp_path, attempts=0)
