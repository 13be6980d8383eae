"""EDM-format pickles: genuine files written by save_edm_pickle load back exactly; hostile ones run nothing."""

import io
import os
import pickle

import pytest
import torch

from models import VEPrecond, VPPrecond, iDDPMPrecond, load_network
from models.loader import build_from_record
from tests.conftest import ADM_16, SONG_16, tiny_net
from torch_utils import persistence
from torch_utils.persistence import PersistentRecord, load_edm_pickle, save_edm_pickle
from torch_utils.restricted_pickle import RestrictedUnpickler, UnsafePickleError

def edm_training_snapshot(net):
    """What EDM's training loop pickles: the EMA network plus loss, augmentation and dataset records."""
    loss_fn = PersistentRecord(class_name="EDMLoss", module_src="class EDMLoss:\n    pass\n", init_args=(),
                               init_kwargs=dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5),
                               state=dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))
    augment = PersistentRecord(class_name="AugmentPipe", module_src="class AugmentPipe:\n    pass\n", init_args=(),
                               init_kwargs=dict(p=0.12, xflip=1e8), state=dict(p=0.12, xflip=1e8, yflip=1.0))
    dataset_kwargs = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/cifar10-32x32.zip",
                          use_labels=False, xflip=False, cache=True, resolution=32, max_size=50000)
    return dict(ema=net, loss_fn=loss_fn, augment_pipe=augment, dataset_kwargs=dataset_kwargs)


def pickled_globals(path):
    """Every global a pickle refers to, as 'module.name' (recorded while our restricted reader loads it)."""
    names = set()

    class Recording(RestrictedUnpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return super().find_class(module, name)

    with open(path, "rb") as f:
        Recording(f, **persistence.EDM_PICKLE_RULES).load()
    return names


@pytest.mark.parametrize("arch", [SONG_16, ADM_16], ids=["song-uncond", "adm-cond"])
def test_genuine_edm_pickle_round_trip(tmp_path, arch):
    net = tiny_net(**arch)
    path = tmp_path / "network-snapshot.pkl"
    save_edm_pickle(path, edm_training_snapshot(net))

    # The file is EDM's format: persistent objects through torch_utils.persistence, nothing exotic.
    globals_used = pickled_globals(path)
    assert "torch_utils.persistence._reconstruct_persistent_obj" in globals_used
    assert "torch.nn.modules.container.ModuleDict" in globals_used
    assert globals_used <= {"torch_utils.persistence._reconstruct_persistent_obj", "torch.nn.modules.container.ModuleDict",
                            "collections.OrderedDict", "builtins.set", "torch._utils._rebuild_parameter",
                            "torch._utils._rebuild_tensor_v2", "torch.storage._load_from_bytes"}

    data = load_edm_pickle(path)
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    ema = data["ema"]
    assert ema.class_name == "EDMPrecond" and "class EDMPrecond" in ema.module_src
    assert ema.init_kwargs == net.init_kwargs and ema.init_args == ()
    assert data["loss_fn"].class_name == "EDMLoss" and data["loss_fn"].state["P_std"] == 1.2
    assert data["augment_pipe"].init_kwargs["p"] == 0.12
    assert data["dataset_kwargs"]["max_size"] == 50000
    model = ema.state["_modules"]["model"]
    assert model.class_name == arch["model_type"]
    assert model.state["_modules"]["enc"].class_name == "torch.nn.modules.container.ModuleDict"

    loaded = load_network(model_path=str(path))
    assert loaded.source == "edm_pickle" and loaded.dataset_name is None
    assert loaded.settings["sigma_min"] == 0.006 and loaded.settings["sigma_max"] == 80.0
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(10)[[2, 7]] if arch.get("label_dim") else None
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x, 1.3, labels), net(x, 1.3, labels), rtol=0, atol=0)


def test_step_condition_networks_keep_their_step_layers(tmp_path):
    net = tiny_net(**ADM_16, use_step_condition=True)
    path = tmp_path / "sfdv.pkl"
    save_edm_pickle(path, dict(ema=net))
    loaded = load_network(model_path=str(path), dataset_name="imagenet64")
    assert loaded.net.use_step_condition and loaded.settings["use_step_condition"] is True
    assert loaded.settings["dataset_name"] == "imagenet64" and loaded.settings["sigma_min"] == 0.006
    x, labels = torch.randn(2, 3, 16, 16), torch.eye(10)[[1, 8]]
    torch.testing.assert_close(loaded.net(x, 0.9, labels, step_condition=6), net(x, 0.9, labels, step_condition=6),
                               rtol=0, atol=0)


