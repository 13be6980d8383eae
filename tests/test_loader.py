"""The backbone table, the one loader and our snapshot format."""

import os
import time

import pytest
import torch

import dnnlib
from models import BACKBONES, EDMPrecond, load_network, load_snapshot, save_snapshot
from models import loader as loader_module
from models.edm import is_step_layer_key
from models.registry import EDM_CDN, Backbone
from tests.conftest import SONG_16, tiny_net
from torch_utils.persistence import save_edm_pickle

SONG_ARCH = {k: v for k, v in SONG_16.items() if k not in ("img_resolution", "img_channels")}


def tiny_row(name="tiny16", **overrides):
    fields = dict(dataset_name=name, family="edm", file_name="tiny-16x16.pkl", url="https://example.invalid/tiny-16x16.pkl",
                  resolution=16, channels=3, label_dim=0, sigma_min=0.01, sigma_max=50.0, network_kwargs=dict(SONG_ARCH))
    fields.update(overrides)
    return Backbone(**fields)


@pytest.fixture
def tiny_backbone(tmp_path, monkeypatch):
    """A table row whose checkpoint is already in the cache folder, as after a download."""
    row = tiny_row()
    monkeypatch.setitem(BACKBONES, row.dataset_name, row)
    net = tiny_net(**SONG_16)
    folder = tmp_path / "src" / row.dataset_name
    folder.mkdir(parents=True)
    save_edm_pickle(folder / row.file_name, dict(ema=net))
    return row, net, str(tmp_path / "src")


# Sizes EDM reports for its released networks, in millions of parameters (EDM paper, network sizes).
EDM_MILLION_PARAMS = {"cifar10": 55.7, "ffhq": 61.8, "afhqv2": 61.8, "imagenet64": 295.9}


@pytest.mark.parametrize("name", ["cifar10", "ffhq", "afhqv2", "imagenet64"])
def test_table_rows_are_complete(name):
    row = BACKBONES[name]
    assert row.family == "edm" and row.network_class == "EDMPrecond"
    assert row.url == f"{EDM_CDN}/{row.file_name}" and row.url.startswith("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-")
    assert row.file_name.endswith(".pkl") and f"{row.resolution}x{row.resolution}" in row.file_name
    assert (row.resolution, row.channels) == ((32, 3) if name == "cifar10" else (64, 3))
    assert row.label_dim == (1000 if name == "imagenet64" else 0)
    assert (row.sigma_min, row.sigma_max) == (0.006, 80.0)
    assert row.network_kwargs["model_type"] == ("DhariwalUNet" if name == "imagenet64" else "SongUNet")
    with torch.device("meta"):  # the full-size architecture, without allocating it
        net = EDMPrecond(**row.interface_kwargs())
    assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - EDM_MILLION_PARAMS[name]) < 0.05


def test_offline_download_error_names_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SFD_OFFLINE", "1")
    start = time.time()
    with pytest.raises(dnnlib.DownloadError) as info:
        load_network(dataset_name="cifar10", cache_root=str(tmp_path))
    assert time.time() - start < 10
    message = str(info.value)
    row = BACKBONES["cifar10"]
    assert row.file_name in message and row.url in message and os.path.join(str(tmp_path), "cifar10") in message


def test_pretrained_from_table_uses_cached_file(tiny_backbone):
    row, net, cache_root = tiny_backbone
    loaded = load_network(dataset_name=row.dataset_name, cache_root=cache_root)
    assert loaded.source == "pretrained" and loaded.dataset_name == row.dataset_name
    assert loaded.settings["dataset_name"] == row.dataset_name
    assert (loaded.settings["sigma_min"], loaded.settings["sigma_max"]) == (0.01, 50.0)
    assert (loaded.net.sigma_min, loaded.net.sigma_max) == (0.01, 50.0)
    got = loaded.net
    assert not got.training and got.use_fp16 is False
    assert all(not p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" for p in got.parameters())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(got(x, 3.0), net(x, 3.0), rtol=0, atol=0)


def test_table_kwargs_that_do_not_match_the_file_are_reported(tiny_backbone, monkeypatch):
    row, _, cache_root = tiny_backbone
    wrong = tiny_row(network_kwargs=dict(SONG_ARCH, model_channels=32))
    monkeypatch.setitem(BACKBONES, row.dataset_name, wrong)
    with pytest.raises(ValueError, match="wrong shape"):
        load_network(dataset_name=row.dataset_name, cache_root=cache_root)


def test_row_with_a_repo_file(tmp_path, monkeypatch):
    net = tiny_net(**SONG_16)
    (tmp_path / "assets").mkdir()
    save_edm_pickle(tmp_path / "assets" / "teacher.pkl", dict(ema=net))
    row = tiny_row(name="shipped", url=None, path="assets/teacher.pkl")
    monkeypatch.setitem(BACKBONES, row.dataset_name, row)
    monkeypatch.setattr(loader_module, "REPO_ROOT", str(tmp_path))
    loaded = load_network(dataset_name="shipped", cache_root=str(tmp_path / "nowhere"))
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded.net(x, 0.5), net(x, 0.5), rtol=0, atol=0)
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(ValueError, match="exactly one of url= and path="):
        tiny_row(url=None, path=None)


