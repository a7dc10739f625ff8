"""Runtime ISA dispatch of the C++ kernels (csrc/cpu/isa.h): the level is chosen at load, can be
forced or refused, and no code outside a level's own namespace uses that level's instructions (an
AVX-512 copy of a shared inline function, picked by the linker for every caller, would fault on
an AVX2 machine: this is what the per-level units are built to prevent, checked on the binary).

The numerical tests run at every level through the `impl` / `fwd_impl` fixtures (conftest.py)."""

import contextlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import attnops
from attnops.core import backends

pytestmark = pytest.mark.skipif(not backends.EXTENSION, reason=backends.EXTENSION_REASON or "no extension")

LEVELS = ("generic", "avx2", "avx512", "amx")


def test_default_level_is_the_best_runnable():
    isa = backends.cpu_isa()
    assert isa["levels"] and isa["levels"][0] == "generic"
    assert set(isa["levels"]) <= set(LEVELS)
    if os.environ.get("ATTNOPS_CPU_ISA"):
        assert isa["kernels"] == os.environ["ATTNOPS_CPU_ISA"]
    else:
        assert isa["kernels"] == isa["levels"][-1]
    flags = backends.cpu_flags()
    if flags and attnops._C._baseline_isa() == "x86-64" and sys.platform == "linux":
        # what /proc/cpuinfo says this CPU has decides what the dispatcher may pick
        assert ("avx2" in isa["levels"]) == ({"avx2", "fma", "f16c", "bmi1", "bmi2"} <= flags)
        assert ("avx512" in isa["levels"]) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags)
        if "amx" in isa["levels"]:  # (the level also needs the OS's permission and a torch whose brgemm takes bf16)
            assert {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags


def test_set_cpu_isa_switches_and_refuses():
    levels = backends.cpu_isa()["levels"]
    previous = backends.set_cpu_isa("generic")
    try:
        assert backends.cpu_isa()["kernels"] == "generic"
        q = torch.randn(1, 33, 2, 40)
        out_generic = attnops.attention(q, q, q, causal=True)
        backends.set_cpu_isa(levels[-1])
        torch.testing.assert_close(attnops.attention(q, q, q, causal=True), out_generic)
        with pytest.raises(RuntimeError, match="unknown level 'sse'"):
            backends.set_cpu_isa("sse")
        for level in set(LEVELS) - set(levels):
            with pytest.raises(RuntimeError, match="lacks|this build has"):
                backends.set_cpu_isa(level)
        assert backends.cpu_isa()["kernels"] == levels[-1]  # a refused switch changes nothing
    finally:
        backends.set_cpu_isa(previous)


@pytest.mark.parametrize("value", ["generic", "sse", "amx"])
def test_env_forces_or_refuses_the_level(value):
    code = ("import torch, attnops; from attnops.core import backends\n"
            "q = torch.randn(1, 8, 1, 16)\n"
            "try:\n    attnops.attention(q, q, q)\n    print('ran', backends.cpu_isa()['kernels'])\n"
            "except RuntimeError as e:\n    print('refused', str(e).splitlines()[0])\n")
    env = dict(os.environ, ATTNOPS_CPU_ISA=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    if value == "generic" or value in backends.cpu_isa()["levels"]:
        assert out.stdout.strip() == f"ran {value}"
    else:
        assert out.stdout.startswith(f"refused ATTNOPS_CPU_ISA={value}: "), out.stdout


# A level's function, its return type first where the demangler writes one (`float __vector(8) attnops::cpu::avx2::...`
# for a function that returns a vector).
_LEVEL_CODE = re.compile(r"^(?:(?:[\w:<>,\s*&]|__vector\(\d+\))+?\s)?attnops::cpu::(avx2|avx512)::")


def _offenders(disassembly: str, level_code=_LEVEL_CODE):
    """{function: first offending instruction} and the set of levels seen, from `objdump -d -C` text."""
    offenders, level, name, seen = {}, None, "", set()
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            match = level_code.match(name)
            level = match.group(1) if match else None
            seen.add(level)
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[1].strip():
            continue
        insn = parts[1].strip()
        # baseline code: no VEX/EVEX instruction at all (their mnemonics start with v); AVX2 code: no
        # AVX-512 register (zmm, mask registers)
        if level is None and (insn.split()[0].startswith("v") or "%ymm" in insn or "%zmm" in insn):
            offenders.setdefault(name, insn)
        elif level == "avx2" and ("%zmm" in insn or re.search(r"%k[0-7]", insn)):
            offenders.setdefault(name, insn)
    return offenders, seen


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="the ISA levels are x86-64 only")
def test_wide_instructions_stay_inside_their_level():
    if attnops._C._baseline_isa() != "x86-64":
        pytest.skip(f"built with a raised baseline ({attnops._C._baseline_isa()}, ATTNOPS_CPU_ARCH)")
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", attnops._C.__file__],
                         capture_output=True, text=True, check=True).stdout
    offenders, seen = _offenders(dis)
    assert {"avx2", "avx512"} <= seen, "the level namespaces were not found in the binary"
    assert not offenders, "\n".join(f"{n[:200]}: {i}" for n, i in list(offenders.items())[:20])
    # the check sees wide code where it is: read as baseline, the AVX2 level's functions are offenders
    as_baseline, _ = _offenders(dis, re.compile(_LEVEL_CODE.pattern.replace("avx2|avx512", "avx512")))
    assert any("attnops::cpu::avx2::" in n for n in as_baseline)


