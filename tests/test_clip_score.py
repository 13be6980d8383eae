"""clip_score.py: the CLIP score of text-to-image samples (design §8) against an independent computation with a tiny
OpenCLIP model built here from a configuration with random weights (no download); pairing by the seed in the file
name, also when the folder is sharded over two gloo processes; bad input refused in one line before any model loads;
offline downloads named."""

import csv
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import clip_score
import dnnlib
from metrics import clip
from tests.conftest import ROOT, assert_one_line_refusal, tree

# A CLIP small enough for a test: one transformer block per tower, 32-wide (OpenCLIP's own tokenizer, 49408 tokens).
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# Seeds of the hand-made folder, in sub-folders whose sorted listing is not seed order (a/ holds the largest seeds).
LAYOUT = {"a/000030.png": 30, "a/000014.png": 14, "b/000002.png": 2, "b/000017.png": 17, "c/000005.png": 5,
          "c/000009.png": 9}
NUM_CAPTIONS = 40


def write_captions(path, texts):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "id", "text"])  # the MS-COCO 30k file's columns
        writer.writerows([i, 100 + i, t] for i, t in enumerate(texts))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model's configuration and weights files, the folder of samples and its caption file."""
    d = tmp_path_factory.mktemp("clip")
    config = d / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip = clip.import_open_clip()
    name = clip.resolve_model(str(config))
    torch.manual_seed(0)
    weights = str(d / "tiny-clip.pt")
    torch.save(open_clip.create_model(name).state_dict(), weights)
    rng = np.random.RandomState(0)
    for k, rel in enumerate(LAYOUT):
        os.makedirs(d / "images" / os.path.dirname(rel), exist_ok=True)
        size = (40, 48) if k % 2 else (64, 64)  # OpenCLIP's transform resizes and crops each one
        PIL.Image.fromarray(rng.randint(0, 256, [*size, 3]).astype(np.uint8)).save(d / "images" / rel)
    texts = [f"{w} number {i}" for i, w in zip(range(NUM_CAPTIONS), ["a red bus", "two cats", "a kitchen", "snow"] * 10)]
    return dnnlib.EasyDict(dir=d, config=str(config), weights=weights, name=name, images=str(d / "images"),
                           texts=texts, captions=write_captions(d / "captions.csv", texts))


def reference_cosines(tiny, texts_by_seed):
    """{seed: cos} computed here: OpenCLIP's model and transform on each file on its own, its tokenizer, encode_image
    and encode_text, both embeddings L2-normalised."""
    open_clip = clip.import_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(tiny.name, pretrained=tiny.weights)
    tokenizer = open_clip.get_tokenizer(tiny.name)
    found = {}
    with torch.no_grad():
        for path in glob.glob(os.path.join(tiny.images, "*", "*.png")):
            seed = int(os.path.basename(path)[:-4])
            image = model.eval().encode_image(preprocess(PIL.Image.open(path))[None])[0]
            text = model.encode_text(tokenizer([texts_by_seed[seed]]))[0]
            found[seed] = float(torch.dot(image / image.norm(), text / text.norm()))
    return found


def score_of(cosines):
    return 100 * float(np.mean(list(cosines.values())))


def parse_score(output):
    values = re.findall(r"CLIP score: (\S+)", output)
    assert len(values) == 1, output
    return values[0]


def run(tiny, *args):
    return CliRunner().invoke(clip_score.main, ["calc", "--images", tiny.images, "--model", tiny.config,
                                                "--pretrained", tiny.weights, "--workers", "0", "--device", "cpu",
                                                *args])


def test_score_is_100_times_the_mean_cosine_of_each_image_with_the_caption_of_its_seed(tiny, tmp_path):
    results = tmp_path / "results.tsv"
    r = run(tiny, "--prompts", tiny.captions, "--batch", "4", "--results", str(results), "--label", "tiny")
    assert r.exit_code == 0, r.output
    expected = score_of(reference_cosines(tiny, dict(enumerate(tiny.texts))))
    assert float(parse_score(r.output)) == pytest.approx(expected, abs=1e-4)
    label, value, num, images = results.read_text().rstrip("\n").split("\t")
    assert (label, num, images) == ("tiny", "6", tiny.images) and value == parse_score(r.output)
    # Pairing by listing order (image k with caption k) would have given another score: the test tells them apart.
    listing = sorted(LAYOUT)
    by_listing = score_of(reference_cosines(tiny, {LAYOUT[name]: tiny.texts[k] for k, name in enumerate(listing)}))
    assert abs(by_listing - expected) > 0.05


