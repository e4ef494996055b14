"""`resafe config`: random valid INI files are accepted and echoed with the values written (read
back with Python's configparser); every malformed file of tests/corpus/ini is rejected with one
"resafe: error:" line naming the file and line; --doc documents every key --check knows."""
import configparser
import glob
import os
import random
import re

import pytest

from conftest import ROOT, run_resafe

CORPUS = os.path.join(ROOT, "tests", "corpus", "ini")
EXAMPLE = os.path.join(ROOT, "configs", "example.ini")


def doc_rows():
    """{(section, key): {type, default, allowed}} from the Markdown of `resafe config --doc`."""
    out = run_resafe("config", "--doc").stdout
    rows, section = {}, None
    for line in out.splitlines():
        m = re.match(r"^### \[(\w+)\]$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^\| `(\w+)` \| (\w+) \| (.*?) \| (.*?) \| (.*?) \| (.*) \|$", line)
        if m:
            key, typ, default, allowed = m.group(1), m.group(2), m.group(3), m.group(4)
            default = "" if default == "(empty)" else default.strip("`")
            assert section and (section, key) not in rows, line
            rows[(section, key)] = {"type": typ, "default": default, "allowed": allowed}
    return rows


def effective(stdout):
    """The values `config --check` prints, read by configparser (its own INI reader)."""
    assert stdout.startswith("ok\n"), stdout[:200]
    cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    cp.optionxform = str
    cp.read_string(stdout.split("\n", 1)[1])
    return {(s, k): v for s in cp.sections() for k, v in cp[s].items()}


def unquote(v):
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v


def test_config_check_accepts_the_example():
    p = run_resafe("config", "--check", EXAMPLE)
    values = effective(p.stdout)
    assert values[("lora", "rank")] == "128" and values[("snip", "tau")] == "0.6"
    assert values[("generate", "system_prompt")].splitlines()[0] == "You are a helpful assistant."
    assert p.stderr == ""


def test_config_doc_lists_every_key_check_prints():
    rows = doc_rows()
    values = effective(run_resafe("config", "--check", EXAMPLE).stdout)
    assert set(rows) == set(values), set(rows) ^ set(values)
    for needed in [("lora", "rank"), ("lora", "alpha"), ("dpo", "beta"), ("dpo", "lr"), ("dpo", "epochs"),
                   ("snip", "tau"), ("snip", "reidentify_every"), ("model", "chat_template"),
                   ("generate", "top_p"), ("run", "log_level")]:
        assert needed in rows, needed
    assert rows[("lora", "rank")]["default"] == "128" and rows[("dpo", "lr")]["default"] == "5e-6"
    sections = [s for s, _ in rows]
    for s in ["model", "quant", "patch", "dpo", "snip", "lora", "eval", "dist", "run", "generate"]:
        assert s in sections, s


def _random_value(rng, row):
    typ, allowed = row["type"], row["allowed"]
    if typ == "int":
        lo, hi = (int(x) for x in allowed.split(" .. "))
        v = rng.choice([lo, hi, rng.randint(lo, min(hi, lo + 10**6))])
        return str(v), v
    if typ == "float":
        m = re.match(r"([\[(])(.*), (.*)\]", allowed)
        lo, hi = float(m.group(2)), float(m.group(3))
        v = rng.choice([hi, lo + (hi - lo) * rng.uniform(0.001, 0.999)])
        if m.group(1) == "[" and rng.random() < 0.2:
            v = lo
        text = rng.choice([repr(v), f"{v:.6e}", f"{v:.17g}"])
        return text, float(text)
    if typ == "bool":
        v = rng.random() < 0.5
        return rng.choice(["true", "yes", "on", "1"] if v else ["false", "no", "off", "0"]), v
    if typ == "enum":
        v = rng.choice(allowed.split(", "))
        return v, v
    words = ["".join(rng.choice("abcxyz019._-") for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 5))]
    if typ == "string" and rng.random() < 0.3:
        words.append(rng.choice(["café", "→", "🙂"]))
    v = " ".join(words) if typ == "string" else "/".join(words)
    return v, v


