"""cpu_setup's restart with transparent huge pages for malloc (Linux, glibc)."""

import json
import os
import subprocess
import sys

import pytest

from tests import pretrain_utils
from vi_simsiam_jax import cpu_setup

_SCRIPT = """
import json, os
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES")}), flush=True)
from vi_simsiam_jax import cpu_setup
done = cpu_setup.configure()
import numpy as np
block = np.ones(2**26, np.float32)  # 256 MiB from malloc
with open("/proc/self/smaps_rollup") as f:
    huge_kib = sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages"))
print(json.dumps({"done": done, "pid": os.getpid(), "huge_kib": huge_kib,
                  "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "own_variables": [k for k in os.environ if k.startswith("_VI_SIMSIAM")]}))
"""


def _run(tmp_path, **env_vars) -> list[dict]:
    script = tmp_path / "configure.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VI_SIMSIAM", "GLIBC"))}
    env.update(env_vars, PYTHONPATH=str(pretrain_utils.REPO))
    out = subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True,
                         text=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_restart_with_huge_pages(tmp_path):
    """Where the kernel gives huge pages on request, the program restarts once (same process)
    with glibc.malloc.hugetlb=1 added to the user's GLIBC_TUNABLES, malloc's memory comes in huge
    pages, and the user's GLIBC_TUNABLES are back in os.environ for its children; elsewhere it does
    not restart."""
    started, *restarted, final = _run(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert final["tunables"] == "glibc.malloc.arena_max=4"
    assert started["pid"] == final["pid"]
    if cpu_setup._transparent_huge_pages_mode() == "madvise":
        assert [r["tunables"] for r in restarted] == [
            "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"]
        assert final["done"]["huge_pages"]
        assert final["huge_kib"] >= 128 * 1024
    else:
        assert not restarted and not final["done"]["huge_pages"]
    assert not final["own_variables"]


def test_no_restart_when_switched_off(tmp_path):
    """VI_SIMSIAM_MALLOC=0, or a hugetlb tunable the user set, leave the process as it started."""
    for env in ({"VI_SIMSIAM_MALLOC": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}):
        started, final = _run(tmp_path, **env)
        assert not final["done"]["huge_pages"]
        assert final["tunables"] == env.get("GLIBC_TUNABLES")