@contextlib.contextmanager
def _onednn_off():
    """torch.backends.mkldnn.enabled = False for the duration (its flags() context also sets TF32 and warns)."""
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


def test_amx_level_is_the_avx512_code_with_brgemm_products():
    """The amx level runs the avx512 level's kernels with the bf16 tile products sent to oneDNN's brgemm
    (_C._bf16_brgemm()); elsewhere brgemm is off unless a test forces it, and never while oneDNN is disabled
    (ATen's brgemm then refuses bf16 operands)."""
    from attnops import _C

    levels = backends.cpu_isa()["levels"]
    previous = backends.set_cpu_isa("generic")
    try:
        assert not _C._bf16_brgemm()
        if "amx" in levels:
            backends.set_cpu_isa("amx")
            assert _C._bf16_brgemm()
            with _onednn_off():
                assert not _C._bf16_brgemm()
        if "avx512" in levels and "avx512_bf16" in backends.cpu_isa()["cpu"]:
            backends.set_cpu_isa("avx512")
            assert not _C._bf16_brgemm()
            mode = _C._set_bf16_brgemm(1)
            try:
                assert _C._bf16_brgemm()
                with _onednn_off():
                    assert not _C._bf16_brgemm()
                    q = torch.randn(1, 40, 2, 32, dtype=torch.bfloat16)
                    attnops.attention(q, q, q, causal=True)  # runs the level's own products, no error
            finally:
                _C._set_bf16_brgemm(mode)
        with pytest.raises(RuntimeError, match="mode must be"):
            _C._set_bf16_brgemm(2)
    finally:
        backends.set_cpu_isa(previous)


def test_bf16_products_default_follows_the_cpu():
    """The bf16 tile products are on by default at the amx level (brgemm) and at the avx512 level of a CPU with
    AVX512-BF16 that is not Intel's; the avx512 level of an Intel CPU widens (its VDPBF16PS issues at half the FMA
    rate: widening measured faster). _set_bf16_dot(1 / 0) forces either way, -1 gives the default back."""
    from attnops import _C

    levels, vendor = backends.cpu_isa()["levels"], backends.cpuinfo_field("vendor_id")
    if "avx512" not in levels or "avx512_bf16" not in backends.cpu_isa()["cpu"] or vendor is None:
        pytest.skip("needs the avx512 level, AVX512-BF16 and the vendor in /proc/cpuinfo")
    previous, mode, brgemm = backends.set_cpu_isa("avx512"), _C._set_bf16_dot(-1), _C._set_bf16_brgemm(-1)
    try:
        assert _C._bf16_dot() == (vendor != "GenuineIntel")
        _C._set_bf16_dot(1)
        assert _C._bf16_dot() and backends.cpu_isa()["bf16_dot"]
        _C._set_bf16_dot(0)
        assert not _C._bf16_dot()
        _C._set_bf16_dot(-1)
        _C._set_bf16_brgemm(1)  # the amx level's calls: the products are on wherever they go through brgemm
        assert _C._bf16_dot()
        _C._set_bf16_brgemm(-1)
        if "amx" in levels:
            backends.set_cpu_isa("amx")
            assert _C._bf16_dot()
            with _onednn_off():  # no brgemm: the level's own kernel, on where the avx512 level's is
                assert _C._bf16_dot() == (vendor != "GenuineIntel")
        with pytest.raises(RuntimeError, match="mode must be"):
            _C._set_bf16_dot(2)
    finally:
        _C._set_bf16_brgemm(brgemm)
        _C._set_bf16_dot(mode)
        backends.set_cpu_isa(previous)