def _same(typ, printed, want):
    printed = unquote(printed)
    if typ == "int":
        return int(printed) == want
    if typ == "float":
        return float(printed) == want  # printed in the shortest spelling that reads back exactly
    if typ == "bool":
        return printed == ("true" if want else "false")
    return printed == want


def test_config_check_echoes_random_values(tmp_path, rng_seed):
    rng = random.Random(rng_seed)
    rows = doc_rows()
    for trial in range(6):
        chosen = {k: _random_value(rng, rows[k]) for k in rows if rng.random() < 0.6}
        lines, by_section = [], {}
        for (s, k), (text, _) in chosen.items():
            by_section.setdefault(s, []).append(f"{k} = {text}")
        for s, body in by_section.items():
            lines += [f"[{s}]", *body, ""]
        path = tmp_path / f"r{trial}.ini"
        path.write_text("\n".join(lines), encoding="utf-8")
        values = effective(run_resafe("config", "--check", path).stdout)
        for key, row in rows.items():
            if key in chosen:
                assert _same(row["type"], values[key], chosen[key][1]), (key, values[key], chosen[key])
            else:  # unset keys show their documented default
                want = {"int": int, "float": float}.get(row["type"], str)(row["default"] or "")
                if row["type"] == "bool":
                    want = row["default"] == "true"
                assert _same(row["type"], values[key], want), (key, values[key], row)


def test_config_set_overrides_and_validates(tmp_path):
    p = run_resafe("config", "--check", EXAMPLE, "--set", "lora.rank=64", "--set", "generate.chat=off")
    values = effective(p.stdout)
    assert values[("lora", "rank")] == "64" and values[("generate", "chat")] == "false"
    p = run_resafe("config", "--check", EXAMPLE, "--set", "lora.rank=abc", check=False)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("resafe: error: --set: [lora] rank: 'abc'"), p.stderr
    p = run_resafe("config", "--check", EXAMPLE, "--set", "lora.rnak=3", check=False)
    assert p.returncode == 1 and "did you mean 'rank'" in p.stderr, p.stderr


@pytest.mark.parametrize("args", [[], ["--bogus"], ["--check"], ["--doc", "--check", "x.ini"],
                                  ["--check", "a.ini", "--check", "b.ini"]])
def test_config_usage_errors_exit_2(args):
    p = run_resafe("config", *args, check=False)
    assert p.returncode == 2, p
    assert p.stderr.startswith("resafe: error: ") and "usage: resafe config" in p.stderr, p.stderr


def test_config_help():
    p = run_resafe("config", "--help")
    assert p.stdout.startswith("usage: resafe config")


def _corpus():
    return sorted(glob.glob(os.path.join(CORPUS, "*.ini")))


def test_config_corpus_is_present():
    assert len(_corpus()) >= 20


@pytest.mark.parametrize("path", _corpus(), ids=os.path.basename)
def test_config_malformed_ini_is_rejected_with_one_line(path):
    p = run_resafe("config", "--check", path, check=False)
    assert p.returncode == 1, f"exit {p.returncode}\n{p.stdout}{p.stderr}"
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"resafe: error: {path}"), p.stderr
    message = lines[0][len(f"resafe: error: {path}"):]
    if "NUL" not in path:  # everything but an unreadable file names the line
        assert re.match(r"^:\d+: ", message), lines[0]
    # the file name ends with "__<word>": a word the message must contain
    expect = os.path.basename(path).split("__")[-1].removesuffix(".ini")
    assert expect in message, f"message should mention '{expect}': {lines[0]}"


def test_config_missing_file_is_one_line(tmp_path):
    p = run_resafe("config", "--check", tmp_path / "none.ini", check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "none.ini" in p.stderr, p.stderr
