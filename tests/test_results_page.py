"""docs/RESULTS.md is what bench/results.py makes of bench/results.yaml, and every claim there points at a section of
docs/BENCHMARKS.md (the dated history) that exists."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def _results():
    spec = importlib.util.spec_from_file_location("bench_results", ROOT / "bench" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_results_page_is_up_to_date_with_its_source():
    results = _results()
    page = (ROOT / "docs" / "RESULTS.md").read_text()
    assert page == results.render(results.load()), "docs/RESULTS.md is stale: run `python bench/results.py`"


def test_every_claim_is_complete_and_points_at_a_benchmarks_section():
    results = _results()
    assert results.problems(results.load(), results.history_headings()) == []


def test_a_claim_without_its_history_section_is_named():
    results = _results()
    data = {"areas": ["Cost"], "claims": [dict.fromkeys(results.FIELDS, "x") | {"area": "Cost", "claim": "Step",
                                                                                "history": "No such run"}]}
    assert results.problems(data, ["Some other run"]) == ["Step: docs/BENCHMARKS.md has no section '## No such run'"]


def test_anchors_are_the_ones_the_docs_site_makes():
    results = _results()
    from markdown.extensions.toc import slugify  # Python-Markdown: mkdocs' renderer (and tensorboard's, `test` extra)

    for heading in results.history_headings() + [c["claim"] for c in results.load()["claims"]]:
        assert results.slug(heading) == slugify(heading, "-"), heading
