"""Task tagging against the hand-labelled table ``tests/data/tag_eval.jsonl``: per-tier precision /
recall / F1, scope accuracy and exact-set accuracy, for English and for the other languages.

    python bench/bench_tags.py                      # the rule tagger
    python bench/bench_tags.py --vlm tiny           # the VLM scorer on the tiny model (random weights)
    python bench/bench_tags.py --vlm /path/Qwen-Image --device cuda   # a base folder's text encoder scores

The table has no pictures: the VLM scorer reads the instruction alone (rows with an input image are
scored as edits, the others as text-to-image).
    python bench/bench_tags.py --misses             # also list the rows the tagger got wrong
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's tagmoe_core, not an installed one

from tagmoe_core.intent.tag_eval import TIERS, EvalReport, evaluate, load_eval_table  # noqa: E402

TABLE = ROOT / "tests" / "data" / "tag_eval.jsonl"


def _rules():
    from tagmoe_core.intent.tagging import rule_tags

    return lambda text, has_image: rule_tags(text, has_image)


def _scorer(source: str, device: str):
    from tagmoe_core.intent.tag_scoring import TagScorer
    from tagmoe_core.pipeline.builder import load_text_encoder, load_tokenizer
    from tagmoe_core.runtime.devices import resolve_devices

    if source == "tiny":
        from tagmoe_core.tiny import ensure_tiny_bundle

        source = str(ensure_tiny_bundle().base)
    spec = resolve_devices(device)
    scorer = TagScorer(load_text_encoder(source, spec.default_dtype, spec.primary), load_tokenizer(source))
    return lambda text, has_image: scorer.tag(text, None, has_image=has_image).tags


def _figure(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def row_text(label: str, report: EvalReport) -> str:
    tiers = " | ".join(" / ".join(_figure(v) for v in (s.precision, s.recall, s.f1))
                       for s in (report.tiers[t] for t in TIERS))
    return f"| {label} | {report.rows} | {report.scope_accuracy:.1%} | {report.exact_accuracy:.1%} | {tiers} |"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default=str(TABLE), help="the JSONL table (default: tests/data/tag_eval.jsonl)")
    parser.add_argument("--vlm", default=None, metavar="BASE",
                        help="score with the VLM scorer: 'tiny' or a Qwen-Image folder whose text encoder scores")
    parser.add_argument("--device", default="auto", help="for --vlm: 'auto', 'cpu', '0', 'cuda:1'")
    parser.add_argument("--misses", action="store_true", help="list the rows tagged wrongly")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)

    rows = load_eval_table(args.table)
    tagger = _scorer(args.vlm, args.device) if args.vlm else _rules()
    start = time.perf_counter()
    groups = {"English": [r for r in rows if r.english], "other languages": [r for r in rows if not r.english]}
    reports = {name: evaluate(group, tagger) for name, group in groups.items()}
    seconds = time.perf_counter() - start
    print(f"tagger: {'VLM scorer (' + args.vlm + ')' if args.vlm else 'rules'}; {len(rows)} rows; "
          f"{seconds / max(len(rows), 1) * 1000:.1f} ms per instruction")
    print("| rows | n | scope acc. | exact set | scope P / R / F1 | type P / R / F1 | preservation P / R / F1 |")
    print("| --- | ---: | ---: | ---: | --- | --- | --- |")
    for name, report in reports.items():
        print(row_text(name, report))
    if args.misses:
        for name, report in reports.items():
            print(f"\n{name}: {len(report.misses)} rows not exactly right")
            for row, got in report.misses:
                print(f"- {row.instruction!r}\n    gold: {row.gold.to_text()}\n    got:  {got.to_text()}")
    figures = {name: report.as_dict() for name, report in reports.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