@pytest.mark.parametrize("cls", [VPPrecond, VEPrecond, iDDPMPrecond])
def test_other_edm_preconditioners_load_from_pickles(tmp_path, cls):
    arch = ADM_16 if cls is iDDPMPrecond else SONG_16
    net = tiny_net(cls, **arch)
    path = tmp_path / "net.pkl"
    save_edm_pickle(path, dict(ema=net))
    built = build_from_record(load_edm_pickle(path)["ema"])
    assert type(built) is cls
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(10)[[0, 9]] if arch is ADM_16 else None
    with torch.no_grad():
        torch.testing.assert_close(built(x, torch.tensor([0.5, 2.0]), labels), net(x, torch.tensor([0.5, 2.0]), labels))


def test_records_can_be_written_back(tmp_path):
    net = tiny_net(**SONG_16)
    first, second = tmp_path / "a.pkl", tmp_path / "b.pkl"
    save_edm_pickle(first, dict(ema=net))
    save_edm_pickle(second, load_edm_pickle(first))
    a = persistence.record_tensors(load_edm_pickle(first)["ema"])
    b = persistence.record_tensors(load_edm_pickle(second)["ema"])
    assert a.keys() == b.keys() == net.state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Exploit:
    """Pickles as a call to `func(*args)`: what a hostile pickle does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("make", [
    lambda marker: _Exploit(os.system, f"touch {marker}"),
    lambda marker: _Exploit(eval, f"open({str(marker)!r}, 'w').write('ran')"),
    lambda marker: {"ema": _Exploit(exec, f"open({str(marker)!r}, 'w').write('ran')")},
], ids=["os.system", "builtins.eval", "nested-exec"])
def test_hostile_globals_are_refused_and_nothing_runs(tmp_path, make):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump(make(marker), f)
    with pytest.raises(UnsafePickleError, match="refused to load global"):
        load_edm_pickle(path)
    with pytest.raises(UnsafePickleError):
        load_network(model_path=str(path))
    assert not marker.exists()


def naming_pickle(qualified_name, *call_args):
    """A pickle {'ema': module.name} or {'ema': module.name(*call_args)} (string arguments), written
    opcode by opcode so that the GLOBAL names exactly the given module and attribute."""
    module, name = qualified_name.rsplit(".", 1)
    value = b"c" + f"{module}\n{name}\n".encode()
    if call_args:
        value += b"(" + b"".join(b"V" + a.encode("raw_unicode_escape") + b"\n" for a in call_args) + b"tR"
    return b"\x80\x02(dVema\n" + value + b"s."  # PROTO 2 first: the loader tells pickles by that byte


def names_in(data):
    """The globals a pickle names, read by an unpickler that resolves each to an inert stand-in."""
    names = []

    class Naming(pickle.Unpickler):
        def find_class(self, module, name):
            names.append(f"{module}.{name}")
            return lambda *args: None

    Naming(io.BytesIO(data)).load()
    return names


# torch callables that load, save or fetch code or files; none is on the EDM reader's list.
TORCH_CALLABLES = ["torch.load", "torch.save", "torch.hub.load", "torch.hub.load_state_dict_from_url",
                   "torch.serialization.load", "torch.serialization.save", "torch.jit.load", "torch.storage.UntypedStorage",
                   "torch.nn.modules.module.Module", "torch._utils._rebuild_device_tensor_from_numpy"]


@pytest.mark.parametrize("qualified_name", TORCH_CALLABLES)
def test_torch_globals_beyond_the_list_are_refused(tmp_path, qualified_name):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    # Called with ('ran', marker): torch.save would write the marker; the bare object is refused just the same.
    for data in (naming_pickle(qualified_name, "ran", str(marker)), naming_pickle(qualified_name)):
        assert names_in(data) == [qualified_name]  # a well-formed pickle that names exactly this global
        path.write_bytes(data)
        with pytest.raises(UnsafePickleError, match=f"refused to load global '{qualified_name}'"):
            load_edm_pickle(path)
        with pytest.raises(UnsafePickleError):
            load_network(model_path=str(path))
    assert not marker.exists()


class _TorchSavedExploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
def test_storage_bytes_are_read_with_torchs_weights_only_loader(tmp_path):
    """torch.storage._load_from_bytes (how plain pickles carry storages) runs a full torch.load in torch itself;
    ours answers it with weights_only=True, so a torch.save stream holding code is refused and runs nothing."""
    marker = tmp_path / "marker"
    payload = io.BytesIO()
    torch.save(_TorchSavedExploit(marker), payload)
    path = tmp_path / "evil.pkl"
    data = pickle.dumps({"ema": _Exploit(torch.storage._load_from_bytes, payload.getvalue())})
    assert names_in(data) == ["torch.storage._load_from_bytes"]
    path.write_bytes(data)
    with pytest.raises(ValueError, match="UnpicklingError"):  # torch refused it: nothing ran
        load_edm_pickle(path)
    assert not marker.exists()
    # A genuine storage payload still loads through the same global.
    good = io.BytesIO()
    torch.save(torch.arange(3.0).untyped_storage(), good)
    path.write_bytes(pickle.dumps({"ema": _Exploit(torch.storage._load_from_bytes, good.getvalue())}))
    assert bytes(load_edm_pickle(path)["ema"].untyped()) == bytes(torch.arange(3.0).untyped_storage())


def test_unsafe_error_names_the_global(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Exploit(os.system, "true")))
    with pytest.raises(UnsafePickleError) as info:
        load_edm_pickle(path)
    assert "system" in str(info.value) and isinstance(info.value, pickle.UnpicklingError)


def test_embedded_module_source_is_never_executed(tmp_path):
    marker = tmp_path / "marker"
    evil_src = f"open({str(marker)!r}, 'w').write('ran')\nclass EDMPrecond:\n    pass\n"
    net = tiny_net(**SONG_16)
    good = load_edm_pickle(_saved(tmp_path / "good.pkl", dict(ema=net)))["ema"]
    # A real network whose embedded source is hostile: the network still loads, the source never runs.
    hostile = PersistentRecord(class_name="EDMPrecond", module_src=evil_src, init_args=(),
                               init_kwargs=good.init_kwargs, state=good.state)
    path = _saved(tmp_path / "hostile.pkl", dict(ema=hostile))
    loaded = load_network(model_path=str(path))
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded.net(x, 2.0), net(x, 2.0), rtol=0, atol=0)
    # Even a plain pickle.load inside this repository only builds records.
    with open(path, "rb") as f:
        assert isinstance(pickle.load(f)["ema"], PersistentRecord)
    # An unknown class name is refused when building, again without running its source.
    unknown = PersistentRecord(class_name="Evil", module_src=evil_src, init_args=(), init_kwargs={}, state={})
    with pytest.raises(ValueError, match="'Evil'"):
        load_network(model_path=str(_saved(tmp_path / "unknown.pkl", dict(ema=unknown))))
    assert not marker.exists()


def test_truncated_or_foreign_pickles_give_clear_errors(tmp_path):
    path = _saved(tmp_path / "net.pkl", dict(ema=tiny_net(**SONG_16)))
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read"):
        load_network(model_path=str(truncated))
    no_ema = _saved(tmp_path / "no_ema.pkl", dict(net=tiny_net(**SONG_16)))
    with pytest.raises(ValueError, match="'ema'"):
        load_network(model_path=str(no_ema))
    listed = tmp_path / "list.pkl"
    listed.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="dict"):
        load_edm_pickle(listed)


def test_record_with_wrong_tensors_lists_the_keys(tmp_path):
    record = load_edm_pickle(_saved(tmp_path / "net.pkl", dict(ema=tiny_net(**SONG_16))))["ema"]
    bigger = dict(record.init_kwargs, model_channels=32)
    with pytest.raises(ValueError, match="wrong shape"):
        build_from_record(PersistentRecord("EDMPrecond", record.module_src, (), bigger, record.state))
    extra = dict(record.init_kwargs, augment_dim=0)
    with pytest.raises(ValueError, match="unexpected: model.map_augment.weight"):
        build_from_record(PersistentRecord("EDMPrecond", record.module_src, (), extra, record.state))


def _saved(path, data):
    save_edm_pickle(path, data)
    return path


def test_reader_accepts_a_stream():
    buf = io.BytesIO()
    net = tiny_net(**ADM_16)
    persistence._EDMPickler(buf, protocol=2).dump(dict(ema=net))  # old protocol: bytes via _codecs.encode
    buf.seek(0)
    built = build_from_record(load_edm_pickle(buf)["ema"])
    assert built.state_dict().keys() == net.state_dict().keys()
