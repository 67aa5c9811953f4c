"""Test results: pytest's JUnit XML, or failing that, its summary line.

The XML comes from code under test, so it is parsed defensively: documents with a DOCTYPE (the
door to entity expansion and external entities) are refused, and anything malformed raises
ValueError.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Any
from xml.parsers import expat

OUTPUT_CAP = 4000
"""Characters of a failure's output kept (its beginning and, mostly, its end)."""
_HEAD = 1000


@dataclass
class TestReport:
    __test__ = False  # not a pytest test class

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Something ran and nothing failed or errored."""
        return self.failed == 0 and self.errors == 0 and (self.passed + self.skipped) > 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors + self.skipped

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def _cap(text: str, cap: int = OUTPUT_CAP) -> str:
    if len(text) <= cap:
        return text
    tail = cap - _HEAD
    return f"{text[:_HEAD]}\n… ({len(text) - cap} characters cut) …\n{text[-tail:]}"


def _parse_xml(data: bytes) -> ET.Element:
    """Parse with expat directly, refusing DOCTYPE and entity declarations."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()

    def refuse_doctype(*_args: Any) -> None:
        raise ValueError("JUnit XML with a DOCTYPE is refused (entity expansion risk)")

    def refuse_entity(*_args: Any) -> None:
        raise ValueError("JUnit XML with entity declarations is refused")

    parser.StartDoctypeDeclHandler = refuse_doctype
    parser.EntityDeclHandler = refuse_entity
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = lambda tag, attrs: builder.start(tag, attrs)
    parser.EndElementHandler = lambda tag: builder.end(tag)
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    parser.ordered_attributes = False
    try:
        parser.Parse(data, True)
        root = builder.close()
    except expat.ExpatError as exc:
        raise ValueError(f"malformed JUnit XML: {exc}") from None
    except AssertionError:
        raise ValueError("malformed JUnit XML: unbalanced elements") from None
    return root


def _test_name(case: ET.Element) -> str:
    """``tests/test_x.py::TestK::test_y`` from pytest's attributes (file when present, else the
    dotted classname: module parts lower case, class parts capitalised)."""
    name = case.get("name", "?")
    classname = case.get("classname", "")
    file = case.get("file")
    parts = [p for p in classname.split(".") if p]
    split = next((i for i, p in enumerate(parts) if p[:1].isupper()), len(parts))
    module, classes = parts[:split], parts[split:]
    if file:
        head = file
    elif module:
        head = "/".join(module) + ".py"
    else:
        head = ""
    return "::".join([x for x in (head, *classes) if x] + [name])


def _output_of(case: ET.Element, problem: ET.Element) -> str:
    text = (problem.text or "").strip()
    for tag, label in (("system-out", "stdout"), ("system-err", "stderr")):
        for el in case.findall(tag):
            if el.text and el.text.strip():
                text += f"\n--- captured {label} ---\n{el.text.strip()}"
    return _cap(text)


def parse_junit(xml: bytes) -> TestReport:
    """Counts and failures from pytest's ``--junitxml`` output. Raises ValueError when the document
    is malformed, has a DOCTYPE, or is not JUnit XML."""
    root = _parse_xml(xml)
    if root.tag not in ("testsuites", "testsuite"):
        raise ValueError(f"not JUnit XML: the root element is <{root.tag}>, expected <testsuites> or <testsuite>")
    report = TestReport()
    cases = list(root.iter("testcase"))
    for case in cases:
        problems = [el for el in case if el.tag in ("failure", "error")]
        for el in problems:
            kind = el.tag
            if kind == "failure":
                report.failed += 1
            else:
                report.errors += 1
            report.failures.append(
                {
                    "name": _test_name(case),
                    "kind": kind,
                    "message": _cap(el.get("message", "") or el.get("type", ""), 1000),
                    "output": _output_of(case, el),
                }
            )
        if not problems:
            if case.find("skipped") is not None:
                report.skipped += 1
            else:
                report.passed += 1
    if not cases:
        # Only suite totals (some runners): take them as given.
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            try:
                tests = int(suite.get("tests", 0))
                failures = int(suite.get("failures", 0))
                errors = int(suite.get("errors", 0))
                skipped = int(suite.get("skipped", suite.get("skip", 0)))
            except ValueError:
                raise ValueError("malformed JUnit XML: non-numeric suite counts") from None
            report.failed += failures
            report.errors += errors
            report.skipped += skipped
            report.passed += max(tests - failures - errors - skipped, 0)
    return report


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+|no tests ran)(?:, \d+ \w+)* in [\d.]+s(?: \([\d:.]+\))?\s*=*\s*$")
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|warnings?|deselected|rerun)\b")


def parse_pytest_summary(output: str) -> TestReport | None:
    """Counts from pytest's last summary line (``== 2 failed, 3 passed, 1 error in 0.5s ==``, or the
    same without the rules in -q mode); None when there is none."""
    for line in reversed(_ANSI.sub("", output).splitlines()):
        line = line.strip()
        if not _SUMMARY.match(line):
            continue
        report = TestReport()
        for number, word in _COUNT.findall(line):
            n = int(number)
            if word == "passed" or word == "xpassed":
                report.passed += n
            elif word == "failed":
                report.failed += n
            elif word in ("error", "errors"):
                report.errors += n
            elif word in ("skipped", "xfailed"):
                report.skipped += n
        return report
    return None
