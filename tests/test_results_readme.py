"""Every generated table of README.md and results/README.md matches the JSON under results/
that it is written from (experiments.results_readme)."""

import json
import os

import pytest

from experiments import readme_blocks, results_readme


@pytest.mark.parametrize("document, name, contents", results_readme.BLOCKS,
                         ids=[f"{d.relative_to(results_readme.REPO)}:{n}"
                              for d, n, _ in results_readme.BLOCKS])
def test_document_block_matches_its_results(document, name, contents):
    assert readme_blocks.read(str(document), name) == contents(results_readme.RESULTS)


def _workdirs(value):
    """Every "workdir" value in a record, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "workdir":
                yield item
            yield from _workdirs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _workdirs(item)


def test_records_name_relative_workdirs_and_ood_their_encoder_and_code():
    records = {path: json.loads(path.read_text())
               for path in sorted(results_readme.RESULTS.glob("**/*.json"))}
    for path, record in records.items():
        for workdir in _workdirs(record):
            assert not os.path.isabs(workdir), (path, workdir)
    ood = [path for path in records if path.parent.name == "ood"]
    assert ood
    for path in ood:
        record = records[path]
        assert len(record["git_commit"]) == 40, path
        encoder = records[results_readme.REPO / record["encoder_record"]]
        assert encoder["workdir"] == record["workdir"], path
        assert (encoder["dataset"], encoder["method"]) == (record["dataset"], record["method"])
