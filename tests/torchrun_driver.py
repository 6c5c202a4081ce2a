"""Runs several ``condensevit`` command lines in one ``torchrun`` launch (each process runs them all,
in order), so that a test can run many scaled-down commands under DDP without paying for a
process-group start-up each time: ``torchrun --nproc_per_node 2 tests/torchrun_driver.py JOBS.json OUT``.

JOBS.json: a list of ``{"id": str, "argv": [...], "lock_output": bool}``; with ``lock_output``
rank 0 first locks the job's ``--output`` folder as another training would (the job must then fail
on every rank). Each rank writes ``OUT/rank<R>.json``: ``{id: {"rc": int, "err": str}}``.
"""
import contextlib
import io
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main():
    jobs_file, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank = dist.get_rank()
    from condensevit.cli import main as cli_main
    from condensevit.train.run_lock import RunLock

    with open(jobs_file) as f:
        jobs = json.load(f)
    results = {}
    for job in jobs:
        lock = None
        if job.get("lock_output") and rank == 0:
            out = job["argv"][job["argv"].index("--output") + 1]
            os.makedirs(out, exist_ok=True)
            lock = RunLock.acquire(out)
        dist.barrier()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = cli_main(job["argv"])
            except BaseException as e:  # noqa: BLE001  (report it, go on with the next job)
                import traceback
                traceback.print_exc()
                rc = f"{type(e).__name__}: {e}"
        if lock is not None:
            lock.release()
        results[job["id"]] = dict(rc=rc, err=err.getvalue()[-4000:])
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
