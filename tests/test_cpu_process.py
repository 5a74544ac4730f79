"""The launcher and cpu.process: a kept heap, in transparent huge pages where possible, only
when JAX will run on the CPU."""

import json
import os
import subprocess
import sys

import pytest

from tests import pretrain_utils
from vi_simsiam_jax import launch
from vi_simsiam_jax.cpu import process

_SCRIPT = """
import json, os
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES")}), flush=True)
from vi_simsiam_jax import launch
done = launch.configure("__main__")
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
    pages, and the user's GLIBC_TUNABLES are back in os.environ for
    its children; elsewhere it does not restart."""
    started, *restarted, final = _run(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert final["tunables"] == "glibc.malloc.arena_max=4"
    assert started["pid"] == final["pid"]
    if process._transparent_huge_pages_mode() == "madvise":
        assert [r["tunables"] for r in restarted] == [
            "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"]
        assert final["done"]["huge_pages"] and final["done"]["malloc"]
        assert final["huge_kib"] >= 128 * 1024
    else:
        assert not restarted
    assert not final["own_variables"]


@pytest.mark.parametrize("env, kept_heap", [({"VI_SIMSIAM_MALLOC": "0"}, False),
                                            ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, True)])
def test_no_restart_when_switched_off(tmp_path, env, kept_heap):
    """VI_SIMSIAM_MALLOC=0 changes nothing; with the user's own hugetlb tunable the process does
    not restart and (on glibc) only keeps its heap."""
    started, final = _run(tmp_path, **env)
    assert started["pid"] == final["pid"]
    assert not final["done"]["huge_pages"]
    assert final["done"]["malloc"] == (kept_heap and sys.platform.startswith("linux"))
    assert final["tunables"] == env.get("GLIBC_TUNABLES")


@pytest.mark.parametrize("platforms, plugins, expected", [
    (None, [], True),  # nothing but jaxlib: JAX runs on the CPU
    (None, ["cuda"], False),  # an accelerator plugin is installed: JAX would pick it
    ("cpu", ["cuda"], True),  # the user asks for the CPU
    ("cuda,cpu", [], False),
])
def test_cpu_backend_expected_from_installed_backends(monkeypatch, platforms, plugins, expected):
    monkeypatch.delenv("JAX_PLATFORM_NAME", raising=False)
    if platforms is None:
        monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    else:
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.setattr(process, "accelerator_plugins", lambda: plugins)
    assert process.cpu_backend_expected() == expected


def test_launcher_leaves_imported_modules_alone(monkeypatch):
    """Only the program being run is set up; importing an entry point changes nothing."""
    monkeypatch.setattr(process, "configure", lambda: pytest.fail("configured on import"))
    assert launch.configure("experiments.pretrain") == {}
