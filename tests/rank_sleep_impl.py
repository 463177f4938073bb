"""A plugin for tests/test_distributed.py: torch's nll and kl losses, slow on torchrun's rank 1 only.

On rank 1 (RANK=1 in the environment), importing it writes the process id to the file named by
LOSSBENCH_TEST_PIDFILE, and with LOSSBENCH_TEST_SLEEP_S=S every call sleeps S seconds first: rank 1 is
still measuring when the test kills it. Elsewhere (rank 0, a single-process run) it is plain torch."""
import os
import time

import torch.nn.functional as F

import lossbench

_RANK1 = os.environ.get("RANK") == "1"
if _RANK1 and os.environ.get("LOSSBENCH_TEST_PIDFILE"):
    with open(os.environ["LOSSBENCH_TEST_PIDFILE"], "w") as f:
        f.write(str(os.getpid()))


def _nap() -> None:
    if _RANK1:
        time.sleep(float(os.environ.get("LOSSBENCH_TEST_SLEEP_S", "0")))


@lossbench.register(family="nll", name="rank1_sleepy", description="F.nll_loss, sleeping on rank 1 on demand")
def rank1_sleepy_nll(input, target, **kw):
    _nap()
    return F.nll_loss(input, target, **kw)


@lossbench.register(family="kl", name="rank1_sleepy", description="F.kl_div, sleeping on rank 1 on demand")
def rank1_sleepy_kl(input, target, **kw):
    _nap()
    return F.kl_div(input, target, **kw)