def test_swapping_two_images_captions_changes_the_score(tiny, tmp_path):
    swapped = list(tiny.texts)
    swapped[5], swapped[14] = swapped[14], swapped[5]
    same = run(tiny, "--prompts", tiny.captions)
    other = run(tiny, "--prompts", write_captions(tmp_path / "swapped.csv", swapped))
    assert same.exit_code == 0 and other.exit_code == 0, same.output + other.output
    assert abs(float(parse_score(other.output)) - float(parse_score(same.output))) > 0.05
    expected = score_of(reference_cosines(tiny, dict(enumerate(swapped))))
    assert float(parse_score(other.output)) == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_one_and_two_gloo_processes_give_the_same_score_with_each_image_paired_by_its_seed(tiny):
    """--batch 2 over 6 images: rank 0 scores seeds 2, 5, 14, 17 and rank 1 seeds 9, 30 (batches dealt in turn); the
    gathered score is the one-process score to the printed digit and the independent one with seed pairing."""
    args = ["--prompts", tiny.captions, "--batch", "2", "--workers", "0", "--device", "cpu"]
    single = run(tiny, *args)
    assert single.exit_code == 0, single.output
    env = dict(os.environ, SFD_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "clip_score.py"), "calc", "--images", tiny.images, "--model", tiny.config,
           "--pretrained", tiny.weights, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("CLIP score: ") == 1  # printed by rank 0 only
    assert parse_score(p.stdout) == parse_score(single.output)
    expected = score_of(reference_cosines(tiny, dict(enumerate(tiny.texts))))
    assert float(parse_score(p.stdout)) == pytest.approx(expected, abs=1e-4)


def test_batches_are_the_same_for_any_number_of_ranks():
    one = clip.fixed_batches(7, 2)
    two = clip.fixed_batches(7, 2, 0, 2) + clip.fixed_batches(7, 2, 1, 2)
    three = [b for r in range(3) for b in clip.fixed_batches(7, 2, r, 3)]
    assert one == [[0, 1], [2, 3], [4, 5], [6]] and sorted(two) == sorted(three) == one


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any model loads, nothing written


