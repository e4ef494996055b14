"""The README stays true: its config tables are exactly `resafe config --doc`, every subcommand of
`resafe --help` has a section, and it shows the test command CI runs."""
import os
import re

from conftest import ROOT, run_resafe


def readme():
    return open(os.path.join(ROOT, "README.md")).read()


def test_readme_config_tables_equal_config_doc():
    doc = run_resafe("config", "--doc").stdout.rstrip("\n")
    text = readme()
    a = text.index("<!-- config-doc:begin -->\n") + len("<!-- config-doc:begin -->\n")
    b = text.index("<!-- config-doc:end -->")
    assert text[a:b].rstrip("\n") == doc, "README config tables are stale: run scripts/update_readme.sh"


def test_readme_documents_every_subcommand():
    help_text = run_resafe("--help").stdout
    commands = re.findall(r"^  (\w+)\s", help_text.split("commands:")[1], re.M)
    assert len(commands) >= 4
    for c in commands:
        assert f"### `resafe {c}" in readme(), f"README has no section for resafe {c}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in readme()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call exactly `make test`"
