"""The README's results table is the one benchmarks/report.py renders from the result files."""
from __future__ import annotations

import json

from benchmarks.report import README, readme_table, render, with_table


def test_readme_results_table_is_generated_from_the_result_files():
    assert readme_table(README.read_text()) == render(), "run: python benchmarks/report.py"


def test_report_renders_one_row_per_headline_file_and_rewrites_only_between_markers(tmp_path):
    result = dict(benchmark="served_ab", device="GPU", date="2026-12-04T18:43:24+00:00", commit="0513d10abc",
                  ratio=1.0987, target=1.0, config=dict(shape="llama-3.2-1b", input_len=128, output_len=256,
                                                        concurrency=256, other_commit="12a341e404"))
    (tmp_path / "served_ab.json").write_text(json.dumps(result))
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "x.json").write_text(json.dumps(result))  # a run's parts are not rows
    table = render(tmp_path)
    rows = table.splitlines()[2:]
    assert len(rows) == 1 and "**1.10**" in rows[0] and "0513d10 |" in rows[0] and "2026-12-04" in rows[0]
    text = "intro\n<!-- results -->\nold\n<!-- /results -->\nrest\n"
    assert with_table(text, table) == f"intro\n<!-- results -->\n{table}<!-- /results -->\nrest\n"
    assert readme_table(with_table(text, table)) == table
