"""The tagging evaluation table and its metrics (``bench/bench_tags.py`` prints them)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tagmoe_core.intent.tag_eval import EvalRow, evaluate, load_eval_table
from tagmoe_core.intent.tagging import rule_tags
from tagmoe_core.taxonomy import Tier, TaskTags

TABLE = Path(__file__).resolve().parent / "data" / "tag_eval.jsonl"
BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_tags.py"


@pytest.fixture(scope="module")
def rows():
    return load_eval_table(TABLE)


def test_the_table_is_big_enough_and_international(rows):
    assert len(rows) >= 120 and len({r.instruction for r in rows}) == len(rows)
    other = [r for r in rows if not r.english]
    assert len(other) >= 30 and len({r.lang for r in other}) >= 5
    assert all(r.gold.scope == "image generation" for r in rows if not r.has_image)
    assert all(r.gold.scope != "image generation" for r in rows if r.has_image)
    used = {name for r in rows for name in r.gold.names}
    assert len(used) == 18  # every tag is somewhere in the table


def test_metrics_count_tag_instances():
    gold = TaskTags("local editing", ("object editing", "attribute editing"), ("identity preservation",))
    rows = [EvalRow("a", "en", True, gold), EvalRow("b", "en", True, TaskTags("global editing"))]
    predicted = {"a": TaskTags("local editing", ("object editing", "pose editing")),  # 1 tp, 1 fp, 1 fn; 1 fn
                 "b": TaskTags("global editing")}
    report = evaluate(rows, lambda text, has_image: predicted[text])
    assert report.rows == 2 and report.scope_accuracy == 1.0 and report.exact_accuracy == 0.5
    types = report.tiers[Tier.TYPE]
    assert (types.tp, types.fp, types.fn) == (1, 1, 1) and types.precision == types.recall == types.f1 == 0.5
    keeps = report.tiers[Tier.PRESERVATION]
    assert (keeps.tp, keeps.fp, keeps.fn) == (0, 0, 1) and keeps.recall == 0.0 and keeps.f1 == 0.0
    assert math.isnan(keeps.precision) and report.as_dict()["preservation"]["precision"] is None  # nothing predicted
    assert [row.instruction for row, _ in report.misses] == ["a"]


def test_a_bad_row_names_its_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "x", "lang": "en", "image": true, "scope": "local editing", "types": [], '
                    '"preservations": []}\n{"instruction": "y", "lang": "en", "image": true, "scope": "colour", '
                    '"types": [], "preservations": []}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: bad row .*unknown task tag 'colour'"):
        load_eval_table(path)
    path.write_text('{"instruction": "x", "lang": "en"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: bad row"):
        load_eval_table(path)


def test_the_rules_reach_their_targets_on_the_english_rows(rows):
    """A regression guard: scope >= 90 %, exact tag set >= 75 % on the English rows (BENCHMARKS.md)."""
    report = evaluate([r for r in rows if r.english], rule_tags)
    misses = "\n".join(f"{row.instruction!r}: {got.to_text()}" for row, got in report.misses)
    assert report.scope_accuracy >= 0.90 and report.exact_accuracy >= 0.75, misses


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tags", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_bench_script_prints_the_evaluation(rows, tmp_path, capsys):
    bench = load_bench()
    figures = bench.main(["--json", str(tmp_path / "f.json")])
    english = evaluate([r for r in rows if r.english], rule_tags)
    assert figures["English"] == english.as_dict() and figures["other languages"]["rows"] == len(rows) - english.rows
    out = capsys.readouterr().out
    assert f"| English | {english.rows} | {english.scope_accuracy:.1%} | {english.exact_accuracy:.1%} |" in out
    assert (tmp_path / "f.json").read_text().count('"scope_accuracy"') == 2


def test_the_bench_script_runs_the_vlm_scorer(tiny_bundle, tmp_path, capsys):
    bench = load_bench()
    lines = TABLE.read_text(encoding="utf-8").splitlines()
    (tmp_path / "few.jsonl").write_text("\n".join(lines[:3] + lines[-2:]) + "\n", encoding="utf-8")
    figures = bench.main(["--table", str(tmp_path / "few.jsonl"), "--vlm", "tiny", "--device", "cpu"])
    assert figures["English"]["rows"] == 3 and figures["other languages"]["rows"] == 2
    assert "VLM scorer (tiny)" in capsys.readouterr().out
