"""Optional SHA-256 checks of raw downloads against a file the user supplies.

The file is in ``sha256sum`` format (``<hex digest>  <path relative to the raw root>`` per
line), so ``cd RAW && sha256sum ILSVRC2012_img_train.tar > SHA256SUMS`` makes one.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.files import file_sha256


class ChecksumError(ValueError):
    """A listed raw file is missing or its contents differ from the listed digest."""


def read_checksums(path: Path) -> dict[str, str]:
    """Relative path -> expected digest; malformed lines are errors naming the line."""
    expected = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().lstrip("*")  # sha256sum marks binary mode with '*'
        if len(digest) != 64 or not name or any(c not in "0123456789abcdef" for c in digest):
            raise ChecksumError(f"{path}:{number}: expected '<64 hex digits>  <file>', got "
                                f"{line!r}")
        expected[name] = digest
    if not expected:
        raise ChecksumError(f"{path}: lists no files")
    return expected


def verify_checksums(raw: Path, checksum_file: Path) -> int:
    """Check every listed file under ``raw``; returns how many were checked."""
    expected = read_checksums(checksum_file)
    for name, digest in expected.items():
        target = Path(raw) / name
        if not target.is_file():
            raise ChecksumError(f"{checksum_file}: lists {name}, but {target} does not exist")
        actual = file_sha256(target)
        if actual != digest:
            raise ChecksumError(f"{target}: SHA-256 {actual} differs from {digest} listed in "
                                f"{checksum_file}; the download is damaged or another version")
    return len(expected)
