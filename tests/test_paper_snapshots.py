"""Networks distilled by the paper's own code (plain pickles of its models.networks_edm classes) load safely."""

import pickle
import sys
import types

import pytest
import torch

from models import EDMPrecond, load_network
from models.edm import RecordedModule
from models.registry import BACKBONES, Backbone

TINY_ROW = Backbone(dataset_name="tinypaper", family="edm", file_name="tiny.pkl", url="http://127.0.0.1:9/tiny.pkl",
                    resolution=8, channels=1, label_dim=0, sigma_min=0.006, sigma_max=80.0,
                    network_kwargs=dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                        attn_resolutions=[4], dropout=0.0, augment_dim=0))


def write_paper_pickle(path, net, training_kwargs):
    """Pickle `net` the way the paper's train loop does: a plain pickle of {'model': net} whose classes live
    in models.networks_edm. Our modules are mirrored into instances of stand-in classes of that module (so
    pickle writes its usual NEWOBJ records), the stand-ins registered only while writing."""
    fake = types.ModuleType("models.networks_edm")

    def mirror(module):
        if isinstance(module, RecordedModule):
            name = type(module).__name__
            if not hasattr(fake, name):
                setattr(fake, name, type(name, (), {"__module__": fake.__name__}))
            cls = getattr(fake, name)
        else:
            cls = type(module)  # torch containers (ModuleDict, ...) stay what they are
        copy = cls.__new__(cls)
        state = dict(module.__dict__)
        state["_modules"] = {k: (None if v is None else mirror(v)) for k, v in module._modules.items()}
        copy.__dict__.update(state)
        return copy

    shadow = mirror(net)
    shadow.__dict__["training_kwargs"] = dict(training_kwargs)
    sys.modules[fake.__name__] = fake
    try:
        data = pickle.dumps({"model": shadow}, protocol=pickle.DEFAULT_PROTOCOL)
    finally:
        del sys.modules[fake.__name__]
    with open(path, "wb") as f:
        f.write(data)


def paper_settings(**over):
    kw = dict(class_name="training.loss.loss", num_steps=4, sampler_tea="dpmpp", M=3, schedule_type="polynomial",
              schedule_rho=7.0, afs=True, max_order=3, sigma_min=0.006, sigma_max=80.0, predict_x0=True,
              lower_order_final=True, use_step_condition=False, model_source="edm", is_second_stage=False,
              dataset_name="tinypaper", guidance_type=None, guidance_rate=0.0)
    kw.update(over)
    return kw


@pytest.mark.parametrize("sfdv", [False, True])
def test_paper_snapshot_loads_and_denoises_like_the_saved_network(tmp_path, monkeypatch, sfdv):
    monkeypatch.setitem(BACKBONES, "tinypaper", TINY_ROW)
    torch.manual_seed(0)
    # The paper's classes always carry the step layers, whether or not the run used them.
    saved = EDMPrecond(**TINY_ROW.interface_kwargs(), use_step_condition=True).eval()
    path = tmp_path / "network-snapshot-000200.pkl"
    write_paper_pickle(path, saved, paper_settings(use_step_condition=sfdv))

    loaded = load_network(model_path=str(path))
    assert loaded.source == "paper_snapshot" and loaded.dataset_name == "tinypaper"
    assert loaded.settings["num_steps"] == 4 and loaded.settings["afs"] is True
    assert "class_name" not in loaded.settings
    x = torch.randn([2, 1, 8, 8])
    step = 5 if sfdv else None
    want = saved(x, 2.0, step_condition=step) if sfdv else saved.ignore_step_condition()(x, 2.0)
    torch.testing.assert_close(loaded.net(x, 2.0, step_condition=step), want)
    assert loaded.net.use_step_condition is sfdv
    if sfdv:
        assert loaded.settings["step_condition_range"] == [4, 7]


def test_paper_snapshot_with_code_in_its_state_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKBONES, "tinypaper", TINY_ROW)
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    saved = EDMPrecond(**TINY_ROW.interface_kwargs(), use_step_condition=True)
    saved.sneaky = Boom()
    path = tmp_path / "evil.pkl"
    write_paper_pickle(path, saved, paper_settings())
    with pytest.raises(pickle.UnpicklingError):
        load_network(model_path=str(path))
    assert not marker.exists()