@pytest.fixture
def bad_inputs(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def folder(name, files, record=None):
        for rel in files:
            os.makedirs(tmp_path / name / os.path.dirname(rel), exist_ok=True)
            PIL.Image.new("RGB", (8, 8)).save(tmp_path / name / rel)
        if record:
            with open(tmp_path / name / "captions.csv", "w", newline="") as f:
                csv.writer(f).writerows([["seed", "text"], *record.items()])
        return str(tmp_path / name)

    (tmp_path / "notext.csv").write_text("image_id,caption\n0,a cat\n")
    (tmp_path / "blocker").write_text("a file where a folder is needed\n")
    (tmp_path / "adir").mkdir()
    paths = dict(imgs=tiny.images, caps=tiny.captions, cfg=tiny.config, w=tiny.weights, dir=str(tmp_path / "adir"),
                 blocker=str(tmp_path / "blocker"), notext=str(tmp_path / "notext.csv"),
                 noseed=folder("noseed", ["000001.png", "cat.png"]),
                 twice=folder("twice", ["a/000002.png", "b/000002.png"]),
                 beyond=folder("beyond", ["000003.png", f"{NUM_CAPTIONS + 5:06d}.png"]),
                 other=folder("other", ["000003.png"], record={3: "a cat on a mat"}),
                 mixed=folder("mixed", ["000003.png", "000004.png"], record={3: tiny.texts[3]}))
    return tmp_path, paths


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a model loads, a download starts, the process group starts or an image is decoded."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(clip, "load_clip", forbidden)
    monkeypatch.setattr(clip, "rank_cosines", forbidden)
    monkeypatch.setattr(dnnlib.util, "download_file", forbidden)
    monkeypatch.setattr(clip_score.dist, "init", forbidden)
    monkeypatch.setattr(clip_score.ImageFiles, "read", forbidden)


CALC = ["calc", "--images", "{imgs}", "--prompts", "{caps}", "--model", "{cfg}", "--pretrained", "{w}", "--workers",
        "0", "--device", "cpu"]


@pytest.mark.parametrize("args, words", [
    # the images
    (["--images", "{dir}/missing"], ["--images", "no such folder"]),
    (["--images", "{dir}"], ["--images", "no PNG/JPG images"]),
    (["--num", "7"], ["--num", "holds only 6 images", "lower --num"]),
    (["--num", "0"], ["--num", "not in the range"]),
    (["--images", "{noseed}"], ["--images", "cat.png carries no seed", "no caption"]),
    (["--images", "{twice}"], ["--images", "seed 2 has two images"]),
    (["--images", "{beyond}"], ["--images", "1 image has no caption", f"seed {NUM_CAPTIONS + 5}", "40 captions"]),
    (["--images", "{other}"], ["--images", "seed 3 was sampled with 'a cat on a mat'", "--prompts="]),
    (["--images", "{mixed}"], ["--images", "seed 4 is not in", "another run"]),
    # the captions
    (["--prompts", "{dir}/missing.csv"], ["--prompts", "no such file"]),
    (["--prompts", "{dir}"], ["--prompts", "is a folder"]),
    (["--prompts", "{notext}"], ["--prompts", "no 'text' column"]),
    # the model and its weights
    (["--model", "ViT-Q-99"], ["--model", "OpenCLIP knows no model 'ViT-Q-99'"]),
    (["--model", "{dir}/missing.json"], ["--model", "no such model configuration file"]),
    (["--model", "ViT-g-14", "--pretrained", "laion9b"], ["--pretrained", "neither a file nor a tag of ViT-g-14",
                                                          "laion2b_s34b_b88k"]),
    (["--model", "ViT-g-14", "--pretrained", "laion2b_s34b_b88k", "--cache", "{blocker}"], ["--cache", "is a file"]),
    # the rest
    (["--label", "run1"], ["--label", "add --results"]),
    (["--results", "{dir}"], ["--results", "is a folder"]),
    (["--results", "{caps}"], ["--results", "also the --prompts file"]),
    (["--batch", "0"], ["--batch", "not in the range"]),
    (["--device", "tpu"], ["--device", "not a device"]),
])
def test_bad_input_is_refused_in_one_line_before_any_model_loads(bad_inputs, no_work, args, words):
    root, paths = bad_inputs
    before = tree(root)
    result = CliRunner().invoke(clip_score.main, [a.format(**paths) for a in CALC + args])
    assert tree(root) == before, result.output
    assert_one_line_refusal(result, *words)


def test_offline_downloads_name_the_file_its_url_and_the_folder(tiny, tmp_path, monkeypatch):
    """The CLIP weights of a tag and the default caption file come through the download cache: offline, one line
    with exit code 2 naming what to download from where and where to put it."""
    from models import BACKBONES

    monkeypatch.setenv("SFD_OFFLINE", "1")
    cache = tmp_path / "cache"
    weights = CliRunner().invoke(clip_score.main, ["calc", "--images", tiny.images, "--prompts", tiny.captions,
                                                   "--cache", str(cache), "--device", "cpu"])
    assert weights.exit_code == 2 and "Traceback" not in weights.output, weights.output
    errors = [line for line in weights.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and weights.output.rstrip().endswith(errors[0]), weights.output  # after 'Loading CLIP'
    for words in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "SFD_OFFLINE",
                  "https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s34B-b88K/resolve/main/open_clip_model.safetensors",
                  os.path.join(str(cache), "metrics", "open_clip", "ViT-g-14-laion2b_s34b_b88k")):
        assert words in errors[0], errors[0]
    captions = CliRunner().invoke(clip_score.main, ["calc", "--images", tiny.images, "--model", tiny.config,
                                                    "--pretrained", tiny.weights, "--cache", str(cache)])
    assert_one_line_refusal(captions, "MS-COCO_val2014_30k_captions.csv", BACKBONES["ms_coco"].extra_urls["captions"],
                            os.path.join(str(cache), "ms_coco"))
