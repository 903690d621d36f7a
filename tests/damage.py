"""Helpers that damage a copy of a folder record (an artifact's manifest.json, an export's
export.json) the way a hand edit would: the record is rewritten, not re-sealed."""

import json
import shutil
from pathlib import Path


def edited(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of folder src at dst whose JSON file `name` went through edit(dict) -> dict."""
    bad = shutil.copytree(src, dst)
    (bad / name).write_text(json.dumps(edit(json.loads((bad / name).read_text()))))
    return bad


def put(path, value):
    """edit: set the value at a key path, e.g. put(["graphs", "encoder", "file"], "x.so")."""
    def edit(d):
        x = d
        for k in path[:-1]:
            x = x[k]
        x[path[-1]] = value
        return d
    return edit


def drop(key):
    """edit: remove a top-level key."""
    return lambda d: {k: v for k, v in d.items() if k != key}


def swap_graph_files(d):
    """edit: the encoder's and the decoder step's file names swapped."""
    g = d["graphs"]
    g["encoder"]["file"], g["decoder_step"]["file"] = g["decoder_step"]["file"], g["encoder"]["file"]
    return d
