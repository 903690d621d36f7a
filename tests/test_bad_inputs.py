"""The bad-input matrix: every command that reads a file, fed a corpus of broken files.

Each case must end with exit code 2, exactly one `error:` line on stderr, no traceback, and
no file changed (the bad file and everything beside it keep their bytes). Runs in process
(CliRunner); nothing here builds or measures anything, so the whole matrix takes seconds.
"""

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mosc.cli import app

BOM = b"\xef\xbb\xbf"
BINARY = bytes(range(256)) * 4  # NULs, invalid UTF-8, no structure

JSON_BAD = {
    "binary": BINARY,
    "empty": b"",
    "truncated": b'{"enc_embed": 128, "enc_layers": ',
    "wrong-type": b"[1, 2, 3]",
    "nan": b'{"enc_embed": NaN}',
    "huge": b'{"enc_embed": 1e400, "enc_layers": 99999999999999999999999999}',
    "latin1": '{"source": "café"}'.encode("latin-1"),
    "bom-wrong-type": BOM + b'"a string"',
}
TOML_BAD = {
    "binary": BINARY,
    "truncated": b"[encoder]\nembed_dim = ",
    "wrong-type": b"encoder = 5\n",
    "latin1": 'description = "café"\n'.encode("latin-1"),
    "bom-garbage": BOM + b"= = =\n",
}
PIPELINE_BAD = {**{k: v for k, v in TOML_BAD.items() if k != "wrong-type"},
                "wrong-type": b"train_steps = 'five'\n", "nan": b"train_lr = nan\n",
                "huge": b"population = 1000000000000\n", "negative": b"train_steps = -3\n"}
HAT_COLUMNS = ("encoder_embed_dim,encoder_layer_num,encoder_ffn_embed_dim_avg,encoder_self_attention_heads_avg,"
               "decoder_embed_dim,decoder_layer_num,decoder_ffn_embed_dim_avg,decoder_self_attention_heads_avg,"
               "decoder_ende_attention_heads_avg,decoder_arbitrary_ende_attn_avg,latency_mean_encoder,"
               "latency_mean_decoder")
GOOD_ROW = "512,6,2048,8,512,6,2048,8,8,1,10.5,40.2"
CSV_BAD = {
    "binary": BINARY,
    "empty": b"",
    "header-only": (HAT_COLUMNS + "\n").encode(),
    "wrong-columns": b"a,b,c\n1,2,3\n",
    "nan": (HAT_COLUMNS + "\n" + GOOD_ROW.replace("10.5", "nan") + "\n").encode(),
    "inf": (HAT_COLUMNS + "\n" + GOOD_ROW.replace("40.2", "inf") + "\n").encode(),
    "negative": (HAT_COLUMNS + "\n" + GOOD_ROW.replace("10.5", "-10.5").replace("40.2", "-40.2") + "\n").encode(),
    "huge": (HAT_COLUMNS + "\n" + GOOD_ROW.replace("512", "1e300") + "\n").encode(),
    "text-in-number": (HAT_COLUMNS + "\n" + GOOD_ROW.replace("2048", "lots") + "\n").encode(),
    "latin1": (HAT_COLUMNS + "\n" + GOOD_ROW + ",café\n").encode("latin-1"),
}
TEXT_BAD = {"binary": BINARY, "empty": b"", "blank-lines": b"\n  \n\t\n", "latin1": "café au lait\n".encode("latin-1")}


def _sqlite_unrelated(path: Path) -> None:
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        c.execute("INSERT INTO notes (text) VALUES ('not a latency database')")


# command -> (kind of file it reads, how to build argv from (bad file, scratch folder))
def _in_folder(name):
    """The bad file becomes `name` inside a folder, and the folder is the argument."""
    return name


