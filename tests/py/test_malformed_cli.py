"""Every file of the malformed-input corpus (tests/corpus/<reader>/) is rejected by the CLI with
exactly one clear line on stderr ("resafe: error: <file>: ..."), a non-zero exit, no crash
(a signal would show as a negative return code) and nothing written to stdout."""
import glob
import os

import pytest

from conftest import ROOT, run_resafe

READERS = {  # corpus folder -> how the CLI reads it
    "safetensors": ["inspect", "--as", "safetensors"],
    "hf_config": ["inspect", "--as", "config"],
    "tokenizer": ["inspect", "--as", "tokenizer"],
    "ini": ["config", "--check"],
    "quant": ["inspect", "--as", "quant"],
}


def _cases():
    cases = []
    for reader in READERS:
        for path in sorted(glob.glob(os.path.join(ROOT, "tests", "corpus", reader, "*"))):
            if os.path.isfile(path) and not path.endswith((".py", ".md")):
                cases.append(pytest.param(reader, path, id=f"{reader}/{os.path.basename(path)}"))
    return cases


def test_corpus_is_not_empty():
    found = {r for r, _ in ((c.values[0], c.values[1]) for c in _cases())}
    assert found == set(READERS), f"corpus folders missing: {set(READERS) - found}"


@pytest.mark.parametrize("reader,path", _cases())
def test_malformed_input_gives_one_clear_error_line(reader, path):
    p = run_resafe(*READERS[reader], path, check=False, timeout=60)
    assert p.returncode == 1, f"exit {p.returncode} (want 1)\nstdout: {p.stdout}\nstderr: {p.stderr}"
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"want one error line, got:\n{p.stderr}"
    assert lines[0].startswith("resafe: error: "), lines[0]
    assert os.path.basename(path) in lines[0], f"the error does not name the file: {lines[0]}"
