"""Suite-wide test conventions (see DESIGN.md):

- every test is seeded;
- every output a kernel allocates is poisoned with NaN first, so an element it forgets to write
  fails the comparison with the reference: C++ kernels through attnops._C's debug switch, Python
  launchers (Triton) by NaN-filling torch.empty* calls made from attnops code (as fla does);
- the CPU attention backward runs in both of its algorithms (fused / two-pass) where a test asks
  for the `cpu_backward_mode` fixture.
"""

import sys

import pytest
import torch

from attnops.kernels import cpu as cpu_backend


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _called_from_attnops() -> bool:
    frame = sys._getframe(2)
    return frame.f_globals.get("__name__", "").startswith("attnops.")


def _poisoning(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if (
            isinstance(out, torch.Tensor)
            and out.is_floating_point()
            and not isinstance(out, torch._subclasses.FakeTensor)
            and out.device.type != "meta"
            and _called_from_attnops()
        ):
            out.fill_(float("nan"))
        return out

    return wrapper


@pytest.fixture(autouse=True, scope="session")
def _poison_outputs():
    previous = cpu_backend.set_poison_outputs(True)
    originals = (torch.empty, torch.empty_like, torch.Tensor.new_empty)
    torch.empty = _poisoning(torch.empty)
    torch.empty_like = _poisoning(torch.empty_like)
    torch.Tensor.new_empty = _poisoning(torch.Tensor.new_empty)
    yield
    torch.empty, torch.empty_like, torch.Tensor.new_empty = originals
    cpu_backend.set_poison_outputs(previous)


@pytest.fixture(params=["fused", "two_pass"])
def cpu_backward_mode(request):
    """Runs a test once per CPU attention backward algorithm."""
    from attnops import _C

    previous = _C._set_backward_mode({"fused": 1, "two_pass": 2}[request.param])
    yield request.param
    _C._set_backward_mode(previous)
