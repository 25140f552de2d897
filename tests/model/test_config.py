import pytest
import torch

from model.config import TRANSFORMER_SIZES, VAE_SIZES, SamplingParams, ScaleListError, TransformerConfig, lookup
from model.transformer import Infinity
from model.vae import BitwiseVAE


def test_official_parameter_counts():
    # Counts of the official modules as built by run_infinity.py (fact sheet, verified there).
    assert TRANSFORMER_SIZES["2b"].num_params == 2_204_564_032
    assert TRANSFORMER_SIZES["8b"].num_params == 8_375_791_824


def test_parameter_count_matches_the_module():
    for name in ("tiny", "mid"):
        with torch.device("meta"):
            model = Infinity(TRANSFORMER_SIZES[name])
        assert sum(p.numel() for p in model.parameters()) == TRANSFORMER_SIZES[name].num_params


def test_ffn_hidden_uses_bankers_rounding():
    assert TRANSFORMER_SIZES["layer32"].ffn_hidden == 8192
    assert TRANSFORMER_SIZES["layer48"].ffn_hidden == 13312
    assert TRANSFORMER_SIZES["2b"].ffn_hidden == 8192 and TRANSFORMER_SIZES["8b"].ffn_hidden == 14336


def test_official_vae_parameter_counts():
    with torch.device("meta"):
        d32 = BitwiseVAE(VAE_SIZES["d32"])
        d14 = BitwiseVAE(VAE_SIZES["d14-patchify"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(d32.encoder) == 45_025_696 and count(d32.decoder) == 65_092_355
    assert count(d14) == 81_624_209
    assert VAE_SIZES["d32"].stride == 16 and VAE_SIZES["d14-patchify"].stride == 8
    assert VAE_SIZES["d14-patchify"].token_bits == 56


def test_unknown_size_lists_the_valid_ones():
    with pytest.raises(KeyError, match=r"2b.*8b|8b.*2b"):
        lookup(TRANSFORMER_SIZES, "3b")


def test_inconsistent_config_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(depth=2, width=100, num_heads=3, ffn_hidden=64)


def test_sampling_params_validation_names_the_field():
    with pytest.raises(ValueError, match="`tau`"):
        SamplingParams(tau=0.0)
    with pytest.raises(ValueError, match="`top_p`"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="`cfg`"):
        SamplingParams(cfg=float("nan"))
    p = SamplingParams(cfg=(1.0, 2.0, 3.0), tau=0.5)
    assert p.cfg_at(2) == 3.0 and p.tau_at(2) == 0.5
    with pytest.raises(ValueError, match="`cfg` lists 3 values") as refused:
        p.check_scales(7)
    assert isinstance(refused.value, ScaleListError) and refused.value.param == "cfg"
    with pytest.raises(ScaleListError, match="`tau` lists 2 values but the schedule has 3 scales"):
        SamplingParams(tau=(0.5, 0.5)).check_scales(3)
    SamplingParams(cfg=(1.0,) * 9).check_scales(7)  # extra values are unused, not an error
