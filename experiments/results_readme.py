"""Rewrites every generated table of README.md and results/README.md from the JSON under
results/ (tests/test_results_readme.py checks that the documents match it):

    python -m experiments.results_readme

The runs that make the JSON write their own blocks too (`experiments.demo --publish`,
`experiments.reproduce_table1 --readme=results/README.md`); this command regenerates all of them
at once, e.g. after a change to how a table is drawn.
"""

import glob
import json
import os
import pathlib
from collections.abc import Callable

from absl import app

from experiments import demo_report, readme_blocks, table1_report
from vi_simsiam_jax.evaluation import ood_report

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def _load(path: pathlib.Path) -> dict:
    with open(path) as f:
        return json.load(f)


def demo_lr_table(results: pathlib.Path) -> str:
    """The demo's learning-rate selection (experiments.tune_lr): local-split top-1 per rate."""
    selection = _load(results / "demo_lr.json")
    rates = sorted(selection["local_val"], key=float)
    return "\n".join([
        "| pretraining lr | " + " | ".join(rates) + " | random init |",
        "| --- " * (len(rates) + 2) + "|",
        "| probe top-1 on local_val (20% of train) | "
        + " | ".join(f"{selection['local_val'][r]['top1']:.2f}" for r in rates)
        + f" | {selection['random_init_local_val']['top1']:.2f} |"]) + "\n"


def ood_tables(results: pathlib.Path) -> str:
    """The out-of-distribution and corruption tables of results/ood/*.json."""
    paths = sorted(glob.glob(os.path.join(results, "ood", "*.json")))
    return ood_report.markdown_tables([_load(pathlib.Path(p)) for p in paths]) + "\n"


# (document, block name, the block's contents from the results folder)
BLOCKS: list[tuple[pathlib.Path, str, Callable[[pathlib.Path], str]]] = [
    (REPO / "README.md", demo_report.README_BLOCK,
     lambda results: demo_report.markdown(_load(results / "demo" / "report.json"))),
    (RESULTS / "README.md", "demo_lr", demo_lr_table),
    (RESULTS / "README.md", "table1", lambda results: table1_report.markdown(
        table1_report.summarize(str(results / "table1")))),
    (RESULTS / "README.md", "ood", ood_tables),
]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for document, name, contents in BLOCKS:
        readme_blocks.write(str(document), name, contents(RESULTS))
        print(f"{document.relative_to(REPO)}: block {name}")


if __name__ == "__main__":
    app.run(main)
