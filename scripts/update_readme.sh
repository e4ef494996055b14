#!/usr/bin/env bash
# Regenerates the config-key tables in README.md from `resafe config --doc` (the schema in
# src/config.c is the one source of truth). tests/py/test_readme.py checks they agree.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
python3 - "$BUILD/resafe" <<'PY'
import subprocess, sys
doc = subprocess.run([sys.argv[1], "config", "--doc"], capture_output=True, text=True, check=True).stdout
text = open("README.md").read()
begin, end = "<!-- config-doc:begin -->\n", "<!-- config-doc:end -->"
a, b = text.index(begin) + len(begin), text.index(end)
open("README.md", "w").write(text[:a] + doc.rstrip("\n") + "\n" + text[b:])
PY
