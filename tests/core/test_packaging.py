"""Installing attnops as a user would, away from the Makefile: a fresh venv with only torch (from the local
wheel, offline), the wheel built against it, a plain ``pip install .`` (which must explain itself), and a
Python-only install (the fallback). About a minute: the venv's torch install dominates; the wheel reuses
the extension's objects from ``make build``."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, cwd, env=None, timeout=900):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _source_copy(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them (tracked and unignored): what ``pip install .`` sees."""
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], ROOT).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv holding torch (the local wheel, the version the suite runs with) and nothing else."""
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the source as pip sees it)")
    where = tmp_path_factory.mktemp("venv")
    res = _run([sys.executable, "-m", "venv", where / "v"], where)
    assert res.returncode == 0, res.stderr
    py = where / "v" / "bin" / "python"
    version = torch.__version__.split("+")[0]
    res = _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"torch=={version}", "numpy", "rich"],
               where)
    if res.returncode != 0:
        pytest.skip(f"torch {version} is not installable offline here: {res.stderr[-500:]}")
    return py


SMOKE = """
    import subprocess, sys, warnings
    warnings.simplefilter("error", RuntimeWarning)  # no fallback warning: the kernels must load
    import torch, attnops
    from attnops.core import backends
    assert "site-packages" in attnops.__file__, attnops.__file__
    assert backends.EXTENSION, backends.EXTENSION_REASON
    print("isa", backends.cpu_isa()["kernels"])
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 100, 4, 40, requires_grad=True) for _ in range(3))
    out = attnops.attention(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    assert (out - ref.transpose(1, 2)).abs().max() < 1e-5
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    for args in (["--list"], ["--list", "--suite", "gpu"]):
        res = subprocess.run([sys.executable, "-m", "attnops.bench", *args], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "suites:" in res.stdout and "quick" in res.stdout, res.stdout
    print("SMOKE OK")
"""


def test_plain_pip_install_says_how_to_build(venv, tmp_path):
    res = _run([venv, "-m", "pip", "install", "--disable-pip-version-check", _source_copy(tmp_path)], tmp_path)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "pip install --no-build-isolation ." in out and "ATTNOPS_SKIP_EXTENSION=1" in out, out[-2000:]


def test_python_only_install_runs_the_fallback(venv, tmp_path):
    res = _run([venv, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                _source_copy(tmp_path / "src")], tmp_path, env={"ATTNOPS_SKIP_EXTENSION": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    code = textwrap.dedent("""
        import warnings, torch, attnops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = torch.randn(1, 70, 2, 16)
            out = attnops.attention(q, q, q, causal=True)
        assert not attnops.core.backends.EXTENSION
        assert any("pure-PyTorch fallback" in str(w.message) for w in caught), [str(w.message) for w in caught]
        print("FALLBACK OK", tuple(out.shape))
    """)
    res = _run([venv, "-c", code], tmp_path)
    assert res.returncode == 0 and "FALLBACK OK" in res.stdout, res.stderr[-2000:]
    _run([venv, "-m", "pip", "uninstall", "-y", "-q", "attnops"], tmp_path)


def test_wheel_installs_and_runs_in_a_fresh_venv(venv, tmp_path):
    # in-tree build with the suite's own interpreter and torch: ninja finds `make build`'s objects up to date
    res = _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-build-isolation",
                "--no-deps", "-w", tmp_path / "dist", ROOT], ROOT, env={"MAX_JOBS": "2"}, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("attnops-*.whl"))
    assert len(wheels) == 1, wheels
    res = _run([venv, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--force-reinstall",
                wheels[0]], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run([venv, "-c", textwrap.dedent(SMOKE)], tmp_path)  # cwd outside the checkout: the installed copy
    assert res.returncode == 0 and "SMOKE OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
    script = Path(venv).parent / "attnops-bench"
    res = _run([script, "--list", "--suite", "lowrank"], tmp_path)
    assert res.returncode == 0 and "suite lowrank" in res.stdout, res.stderr[-2000:]
