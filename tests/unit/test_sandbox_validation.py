"""Pure checks of the agents' patch handling: allowed paths, secret detection, size limits, the
paths a patch touches, and test reports (JUnit XML and pytest's summary line)."""

from __future__ import annotations

import pytest

from casperd.agents.gitwork import changed_paths
from casperd.agents.junit import TestReport, parse_junit, parse_pytest_summary
from casperd.agents.tools import TOOLS
from casperd.agents.validation import PatchLimits, check_paths, check_size, find_secrets, path_allowed

pytestmark = pytest.mark.unit


# --- check_paths ---------------------------------------------------------------------------------
def test_paths_everything_allowed_when_no_patterns() -> None:
    assert check_paths(["src/a.py", "README.md", "deep/er/x.txt"], []) == []


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "src/../../x", ".git/config", "sub/.git/hooks/pre-commit"])
def test_paths_refused_even_when_everything_allowed(path: str) -> None:
    problems = check_paths([path], [])
    assert len(problems) == 1 and repr(path) in problems[0]


def test_paths_outside_allowed_are_named_with_the_allowed_set() -> None:
    allowed = ["src/", "tests/**/*.py", "docs/index.md"]
    assert check_paths(["src/pkg/mod.py", "tests/test_a.py", "tests/unit/test_b.py", "docs/index.md"], allowed) == []
    problems = check_paths(["setup.py", "tests/data.json", "docs/other.md", "srcx/a.py"], allowed)
    assert len(problems) == 4
    assert "'setup.py'" in problems[0] and "'src/'" in problems[0] and "'tests/**/*.py'" in problems[0]


@pytest.mark.parametrize(
    ("path", "pattern", "ok"),
    [
        ("src/a/b.py", "src/", True),
        ("src", "src/", False),
        ("src/a/b.py", "src", True),
        ("srcx/b.py", "src", False),
        ("a.py", "**/*.py", True),
        ("x/y/a.py", "**/*.py", True),
        ("x/y/a.txt", "**/*.py", False),
        ("lib/x.py", "lib/**/x.py", True),
        ("lib/q/r/x.py", "lib/**/x.py", True),
        ("lib/a.py", "./lib/*.py", True),
        ("README.md", "*.md", True),
    ],
)
def test_path_allowed(path: str, pattern: str, ok: bool) -> None:
    assert path_allowed(path, pattern) is ok


# --- find_secrets --------------------------------------------------------------------------------
ANTHROPIC = "sk-ant-api03-" + "Q7x9Lm2Pz4Kd8Vb1Nc6Rt3Yw5Hj0Fg" * 2
AWS = "AKIA" + "Q3ZT7WXK9M2LPR4B"
PRIVATE = "-----BEGIN RSA PRIVATE KEY-----"
GITHUB = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
GITHUB_PAT = "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEF"
SLACK = "xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
GENERIC_VALUE = "f3A9kQ2mZ7xW1pL8vR4t"


def _patch(path: str, lines: list[str], context: bool = False) -> bytes:
    body = [f"diff --git a/{path} b/{path}", "index 1111111..2222222 100644", f"--- a/{path}", f"+++ b/{path}"]
    if context:
        body += [f"@@ -10,2 +10,{len(lines) + 2} @@", " ctx one", " ctx two"]
    else:
        body.append(f"@@ -0,0 +1,{len(lines)} @@")
    body += ["+" + line for line in lines]
    return ("\n".join(body) + "\n").encode()


@pytest.mark.parametrize(
    ("line", "kind", "secret"),
    [
        (f'API = "{ANTHROPIC}"', "Anthropic", ANTHROPIC),
        (f"aws_id = {AWS}", "AWS", AWS),
        (PRIVATE, "private key", "-----BEGIN RSA"),
        (f"tok = '{GITHUB}'", "GitHub", GITHUB),
        (f"tok = '{GITHUB_PAT}'", "GitHub", GITHUB_PAT),
        (f"SLACK = '{SLACK}'", "Slack", SLACK),
        (f'db_password = "{GENERIC_VALUE}"', "credential", GENERIC_VALUE),
        (f'"api_key": "{GENERIC_VALUE}",', "credential", GENERIC_VALUE),
    ],
)
def test_each_secret_kind_is_found_by_file_line_and_kind_never_by_value(line: str, kind: str, secret: str) -> None:
    problems = find_secrets(_patch("conf/settings.py", ["import os", line]))
    assert len(problems) == 1, problems
    assert problems[0].startswith("conf/settings.py:2: ")
    assert kind in problems[0]
    for i in range(len(secret) - 4):
        assert secret[i : i + 5] not in problems[0], "a piece of the secret leaked into the message"


def test_secret_line_numbers_follow_the_hunk() -> None:
    problems = find_secrets(_patch("a.py", ["x = 1", f"k = '{AWS}'"], context=True))
    assert problems and problems[0].startswith("a.py:13: ")


