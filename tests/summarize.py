"""Add up the JUnit reports of every test session into one closing line: 'N passed, N failed', then
the figures the tests measured and the coverage the `coverage` session combined (coverage-summary.json)."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def main(folder: str) -> int:
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    # pytest writes an expected failure (a known gap, `xfail(strict=True)`) as a skipped test: named
    # apart, with its reason, so that a reader sees no test was skipped.
    expected: list[str] = []
    figures: list[str] = []
    reports = sorted(Path(folder).glob("*.xml"))
    for report in reports:
        root = ET.parse(report).getroot()
        for suite in root.iter("testsuite"):
            for key in totals:
                totals[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            skip = case.find("skipped")
            if skip is not None and skip.get("type") == "pytest.xfail":
                expected.append(f"  {case.get('classname', '')}.{case.get('name', '')}: {skip.get('message', '')}")
        # figures a test measured (pytest's record_property, named "figure: ...")
        for prop in root.iter("property"):
            if prop.get("name", "").startswith("figure:"):
                figures.append(f"  {prop.get('name', '')[7:].strip()}: {prop.get('value')}")
    if not reports:
        print("no test reports were written", file=sys.stderr)
        return 1
    failed = totals["failures"] + totals["errors"]
    passed = totals["tests"] - failed - totals["skipped"]
    skipped = totals["skipped"] - len(expected)
    print(f"\nall test sessions ({len(reports)} reports):")
    line = f"{passed} passed, {failed} failed"
    if expected:
        line += f", {len(expected)} expected failure{'s' * (len(expected) != 1)} (known gaps, listed below)"
    if skipped:
        line += f", {skipped} skipped"
    print(line)
    if expected:
        print("expected failures (a fix makes them fail: strict):")
        print("\n".join(expected))
    if figures:
        print("figures measured by the tests:")
        print("\n".join(figures))
    coverage = Path(folder) / "coverage-summary.json"
    if coverage.exists():
        print("\n".join(coverage_lines(json.loads(coverage.read_text()))))
    return 0


def coverage_lines(summary: dict[str, Any]) -> list[str]:
    """The branch coverage the `coverage` session combined, and the gates it missed."""
    contract = summary["contract"]
    full = [path for path, percent in contract.items() if percent >= summary["contract_gate"]]
    lines = [
        f"coverage (statements and branches, sessions {', '.join(summary['sessions'])}):",
        f"  overall: {summary['overall']:.1f} % (gate {summary['overall_gate']:.0f} %)",
        *(f"  {package}: {percent:.1f} %" for package, percent in summary["packages"].items()),
        f"  plugin contract: {len(full)} of {len(contract)} files at {summary['contract_gate']:.0f} % (the gate)",
    ]
    if summary["problems"]:
        lines += ["coverage below its gates:", *(f"  {problem}" for problem in summary["problems"])]
    return lines


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".reports"))
