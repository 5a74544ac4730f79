"""`python -m experiments.pretrain` with faults injected into one process of a multi-process
run, for tests of what every process then does. Run as `python -m tests.faulty_pretrain FLAGS`
with, in the environment, FAULT_PROCESS (the --process_id that misbehaves) and FAULT, one of:

- `slow:SECONDS`: each save and each kNN-monitor evaluation of that process takes SECONDS
  longer (a slow filesystem, a slower host);
- `disk_full:STEP`: its save of step STEP fails with ENOSPC.
"""

import errno
import os
import runpy
import sys
import time

from vi_simsiam_jax import checkpoints
from vi_simsiam_jax.evaluation import knn_monitor

_process = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--process_id=")), "0")
if _process == os.environ["FAULT_PROCESS"]:
    kind, value = os.environ["FAULT"].split(":")
    save, evaluate = checkpoints.save, knn_monitor.LocalSplitKnn.evaluate
    if kind == "slow":
        def slow_save(manager, step, state):
            time.sleep(float(value))
            save(manager, step, state)

        def slow_evaluate(self, frozen):
            time.sleep(float(value))
            return evaluate(self, frozen)

        checkpoints.save, knn_monitor.LocalSplitKnn.evaluate = slow_save, slow_evaluate
    elif kind == "disk_full":
        def failing_save(manager, step, state):
            if step == int(value):
                raise OSError(errno.ENOSPC, f"Could not write the step-{step} checkpoint: "
                              f"{os.strerror(errno.ENOSPC)}")
            save(manager, step, state)

        checkpoints.save = failing_save

runpy.run_module("experiments.pretrain", run_name="__main__", alter_sys=True)