COMMANDS = {
    "arch validate": ("json", lambda f, d: ["arch", "validate", str(f)]),
    "measure --arch": ("json", lambda f, d: ["measure", "-t", "host", "--arch", str(f), "--db", str(d / "l.db"),
                                              "--cache", str(d / "cache"), "--tune-db", str(d / "tdb")]),
    "collapse --arch": ("json", lambda f, d: ["collapse", "--arch", str(f)]),
    "collapse --checkpoint (config.json)": ("json@config.json", lambda f, d: ["collapse", "--checkpoint", str(f.parent)]),
    "export --subnet (config.json)": ("json@config.json", lambda f, d: ["export", "--subnet", str(f.parent), "-o",
                                                                         str(d / "onnx")]),
    "compile --onnx-dir (export.json)": ("json@export.json", lambda f, d: ["compile", "-t", "host", "--onnx-dir",
                                                                            str(f.parent), "-o", str(d / "art")]),
    "translate (manifest.json)": ("json@manifest.json", lambda f, d: ["translate", "--artifact", str(f.parent),
                                                                       "--text", "hello"]),
    "bench --artifact (manifest.json)": ("json@manifest.json", lambda f, d: ["bench", "-t", "host", "--artifact",
                                                                              str(f.parent), "-o", str(d / "r.json")]),
    "predictor eval": ("json", lambda f, d: ["predictor", "eval", str(f), "--csv", str(d / "none.csv")]),
    "check --result": ("json", lambda f, d: ["check", "--baseline", str(f), "--result", str(f)]),
    "search --predictor": ("json", lambda f, d: ["search", "-t", "host", "-p", str(f), "--fitness", "macs", "-l", "5",
                                                 "-o", str(d / "s")]),
    "space show": ("toml", lambda f, d: ["space", "show", str(f)]),
    "arch sample --space": ("toml", lambda f, d: ["arch", "sample", "--space", str(f)]),
    "tune --space": ("toml", lambda f, d: ["tune", "-t", "host", "--space", str(f), "--tune-db", str(d / "tdb")]),
    "tune --checkpoint (config.json)": ("json@config.json", lambda f, d: ["tune", "-t", "host", "--checkpoint",
                                                                           str(f.parent), "--tune-db", str(d / "tdb")]),
    "pipeline --config": ("pipeline", lambda f, d: ["pipeline", "--config", str(f), "-o", str(d / "p")]),
    "translate --file": ("text", lambda f, d: ["translate", "--artifact", str(d / "no-artifact"), "--file", str(f)]),
    "db import-hat": ("csv", lambda f, d: ["db", "import-hat", str(f), "--target", "x", "--db", str(d / "l.db")]),
    "predictor fit --csv": ("csv", lambda f, d: ["predictor", "fit", "--csv", str(f), "-o", str(d / "p.json")]),
    "db stats": ("sqlite", lambda f, d: ["db", "stats", "--db", str(f)]),
    "db export": ("sqlite", lambda f, d: ["db", "export", "--db", str(f), "-o", str(d / "out.csv")]),
    "predictor fit --db": ("sqlite", lambda f, d: ["predictor", "fit", "--db", str(f), "-t", "host", "-o",
                                                   str(d / "p.json")]),
}
CORPUS = {"json": JSON_BAD, "toml": TOML_BAD, "pipeline": PIPELINE_BAD, "csv": CSV_BAD, "text": TEXT_BAD,
          "sqlite": {"binary": BINARY, "text": b"hello, I am not a database\n", "unrelated-sqlite": None}}
CASES = [(cmd, bad) for cmd, (kind, _) in COMMANDS.items() for bad in CORPUS[kind.split("@")[0]]]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("cmd,bad", CASES, ids=[f"{c}|{b}" for c, b in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, monkeypatch, cmd, bad):
    monkeypatch.setenv("MOSC_ARTIFACT_CACHE", str(tmp_path / "scratch" / "cache"))
    kind, argv = COMMANDS[cmd]
    kind, _, name = kind.partition("@")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    suffix = {"json": ".json", "toml": ".toml", "pipeline": ".toml", "csv": ".csv", "text": ".txt", "sqlite": ".db"}
    f = inputs / (name or f"bad{suffix[kind]}")
    if CORPUS[kind][bad] is None:
        _sqlite_unrelated(f)
    else:
        f.write_bytes(CORPUS[kind][bad])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = _snapshot(inputs)
    r = CliRunner().invoke(app, argv(f, scratch))
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.output, r.output
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert len(err) == 1 and err[0].startswith("error:"), r.stderr
    assert _snapshot(inputs) == before, "the bad input was changed"


def test_matrix_size():
    """Report the matrix (commands x bad inputs) this file runs; the closing note quotes it."""
    assert len(COMMANDS) >= 20 and len(CASES) >= 130, (len(COMMANDS), len(CASES))


def test_good_bom_files_are_read():
    """A BOM is not an error: an arch JSON and a HAT CSV saved with one are read as without."""
    from mosc.fileio import read_csv, read_json

    import tempfile

    d = Path(tempfile.mkdtemp())
    (d / "a.json").write_bytes(BOM + json.dumps({"x": 1}).encode())
    assert read_json(d / "a.json") == {"x": 1}
    (d / "h.csv").write_bytes(BOM + (HAT_COLUMNS + "\n" + GOOD_ROW + "\n").encode())
    header, rows = read_csv(d / "h.csv", "HAT CSV", HAT_COLUMNS.split(","))
    assert header[0] == "encoder_embed_dim" and len(rows) == 1
