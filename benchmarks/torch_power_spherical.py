"""PyTorch `power_spherical` peer of benchmarks.power_spherical (needs only torch + power-spherical).

Run with the interpreter of a venv that has them, as `python -P benchmarks/torch_power_spherical.py`
(-P keeps benchmarks/power_spherical.py from shadowing the package); prints one JSON line.
"""

import argparse
import json
import time

import torch
from power_spherical import PowerSpherical


def _rows_per_sec(fn, rows: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return rows / sorted(times)[len(times) // 2]


def measure(batch: int, dim: int, kappa: float, repeats: int) -> dict:
    torch.manual_seed(0)
    mu = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    scale = torch.full((batch,), kappa).requires_grad_()
    x = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)

    def log_prob_grad():
        mu.grad = scale.grad = None
        PowerSpherical(mu, scale).log_prob(x).sum().backward()

    def sample():
        with torch.no_grad():
            PowerSpherical(mu, scale).rsample()

    return {
        "torch_log_prob_grad_per_sec": _rows_per_sec(log_prob_grad, batch, repeats),
        "torch_sample_per_sec": _rows_per_sec(sample, batch, repeats),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--kappa", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(measure(args.batch, args.dim, args.kappa, args.repeats)))
