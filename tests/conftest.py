"""Shared fixtures: one thread for tiny models, tiny domain files, report inputs, and a
pickled-code payload. The builders behind them are in ``builders.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from builders import make_pool, model_file, split_domain, synthetic_results, synthetic_spectra


@pytest.fixture
def tiny_domain(tmp_path: Path) -> Path:
    return split_domain(tmp_path / "tiny.h5", {"train": 4, "valid": 2, "test": 3}, superclasses=2)


class _Exploit:
    """Unpickling this runs a shell command that touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def pickled_code(tmp_path: Path) -> tuple[object, Path]:
    """(an object whose unpickling would execute code, the file that execution would create)."""
    marker = tmp_path / "executed"
    return _Exploit(marker), marker


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and a contended thread pool stalls them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def report_inputs(tmp_path: Path) -> tuple[list[Path], Path]:
    """Two job files (clean and PGD rows of pm and amt) and a spectra file."""
    results = synthetic_results(episodes=4)
    results = results[(results.benchmark == "bscd") & (results.setting == "5w5s")
                      & results.method.isin(["pm", "amt"]) & (results.norm != "corruption")
                      & results.domain.isin(["src", "eurosat", "isic"])]
    jobs = [tmp_path / "clean.csv", tmp_path / "pgd.csv"]
    results[results.norm == "none"].to_csv(jobs[0], index=False)
    results[results.norm == "linf"].to_csv(jobs[1], index=False)
    spectra = tmp_path / "spectra.csv"
    synthetic_spectra(layers=2, rank=4).query("domain == 'mnist'").to_csv(spectra, index=False)
    return jobs, spectra


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    """A 3-member pool of tiny_vit adapters and a pm model file on its backbone."""
    folder = tmp_path_factory.mktemp("pool")
    torch.set_num_threads(1)
    make_pool(folder, members=3)
    model_file(folder, folder / "tiny_backbone.pth", "pm", method="pm")
    return folder