def test_removed_and_context_lines_are_not_reported() -> None:
    patch = (
        f"diff --git a/a.py b/a.py\n--- a/a.py\n+++ b/a.py\n@@ -1,2 +1,2 @@\n"
        f" ctx = '{AWS}'\n-old = '{GITHUB}'\n+new = 1\n"
    ).encode()
    assert find_secrets(patch) == []


@pytest.mark.parametrize(
    "line",
    [
        'password = "changeme-changeme-changeme"',
        'token = "aaaaaaaaaaaaaaaaaaaaaaaa"',
        "api_key = os.environ['ANTHROPIC_API_KEY']",
        'secret_name = "settings.database.password"',
        "def get_token(): return load_token()",
        "x = 'sk-ant-'  # a prefix alone",
    ],
)
def test_clean_lines_pass(line: str) -> None:
    assert find_secrets(_patch("app.py", ["import os", line])) == []


def test_secrets_in_second_file_named_by_that_file() -> None:
    patch = _patch("a.py", ["x = 1"]) + _patch("deploy/key.pem", [PRIVATE, "MIIEow..."])
    problems = find_secrets(patch)
    assert len(problems) == 1 and problems[0].startswith("deploy/key.pem:1: ")


# --- check_size ----------------------------------------------------------------------------------
def test_size_limits() -> None:
    limits = PatchLimits(max_bytes=100, max_files=2)
    assert check_size(b"x" * 100, ["a", "b", "a"], limits) == []
    problems = check_size(b"x" * 101, ["a", "b", "c"], limits)
    assert len(problems) == 2
    assert "101 bytes" in problems[0] and "100" in problems[0]
    assert "3 files" in problems[1] and "2" in problems[1]
    assert PatchLimits().max_bytes == 1_000_000 and PatchLimits().max_files == 200


# --- changed_paths -------------------------------------------------------------------------------
GIT_PATCH = b"""diff --git a/src/mod.py b/src/mod.py
index 1111111..2222222 100644
--- a/src/mod.py
+++ b/src/mod.py
@@ -1,3 +1,3 @@
 keep
--- a/decoy/removed.py
+added
 keep
diff --git a/new file.txt b/new file.txt
new file mode 100644
index 0000000..45b983b
--- /dev/null
+++ b/new file.txt\t
@@ -0,0 +1 @@
+hi
diff --git a/gone.py b/gone.py
deleted file mode 100644
index 45b983b..0000000
--- a/gone.py
+++ /dev/null
@@ -1 +0,0 @@
-bye
diff --git a/old/name.py b/new/name.py
similarity index 100%
rename from old/name.py
rename to new/name.py
diff --git "a/bin \\303\\251.dat" "b/bin \\303\\251.dat"
new file mode 100644
index 0000000000000000000000000000000000000000..d5d0b8b4c4c9e936890870f6799cfbb5ba984470
GIT binary patch
literal 3
Kcmb<ms0083<N)#j

literal 0
HcmV?d00001

diff --git a/img.png b/img.png
index 1111111..2222222 100644
Binary files a/img.png and b/img.png differ
diff --git "a/q\\"t.txt" "b/q\\"t.txt"
new file mode 100644
index 0000000..587be6b
--- /dev/null
+++ "b/q\\"t.txt"
@@ -0,0 +1 @@
+x
diff --git a/script.sh b/script.sh
old mode 100644
new mode 100755
"""


def test_changed_paths_every_kind() -> None:
    assert changed_paths(GIT_PATCH) == [
        "src/mod.py",
        "new file.txt",
        "gone.py",
        "old/name.py",
        "new/name.py",
        "bin \u00e9.dat",
        "img.png",
        'q"t.txt',
        "script.sh",
    ]


def test_changed_paths_empty() -> None:
    assert changed_paths(b"") == []


# --- tool definitions ----------------------------------------------------------------------------
def test_tool_schemas() -> None:
    by_name = {t["name"]: t for t in TOOLS}
    assert list(by_name) == [
        "read_file",
        "write_file",
        "replace_in_file",
        "list_files",
        "search",
        "run_command",
        "finish",
    ]
    required = {name: t["input_schema"]["required"] for name, t in by_name.items()}
    assert required == {
        "read_file": ["path"],
        "write_file": ["path", "content"],
        "replace_in_file": ["path", "old", "new"],
        "list_files": [],
        "search": ["pattern"],
        "run_command": ["command"],
        "finish": ["summary"],
    }
    assert by_name["finish"]["input_schema"]["properties"] == {
        "summary": {"type": "string", "description": "What was done, for the reviewer."}
    }
    for tool in TOOLS:
        schema = tool["input_schema"]
        assert tool["description"] and schema["type"] == "object"
        assert set(schema["required"]) <= set(schema["properties"])


