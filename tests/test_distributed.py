"""spawn (eval/distributed.py): a rank that dies while leaving the process group, after its work, does not fail
the run (gloo aborts so now and then at exit); a rank that dies before finishing does."""
from __future__ import annotations

import atexit
import os
from pathlib import Path

import pytest


def _work_then_abort_at_exit(shard, out: str) -> None:
    Path(out, f"rank{shard.rank}").write_text("done")
    if shard.rank == 1:
        atexit.register(os.abort)  # as gloo's "terminate called without an active exception" does


def _abort_while_working(shard, out: str) -> None:
    if shard.rank == 1:
        os.abort()
    Path(out, f"rank{shard.rank}").write_text("done")


def test_an_abort_after_the_work_is_done_is_not_an_error(tmp_path):
    from eval.distributed import spawn
    with pytest.warns(UserWarning, match="after finishing its work"):
        spawn(_work_then_abort_at_exit, 2, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]


def test_an_abort_before_the_work_is_done_fails_the_run(tmp_path):
    from torch.multiprocessing import ProcessExitedException

    from eval.distributed import spawn
    with pytest.raises(ProcessExitedException, match="SIGABRT"):
        spawn(_abort_while_working, 2, str(tmp_path))