def test_plain_checkpoint_into_step_condition_network(tiny_backbone):
    row, net, cache_root = tiny_backbone
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    loaded = load_network(dataset_name=row.dataset_name, cache_root=cache_root, use_step_condition=True)
    assert torch.equal(torch.rand(3), before)  # loading leaves the caller's random stream alone
    step_net = loaded.net
    assert step_net.use_step_condition and loaded.settings["use_step_condition"] is True
    plain_state, step_state = net.state_dict(), step_net.state_dict()
    new_keys = set(step_state) - set(plain_state)
    assert new_keys and all(is_step_layer_key(k) for k in new_keys)
    assert all(torch.equal(step_state[k], plain_state[k]) for k in plain_state)
    assert all(step_state[k].abs().sum() > 0 for k in new_keys if k.endswith("weight"))
    x = torch.randn(2, 3, 16, 16)
    assert (step_net(x, 1.0, step_condition=4) - step_net(x, 1.0, step_condition=6)).abs().max() > 1e-5


def test_snapshot_round_trip(tmp_path):
    net = tiny_net(**SONG_16, use_step_condition=True)
    settings = dict(dataset_name="cifar10", num_steps=4, M=3, afs=True, schedule_type="polynomial", schedule_rho=7.0,
                    sigma_min=0.006, sigma_max=80.0, use_step_condition=True, sampler_tea="dpmpp")
    path = tmp_path / "network-snapshot-000010.safetensors"
    save_snapshot(str(path), net, settings)
    assert os.listdir(tmp_path) == [path.name]  # the temp file was renamed, nothing left behind

    again, stored = load_snapshot(str(path))
    assert stored == settings and type(again) is EDMPrecond and again.init_kwargs == net.init_kwargs
    loaded = load_network(model_path=str(path))
    assert loaded.source == "snapshot" and loaded.settings == settings and loaded.dataset_name == "cifar10"
    x = torch.randn(2, 3, 16, 16)
    for candidate in (again, loaded.net):
        assert not candidate.training and not any(p.requires_grad for p in candidate.parameters())
        torch.testing.assert_close(candidate(x, 0.4, step_condition=5), net(x, 0.4, step_condition=5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="trained for dataset_name='cifar10'"):
        load_network(dataset_name="ffhq", model_path=str(path))


def test_plain_snapshot_can_grow_step_layers(tmp_path):
    net = tiny_net(**SONG_16)
    path = tmp_path / "plain.safetensors"
    save_snapshot(str(path), net, dict(dataset_name="cifar10", use_step_condition=False))
    plain = load_network(model_path=str(path))
    assert plain.net.use_step_condition is False
    grown = load_network(model_path=str(path), use_step_condition=True)
    assert grown.net.use_step_condition and grown.settings["use_step_condition"] is True
    assert all(torch.equal(grown.net.state_dict()[k], v) for k, v in net.state_dict().items())


def test_damaged_snapshots_raise_value_error(tmp_path):
    net = tiny_net(**SONG_16)
    path = tmp_path / "snap.safetensors"
    save_snapshot(str(path), net, dict(dataset_name="cifar10"))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load_snapshot(str(truncated))
    with pytest.raises(ValueError):
        load_network(model_path=str(truncated))
    header_cut = tmp_path / "header.safetensors"
    header_cut.write_bytes(data[:20])
    with pytest.raises(ValueError):
        load_network(model_path=str(header_cut))

    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an SFD snapshot"):
        load_snapshot(str(foreign))


def rewritten_snapshot(src, dst, change):
    """A copy of snapshot `src` at `dst` whose tensors went through change(dict), metadata untouched."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(src))
    change(tensors)
    save_file(tensors, str(dst), metadata=metadata)
    return str(dst)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"model.extra_layer.weight": torch.zeros(3)}), "model.extra_layer.weight"),
    (lambda t: t.pop("model.map_layer0.bias"), "model.map_layer0.bias"),
    (lambda t: t.update({"model.map_layer0.bias": torch.zeros(7)}), "model.map_layer0.bias"),
], ids=["extra-key", "missing-key", "wrong-shape"])
def test_snapshots_load_strictly(tmp_path, change, message):
    import sample
    from click.testing import CliRunner

    good = tmp_path / "good.safetensors"
    save_snapshot(str(good), tiny_net(**SONG_16), dict(dataset_name="cifar10"))
    bad = rewritten_snapshot(good, tmp_path / "bad.safetensors", change)
    for load in (load_snapshot, lambda path: load_network(model_path=path)):
        with pytest.raises(ValueError, match="stored tensors do not match EDMPrecond") as info:
            load(bad)
        assert message in str(info.value)
    r = CliRunner().invoke(sample.main, ["--model_path", bad, "--device", "cpu", "--outdir", str(tmp_path / "out")])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not os.path.exists(tmp_path / "out")
    load_snapshot(str(good))  # the untouched file loads


def test_snapshot_refuses_unregistered_classes_and_bad_settings(tmp_path):
    class Private(EDMPrecond):
        pass

    with pytest.raises(ValueError, match="NETWORK_CLASSES"):
        save_snapshot(str(tmp_path / "x.safetensors"), Private(**SONG_16), {})
    with pytest.raises(ValueError, match="JSON"):
        save_snapshot(str(tmp_path / "x.safetensors"), tiny_net(**SONG_16), {"bad": object()})
    assert os.listdir(tmp_path) == []


def test_bad_requests_give_value_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset_name 'mnist'"):
        load_network(dataset_name="mnist")
    with pytest.raises(ValueError, match="give dataset_name"):
        load_network()
    with pytest.raises(ValueError, match="is not a file"):
        load_network(model_path=str(tmp_path / "missing.pkl"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a network")
    with pytest.raises(ValueError, match="neither an SFD snapshot"):
        load_network(model_path=str(junk))


@pytest.mark.parametrize("dataset_name, use_step_condition", [(None, False), ("cifar10", True)])
def test_loader_overrides_a_pickles_recorded_settings_and_keeps_the_rest(tmp_path, monkeypatch, dataset_name,
                                                                        use_step_condition):
    """An EDM pickle records the network's constructor keywords; the loader must override exactly use_fp16 (fp32
    weights; autocast decides the precision), the σ range (the paper's: 0.006 for a bare pickle, the table row's
    for a named dataset; EDM records 0.002) and use_step_condition, and take every other keyword from the file."""
    import dataclasses

    from models.registry import PAPER_SIGMA_MIN

    if dataset_name:  # a row whose σ range differs from the paper's default, so that using it is visible
        monkeypatch.setitem(BACKBONES, dataset_name, dataclasses.replace(BACKBONES[dataset_name], sigma_min=0.02,
                                                                         sigma_max=60.0))
    recorded = dict(img_resolution=16, img_channels=3, label_dim=0, use_fp16=True, sigma_min=0.002, sigma_max=80.0,
                    sigma_data=0.5, **SONG_ARCH)
    torch.manual_seed(0)
    pkl = str(tmp_path / "edm.pkl")
    save_edm_pickle(pkl, {"ema": EDMPrecond(**recorded)})
    loaded = load_network(dataset_name, model_path=pkl, use_step_condition=use_step_condition)
    net = loaded.net
    row = BACKBONES[dataset_name] if dataset_name else None
    want_sigma = (row.sigma_min, row.sigma_max) if row else (PAPER_SIGMA_MIN, 80.0)
    assert want_sigma[0] != recorded["sigma_min"]  # the override is visible
    assert (net.sigma_min, net.sigma_max) == want_sigma
    assert (loaded.settings["sigma_min"], loaded.settings["sigma_max"]) == want_sigma
    assert net.use_fp16 is False and net.init_kwargs["use_fp16"] is False
    assert bool(getattr(net, "use_step_condition", False)) is use_step_condition
    assert any(is_step_layer_key(k) for k in net.state_dict()) is use_step_condition
    kept = {k: v for k, v in recorded.items() if k not in ("use_fp16", "sigma_min", "sigma_max")}
    assert {k: net.init_kwargs[k] for k in kept} == kept
