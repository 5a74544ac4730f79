"""XLA_FLAGS for the test process and the processes it starts: the flags the user gave (say
`make test-portable`'s --xla_cpu_max_isa=AVX2) plus the tests' own, which replace a user's flag
of the same name. Imports no jax: conftest.py uses it before JAX starts its backend."""

import os


def with_flags(*flags: str) -> str:
    """os.environ's XLA_FLAGS with `flags` added, each replacing any earlier value of its flag."""
    names = {flag.split("=")[0] for flag in flags}
    kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
            if flag.split("=")[0] not in names]
    return " ".join(kept + list(flags))
