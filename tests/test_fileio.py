"""Shared file helpers: JSON files are strict JSON (no bare NaN / Infinity tokens)."""

from __future__ import annotations

import json
import math

import pytest

from egeunet.fileio import json_safe, write_json_atomic


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity like strict parsers do."""

    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_safe_turns_undefined_numbers_into_none_at_any_depth():
    data = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": 0.5, "e": "nan"}}
    assert json_safe(data) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": 0.5, "e": "nan"}}


def test_write_json_atomic_writes_null_for_nan(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"pooled": {"dsc": 0.8, "sensitivity": math.nan}, "loss": math.inf})
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert strict_loads(text) == {"pooled": {"dsc": 0.8, "sensitivity": None}, "loss": None}


def test_strict_loads_would_catch_a_bare_nan():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"x": math.nan}))


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder marked read-only (r-x); the tests run as root too, who could still write."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def test_require_writable_refuses_read_only_folders_and_paths_below_them(
    read_only_folder, tmp_path
):
    from egeunet.fileio import require_writable

    require_writable(tmp_path, "output folder")
    require_writable(tmp_path / "new" / "deeper", "output folder")  # created under tmp_path
    with pytest.raises(ValueError, match=r"output folder .*shared is read-only"):
        require_writable(read_only_folder, "output folder")
    with pytest.raises(ValueError, match=r"run folder .*shared/run cannot be created: .*shared"):
        require_writable(read_only_folder / "run", "run folder")
