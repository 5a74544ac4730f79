"""torchvision beside the CPU build of torch, for the tests that use it as a reference."""

import sys

import torch


def import_torchvision():
    """torchvision; the package mirror's torchvision wheel is a CUDA build whose C ops do not
    load next to CPU torch, and torchvision then fails on registering fakes for two of them.
    Defining their schemas first lets the pure-Python parts import (they use no C op)."""
    try:
        import torchvision
    except RuntimeError:
        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision
