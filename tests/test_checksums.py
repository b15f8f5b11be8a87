"""User-supplied SHA-256 checks of raw downloads before conversion."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from data_prep.__main__ import main as data_prep_main
from data_prep.checksums import ChecksumError, read_checksums, verify_checksums


def _raw_tree(tmp_path: Path) -> tuple[Path, Path]:
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "sub" / "a.bin").write_bytes(b"hello")
    digest = hashlib.sha256(b"hello").hexdigest()
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{digest}  sub/a.bin\n")
    return raw, sums


def test_matching_files_pass(tmp_path: Path) -> None:
    raw, sums = _raw_tree(tmp_path)
    assert verify_checksums(raw, sums) == 1


def test_changed_file_is_named(tmp_path: Path) -> None:
    raw, sums = _raw_tree(tmp_path)
    (raw / "sub" / "a.bin").write_bytes(b"hellO")
    with pytest.raises(ChecksumError, match=r"a\.bin: SHA-256 .* differs"):
        verify_checksums(raw, sums)


def test_missing_file_is_named(tmp_path: Path) -> None:
    raw, sums = _raw_tree(tmp_path)
    (raw / "sub" / "a.bin").unlink()
    with pytest.raises(ChecksumError, match=r"lists sub/a\.bin"):
        verify_checksums(raw, sums)


def test_malformed_line_names_line(tmp_path: Path) -> None:
    sums = tmp_path / "SUMS"
    sums.write_text("xyz file\n")
    with pytest.raises(ChecksumError, match=r"SUMS:1"):
        read_checksums(sums)


def test_convert_refuses_raw_tree_with_bad_checksum(tmp_path: Path, capsys) -> None:
    raw, sums = _raw_tree(tmp_path)
    (raw / "sub" / "a.bin").write_bytes(b"changed")
    out = tmp_path / "x.h5"
    code = data_prep_main(["convert", "image_folder", "--raw", str(raw), "--out", str(out),
                           "--checksums", str(sums)])
    assert code == 1 and not out.exists()
    assert "differs" in capsys.readouterr().err
