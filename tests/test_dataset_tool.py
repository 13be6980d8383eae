"""dataset_tool.py fmnist on small synthetic idx files, and training.dataset reading what it writes."""

import gzip
import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from tests.conftest import assert_one_line_refusal, documented_defaults, tree
from training.dataset import DatasetError, load_image_dataset


def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def write_idx(path, array, compress=True):
    data = idx_bytes(array)
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)


def make_source(folder, num_train=7, num_test=3, seed=0, compress=True):
    """Fake Fashion-MNIST idx files; returns {split: (images, labels)}."""
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    made = {}
    for split, num in (("train", num_train), ("test", num_test)):
        images = rng.randint(0, 256, size=[num, 28, 28]).astype(np.uint8)
        labels = rng.randint(0, 10, size=[num]).astype(np.uint8)
        image_name, label_name = dataset_tool.FMNIST_FILES[split]
        write_idx(os.path.join(folder, image_name if compress else image_name[:-3]), images, compress)
        write_idx(os.path.join(folder, label_name if compress else label_name[:-3]), labels, compress)
        made[split] = (images, labels)
    return made


def run_tool(*args):
    return CliRunner().invoke(dataset_tool.main, ["fmnist", *args], catch_exceptions=False)


def padded(images):
    return np.pad(images, [(0, 0), (2, 2), (2, 2)])


@pytest.mark.parametrize("compress", [True, False])
def test_zip_holds_padded_pngs_and_labels(tmp_path, compress):
    made = make_source(tmp_path / "idx", compress=compress)
    dest = tmp_path / "fm.zip"
    result = run_tool(f"--source={tmp_path / 'idx'}", f"--dest={dest}")
    assert result.exit_code == 0, result.output
    images, labels = made["train"]
    with zipfile.ZipFile(dest) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        assert names == [f"00000/img{i:08d}.png" for i in range(len(images))]
        meta = json.loads(z.read("dataset.json"))
        assert meta["labels"] == [[n, int(l)] for n, l in zip(names, labels)]
        for name, expected in zip(names, padded(images)):
            img = PIL.Image.open(io.BytesIO(z.read(name)))
            assert img.mode == "L" and img.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(img), expected)
            assert np.asarray(img)[:2].max() == 0 and np.asarray(img)[:, -2:].max() == 0  # black 2-pixel border


def test_test_split_folder_and_max_images(tmp_path):
    made = make_source(tmp_path / "idx")
    dest = tmp_path / "out"
    result = run_tool(f"--source={tmp_path / 'idx'}", f"--dest={dest}", "--split=test", "--max-images=2")
    assert result.exit_code == 0, result.output
    data = load_image_dataset(str(dest))
    images, labels = made["test"]
    assert data.images.shape == (2, 1, 32, 32) and data.images.dtype.is_floating_point is False
    np.testing.assert_array_equal(data.images[:, 0].numpy(), padded(images[:2]))
    assert data.labels.tolist() == labels[:2].tolist()


def test_training_dataset_reads_the_zip(tmp_path):
    made = make_source(tmp_path / "idx", num_train=12)
    dest = tmp_path / "fm.zip"
    assert run_tool(f"--source={tmp_path / 'idx'}", f"--dest={dest}").exit_code == 0
    data = load_image_dataset(str(dest))
    images, labels = made["train"]
    np.testing.assert_array_equal(data.images[:, 0].numpy(), padded(images))
    assert data.labels.dtype.is_floating_point is False and data.labels.tolist() == labels.tolist()
    assert (len(data), data.channels, data.resolution) == (12, 1, 32)
    assert load_image_dataset(str(dest), max_size=5).images.shape[0] == 5


def test_training_dataset_errors(tmp_path):
    make_source(tmp_path / "idx")
    dest = tmp_path / "fm.zip"
    assert run_tool(f"--source={tmp_path / 'idx'}", f"--dest={dest}").exit_code == 0
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(dest) as src, zipfile.ZipFile(broken, "w") as out:
        for name in src.namelist():
            if name == "dataset.json":
                labels = json.loads(src.read(name))["labels"][1:]  # first image loses its label
                out.writestr(name, json.dumps({"labels": labels}))
            else:
                out.writestr(name, src.read(name))
    with pytest.raises(DatasetError, match="no label for 00000/img00000000.png"):
        load_image_dataset(str(broken))
    with pytest.raises(DatasetError, match="no such folder"):
        load_image_dataset(str(tmp_path / "missing.zip"))


def bad_param(result):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_bad_magic_number(tmp_path):
    make_source(tmp_path / "idx")
    path = tmp_path / "idx" / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[2] = 0x0D  # float32 type code instead of unsigned byte
    path.write_bytes(gzip.compress(bytes(raw)))
    line = bad_param(run_tool(f"--source={tmp_path / 'idx'}", f"--dest={tmp_path / 'x.zip'}"))
    assert "bad magic number 0x00000d03" in line and "--source" in line
    assert not (tmp_path / "x.zip").exists()


def test_truncated_files(tmp_path):
    make_source(tmp_path / "idx")
    images = tmp_path / "idx" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:-100]))  # data cut short
    assert "truncated" in bad_param(run_tool(f"--source={tmp_path / 'idx'}", f"--dest={tmp_path / 'x.zip'}"))
    images.write_bytes(gzip.compress(raw)[:50])  # gzip stream cut short
    assert "truncated" in bad_param(run_tool(f"--source={tmp_path / 'idx'}", f"--dest={tmp_path / 'x.zip'}"))
    images.write_bytes(raw[:10])  # header cut short
    assert "truncated inside the header" in bad_param(run_tool(f"--source={tmp_path / 'idx'}",
                                                               f"--dest={tmp_path / 'x.zip'}"))


