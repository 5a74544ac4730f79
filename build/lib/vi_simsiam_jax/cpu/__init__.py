"""The XLA:CPU backend: convolution plans (`conv`), max pooling with a cheap gradient
(`pooling`), the one place that picks them for the model (`layers`), and the process settings
(`process`). Nothing here changes the mathematics or the parameters: on a CPU the same model
runs faster (benchmarks/README.md).

This package imports nothing itself, so the launcher can load `process` before JAX starts.
"""
