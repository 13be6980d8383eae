"""EDM's own network pickles (written by NVlabs/edm's code, tests/data/reference/edm-pickles) load with our
restricted reader, keep every tensor under its own name, and denoise as EDM's unpickled network did.

Tolerance (tests/data/reference/README.md §1): max|got - D| <= 1e-4 * max|D|, float32 rounding only (a faithful
float32 port lands near 1e-7 here).
"""

import json
import os

import numpy as np
import pytest
import torch

from models import load_network
from torch_utils import persistence

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reference", "edm-pickles")
NETWORKS = {  # file stem -> (our class, img_channels, label_dim)
    "ddpmpp-uncond-edm-8x8": ("EDMPrecond", 3, 0),
    "ncsnpp-uncond-vp-8x8-gray": ("VPPrecond", 1, 0),
    "adm-cond10-edm-12x12": ("EDMPrecond", 3, 10),
}
REL_TOL = 1e-4


def assert_close_rel(got, expected, what):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    err, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
    assert err <= REL_TOL * scale, (f"{what}: max|got - expected| = {err:.3e} > {REL_TOL:g} * max|expected| "
                                    f"({scale:.3e})")


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def case(request):
    stem = request.param
    path = os.path.join(HERE, stem + ".pkl")
    return dict(stem=stem, path=path, loaded=load_network(model_path=path),
                outputs=np.load(os.path.join(HERE, stem + ".npz")))


def test_denoiser_matches_edms_outputs(case):
    net, out = case["loaded"].net, case["outputs"]
    cls, channels, label_dim = NETWORKS[case["stem"]]
    assert type(net).__name__ == cls and net.img_channels == channels and net.label_dim == label_dim
    x, sigma = torch.from_numpy(out["x"]), torch.from_numpy(out["sigma"])
    labels = torch.from_numpy(out["class_labels"]) if label_dim else None
    with torch.no_grad():
        assert_close_rel(net(x, sigma, labels), out["D"], f"{case['stem']} D(x, sigma per sample)")
        # One noise level for the whole batch, the way samplers call a denoiser.
        assert_close_rel(net(x, torch.from_numpy(out["sigma_scalar"]), labels), out["D_sigma_scalar"],
                         f"{case['stem']} D(x, scalar sigma)")
        if "D_no_labels" in out:  # EDM feeds an all-zero label row when a conditional network gets none
            assert_close_rel(net(x, sigma, None), out["D_no_labels"], f"{case['stem']} D(x, sigma, no labels)")


def test_every_pickled_tensor_loads_under_its_own_name(case):
    record = persistence.load_edm_pickle(case["path"])["ema"]
    recorded = persistence.record_tensors(record)
    ours = case["loaded"].net.state_dict()
    assert sorted(ours) == sorted(recorded), (sorted(set(ours) ^ set(recorded)))
    for name, value in recorded.items():
        assert ours[name].shape == value.shape and torch.equal(ours[name], value.float()), name
    # The architecture came from the file: the recorded constructor keywords are the ones written by EDM.
    config = json.loads(str(case["outputs"]["config_json"]))
    assert record.init_kwargs == config["init_kwargs"]
    assert case["loaded"].net.init_kwargs["model_type"] == config["init_kwargs"]["model_type"]


def test_vp_noise_range_is_edms():
    """EDM's VPPrecond computes sigma(epsilon_t) and sigma(1) in float32 (README §1 (b))."""
    net = load_network(model_path=os.path.join(HERE, "ncsnpp-uncond-vp-8x8-gray.pkl")).net
    assert net.sigma_min == pytest.approx(0.0009765625, rel=1e-6)
    assert net.sigma_max == pytest.approx(152.166977, rel=1e-6)


def test_adm_without_attention_heads_has_no_attention_keys():
    """EDM's DhariwalUNet gives out_channels // 64 heads: below 64 channels no block attends (README §1 (c))."""
    net = load_network(model_path=os.path.join(HERE, "adm-cond10-edm-12x12.pkl")).net
    assert not any(k.endswith((".qkv.weight", ".proj.weight", ".norm2.weight")) for k in net.state_dict())
