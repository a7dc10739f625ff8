"""Renamed public names keep working for one release, with a DeprecationWarning: the specs (now
``*Spec``: ``Dense`` and ``Linear`` read as torch layers) and the block map's ``block_size=`` (now
``map_block_size=``: ``block_size`` also names the mask's and MoBA's blocks)."""

import pytest
import torch

import attnops

OLD_SPECS = {"Dense": "SoftmaxSpec", "BlockSparse": "BlockSparseSpec", "MoBA": "MoBASpec",
             "Linear": "LinearAttentionSpec", "LowRankKey": "LowRankKeySpec"}


@pytest.mark.parametrize("old", list(OLD_SPECS))
def test_old_spec_names_warn_and_are_the_new_classes(old):
    with pytest.warns(DeprecationWarning, match=OLD_SPECS[old]):
        cls = getattr(attnops.nn, old)
    assert cls is getattr(attnops.nn, OLD_SPECS[old])


def test_unknown_names_still_raise():
    with pytest.raises(AttributeError):
        attnops.nn.NoSuchSpec  # noqa: B018


def test_spec_names_say_what_they_are():
    assert all(name.endswith("Spec") for name in ("SoftmaxSpec", "LinearAttentionSpec"))
    assert not hasattr(attnops.nn, "__all__") or "Dense" not in attnops.nn.__all__


def test_map_block_size_and_its_deprecated_alias():
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    new = attnops.attention(q, k, v, return_block_map=True, map_block_size=16).block_map
    with pytest.warns(DeprecationWarning, match="map_block_size"):
        old = attnops.attention(q, k, v, return_block_map=True, block_size=16).block_map
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.raises(TypeError, match="map_block_size= only"):
        attnops.attention(q, k, v, return_block_map=True, block_size=16, map_block_size=16)
    with pytest.warns(DeprecationWarning):
        with attnops.maps.capture(block_size=16) as cap:
            attnops.nn.SoftmaxSpec().attend(q, k, v)
    assert cap is not None
