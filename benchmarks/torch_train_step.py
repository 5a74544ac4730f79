"""PyTorch peer of benchmarks/train_step.py (run in the torch interpreter), kept alive so that the
two steps can be timed in alternation:

    torch_train_step.py REFERENCE_SCRIPT [the reference's flags: --image_size=64 ...]

builds the model, optimiser and synthetic views exactly as REFERENCE_SCRIPT's main() does (its
own Siamese and loss_fn, imported from it; torch.manual_seed(0), SGD lr 1e-3, momentum 0.9,
weight decay 1e-4), runs its first step and prints {"first_step_s": s}; then, for every line N
read from stdin, runs N steps and prints {"step_s": [seconds of each], "loss": last loss}.
"""
import argparse
import importlib.util
import json
import sys
import time

import torch


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    reference = load_reference(sys.argv[1])
    parser = argparse.ArgumentParser()
    for name, default in [("image_size", 64), ("batch_size", 64), ("views", 2), ("dim", 2048),
                          ("pred_dim", 512), ("threads", 2)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--method", default="vi_simsiam", choices=["vi_simsiam", "simsiam"])
    parser.add_argument("--cifar_stem", action="store_true")
    args = parser.parse_args(sys.argv[2:])

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = reference.Siamese(args.cifar_stem, args.dim, args.pred_dim,
                              args.method == "vi_simsiam")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    views = [torch.randn(args.batch_size, 3, args.image_size, args.image_size)
             for _ in range(args.views)]

    def step():
        loss = reference.loss_fn([model(v) for v in views], args.method)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    start = time.perf_counter()
    step()
    print(json.dumps({"first_step_s": round(time.perf_counter() - start, 3)}), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            loss = step().detach()
            times.append(time.perf_counter() - start)
        print(json.dumps({"step_s": times, "loss": loss.item()}), flush=True)


if __name__ == "__main__":
    main()