# --- JUnit XML -----------------------------------------------------------------------------------
JUNIT = b"""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="0.1">
<testcase classname="tests.test_x" name="test_ok" time="0.001"/>
<testcase classname="tests.test_x" name="test_ok2" time="0.001"><system-out>noise</system-out></testcase>
<testcase classname="tests.test_x.TestK" name="test_bad" time="0.002">
  <failure message="AssertionError: assert 1 == 2">def test_bad():
&gt;       assert 1 == 2
E       AssertionError</failure>
  <system-out>printed here</system-out>
</testcase>
<testcase classname="tests.sub.test_y" name="test_err" time="0.0">
  <error message="failed on setup with &quot;fixture 'db' not found&quot;">fixture 'db' not found</error>
</testcase>
<testcase classname="tests.test_x" name="test_skip" time="0.0">
  <skipped type="pytest.skip" message="not today">skip reason</skipped>
</testcase>
</testsuite></testsuites>
"""


def test_parse_junit_counts_and_failures() -> None:
    report = parse_junit(JUNIT)
    assert (report.passed, report.failed, report.errors, report.skipped) == (2, 1, 1, 1)
    assert not report.ok
    fail, err = report.failures
    assert fail["name"] == "tests/test_x.py::TestK::test_bad" and fail["kind"] == "failure"
    assert fail["message"] == "AssertionError: assert 1 == 2"
    assert "assert 1 == 2" in fail["output"] and "printed here" in fail["output"]
    assert err["name"] == "tests/sub/test_y.py::test_err" and err["kind"] == "error"
    assert "fixture 'db' not found" in err["message"]
    d = report.to_dict()
    assert d["ok"] is False and d["failed"] == 1 and len(d["failures"]) == 2


def test_parse_junit_all_passed_single_suite_and_file_attribute() -> None:
    xml = (
        b'<testsuite tests="2"><testcase classname="tests.test_a" file="tests/test_a.py" name="t1"/>'
        b'<testcase classname="tests.test_a" name="t2"/></testsuite>'
    )
    report = parse_junit(xml)
    assert report.passed == 2 and report.ok and report.failures == []


def test_parse_junit_caps_output() -> None:
    big = "x" * 50_000 + "THE END"
    xml = f'<testsuite><testcase classname="t" name="n"><failure message="m">{big}</failure></testcase></testsuite>'
    report = parse_junit(xml.encode())
    out = report.failures[0]["output"]
    assert len(out) < 4200 and out.endswith("THE END")


def test_nothing_ran_is_not_ok() -> None:
    assert not parse_junit(b"<testsuites/>").ok
    assert not TestReport().ok


@pytest.mark.parametrize(
    "xml", [b"", b"<testsuite>", b"<testsuite><testcase></testsuite>", b"not xml at all", b"<html><body/></html>"]
)
def test_parse_junit_malformed(xml: bytes) -> None:
    with pytest.raises(ValueError):
        parse_junit(xml)


def test_parse_junit_refuses_doctype_and_entities() -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
        b"<testsuite><testcase classname='a' name='&lol2;'/></testsuite>"
    )
    with pytest.raises(ValueError, match="DOCTYPE"):
        parse_junit(bomb)
    external = b'<?xml version="1.0"?><!DOCTYPE t SYSTEM "file:///etc/passwd"><testsuite/>'
    with pytest.raises(ValueError, match="DOCTYPE"):
        parse_junit(external)
    utf16 = '<?xml version="1.0" encoding="utf-16"?><!DOCTYPE t [<!ENTITY a "b">]><testsuite/>'.encode("utf-16")
    with pytest.raises(ValueError):
        parse_junit(utf16)


# --- pytest summary ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("output", "counts"),
    [
        ("....F\n=========== 2 failed, 3 passed, 1 error in 0.50s ===========\n", (3, 2, 1, 0)),
        ("x\n= 1 failed, 1 passed, 2 skipped, 1 xfailed, 3 warnings in 12.34s (0:00:12) =\n", (1, 1, 0, 3)),
        ("..\n2 passed in 0.01s\n", (2, 0, 0, 0)),
        ("\x1b[32m==== \x1b[1m4 passed\x1b[0m\x1b[32m in 0.10s ====\x1b[0m\n", (4, 0, 0, 0)),
        ("E   oops\n==== 3 errors in 0.2s ====\n", (0, 0, 3, 0)),
    ],
)
def test_parse_pytest_summary(output: str, counts: tuple[int, int, int, int]) -> None:
    report = parse_pytest_summary(output)
    assert report is not None
    assert (report.passed, report.failed, report.errors, report.skipped) == counts


def test_parse_pytest_summary_uses_last_line_and_none_without_one() -> None:
    report = parse_pytest_summary("== 1 failed in 0.1s ==\nrerun\n== 5 passed in 0.2s ==\n")
    assert report is not None and report.passed == 5 and report.failed == 0 and report.ok
    nothing = parse_pytest_summary("== no tests ran in 0.01s ==")
    assert nothing is not None and not nothing.ok
    assert parse_pytest_summary("Traceback (most recent call last):\nImportError: no module") is None
