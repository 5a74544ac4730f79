"""Every generated table of README.md and results/README.md matches the JSON under results/
that it is written from (experiments.results_readme)."""

import pytest

from experiments import readme_blocks, results_readme


@pytest.mark.parametrize("document, name, contents", results_readme.BLOCKS,
                         ids=[f"{d.relative_to(results_readme.REPO)}:{n}"
                              for d, n, _ in results_readme.BLOCKS])
def test_document_block_matches_its_results(document, name, contents):
    assert readme_blocks.read(str(document), name) == contents(results_readme.RESULTS)
