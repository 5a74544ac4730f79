"""PyTorch peer of benchmarks/resnet_layers.py (run in the torch interpreter):
    torch_resnet_layers.py SHAPES_JSON BATCH_SIZE REPEATS
SHAPES_JSON: [[side, cin, cout, kernel, stride, count], ...]. Prints
{"rows": [{"forward": ms, "input_grad": ms, "weight_grad": ms}, ...]}, one per shape, each the
fastest of REPEATS calls of torch.nn.Conv2d (NCHW, 2 threads).
"""
import json
import sys
import time

import torch


def best_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times) * 1e3, 2)


def main():
    shapes, batch, repeats = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(2)
    rows = []
    for side, cin, cout, k, stride, _ in shapes:
        x = torch.randn(batch, cin, side, side, requires_grad=True)
        conv = torch.nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False)
        with torch.no_grad():
            forward = best_ms(lambda: conv(x), repeats)
        y = conv(x)
        g = torch.randn_like(y)
        grad = lambda wrt: torch.autograd.grad(y, wrt, g, retain_graph=True)
        rows.append({"forward": forward, "input_grad": best_ms(lambda: grad([x]), repeats),
                     "weight_grad": best_ms(lambda: grad([conv.weight]), repeats)})
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