def test_mismatched_and_missing_files(tmp_path):
    make_source(tmp_path / "idx", num_train=7)
    labels = tmp_path / "idx" / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros([6]))
    assert "7 images but" in bad_param(run_tool(f"--source={tmp_path / 'idx'}", f"--dest={tmp_path / 'x.zip'}"))
    write_idx(labels, np.full([7], 10))
    assert "label 10 is outside 0..9" in bad_param(run_tool(f"--source={tmp_path / 'idx'}",
                                                            f"--dest={tmp_path / 'x.zip'}"))
    labels.unlink()
    assert "missing train-labels-idx1-ubyte.gz" in bad_param(run_tool(f"--source={tmp_path / 'idx'}",
                                                                     f"--dest={tmp_path / 'x.zip'}"))


def test_read_idx_shapes(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", array, compress=False)
    np.testing.assert_array_equal(dataset_tool.read_idx(str(tmp_path / "a.idx")), array)
    (tmp_path / "b.idx").write_bytes(idx_bytes(array) + b"\x00")
    with pytest.raises(dataset_tool.IdxError, match="longer than its header says"):
        dataset_tool.read_idx(str(tmp_path / "b.idx"))


# ----------------------------------------------------------------------------
# Bad options are refused before anything is read or written


@pytest.fixture
def places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default download cache ./src/fmnist lies here
    monkeypatch.setattr(dataset_tool, "FMNIST_DEBIAN_DIR", str(tmp_path / "no-debian-package"))
    make_source(tmp_path / "idx")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blocker").write_text("a file where a folder is needed\n")
    (tmp_path / "dir.zip").mkdir()

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    for name in ("load_fmnist", "read_idx", "fetch_fmnist", "write_dataset"):
        monkeypatch.setattr(dataset_tool, name, forbidden)
    return tmp_path


@pytest.mark.parametrize("args, words", [
    # bad paths
    (["--dest", "full"], ["--dest", "is not empty"]),
    (["--dest", "dir.zip"], ["--dest", "is a folder; give a file name"]),
    (["--dest", "blocker"], ["--dest", "is a file"]),
    (["--dest", "blocker/fm.zip"], ["--dest", "is a file"]),
    (["--dest", "blocker/fm"], ["--dest", "is a file"]),
    (["--source", "missing"], ["--source", "no such folder"]),
    (["--source", "blocker"], ["--source", "is a file"]),
    (["--source", "empty"], ["--source", "missing train-images-idx3-ubyte.gz"]),
    (["--source", "empty", "--split", "test"], ["--source", "missing t10k-images-idx3-ubyte.gz"]),
    # bad ranges and choices
    (["--max-images", "0"], ["--max-images", "not in the range"]),
    (["--max-images", "-5"], ["--max-images", "not in the range"]),
    (["--split", "validation"], ["--split", "validation"]),
    # contradictory options: writing into the folder the idx files come from
    (["--dest", "idx"], ["--dest", "is not empty"]),
])
def test_fmnist_refuses_bad_options_before_any_work(places, args, words):
    before = tree(places)
    r = CliRunner().invoke(dataset_tool.main, ["fmnist", "--source", "idx", "--dest", "out/fm.zip", *args])
    assert_one_line_refusal(r, *words)
    assert tree(places) == before


def test_default_source_needs_a_writable_download_cache(places):
    (places / "src").write_text("a file where the cache folder should be\n")
    before = tree(places)
    r = CliRunner().invoke(dataset_tool.main, ["fmnist", "--dest", "out/fm.zip"])
    assert_one_line_refusal(r, "--source", "not given", "give --source=DIR")
    assert tree(places) == before


def test_offline_download_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SFD_OFFLINE", "1")
    monkeypatch.setattr(dataset_tool, "FMNIST_DEBIAN_DIR", str(tmp_path / "no-debian-package"))
    r = CliRunner().invoke(dataset_tool.main, ["fmnist", "--dest", "out/fm.zip"])
    assert_one_line_refusal(r, "cannot get 'train-images-idx3-ubyte.gz'", "SFD_OFFLINE=1")
    assert os.listdir(tmp_path) == []


def test_real_script_refuses_in_one_line_with_exit_code_2(tmp_path):
    """The script as a user runs it (through torch_utils.cli.run)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    p = subprocess.run([sys.executable, os.path.join(root, "dataset_tool.py"), "fmnist", "--dest", "full",
                        "--source", "missing"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert lines[-1] == "Error: Invalid value for --dest: folder full is not empty; give an empty or new folder, or a .zip"
    assert all(line.startswith(("Usage: ", "Try '")) for line in lines[:-1]), p.stderr


def test_documented_defaults_are_the_ones_that_run(tmp_path, monkeypatch):
    """Without --source, --split and --max-images: the folder default_source() finds (Debian's package, else the
    download cache, as --help says), the train split, every image."""
    documented = documented_defaults(dataset_tool.main, "fmnist")
    assert documented == {"--source": f"{dataset_tool.FMNIST_DEBIAN_DIR} when installed, else downloaded once into "
                                      f"./{dataset_tool.FMNIST_CACHE_DIR}/", "--split": "train", "--max-images": "all"}
    made = make_source(tmp_path / "idx", num_train=6, num_test=3)
    asked = []
    monkeypatch.setattr(dataset_tool, "default_source", lambda: asked.append(1) or str(tmp_path / "idx"))
    assert run_tool(f"--dest={tmp_path / 'out.zip'}").exit_code == 0
    data = load_image_dataset(str(tmp_path / "out.zip"))
    assert asked == [1] and data.labels.tolist() == made["train"][1].tolist()
