"""launch.sh: unknown recipes and bad settings are refused in one line with exit code 2 before anything starts, and
the process count follows the machine (one process as plain python, several under torchrun)."""

import os
import subprocess

import pytest

from tests.conftest import ROOT


def launch(*args, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("GPUS", "DRY", "CAPTIONS", "SFD_COCO_CAPTIONS")}
    return subprocess.run(["bash", os.path.join(ROOT, "launch.sh"), *args], capture_output=True, text=True,
                          env=dict(base, **env), timeout=120)


def test_unknown_recipe_exits_2_and_help_exits_0():
    bad = launch("bogus")
    assert bad.returncode == 2 and "unknown recipe 'bogus'" in bad.stderr
    for args in ((), ("help",)):
        ok = launch(*args)
        assert ok.returncode == 0 and "bash launch.sh sfd" in ok.stdout


def test_process_count_defaults_to_the_visible_gpus_or_one():
    import torch

    expected = max(torch.cuda.device_count(), 1)
    default = launch("sfd", DRY="1")
    assert default.returncode == 0, default.stderr
    start = "python train.py" if expected == 1 else f"torchrun --standalone --nproc_per_node={expected} train.py"
    assert default.stdout.startswith(start), default.stdout
    assert "--total_kimg=200 --batch=128 --lr=5e-5" in default.stdout
    assert launch("sfd", DRY="1", GPUS="3").stdout.startswith("torchrun --standalone --nproc_per_node=3 train.py ")
    assert launch("sfd", DRY="1", GPUS="1").stdout.startswith("python train.py ")


@pytest.mark.parametrize("recipe, env, message", [
    ("sfd", dict(GPUS="abc"), "launch.sh sfd: GPUS=abc is not a positive number of processes"),
    ("sfd", dict(GPUS="0"), "launch.sh sfd: GPUS=0 is not a positive number of processes"),
    ("sample_v", dict(NUM_STEPS="four"), "launch.sh sample_v: NUM_STEPS=four is not a whole number"),
    ("sample", dict(EXP="no/such/run"), "launch.sh sample: EXP=no/such/run is neither an experiment number nor a path"),
    ("stage2", {}, "launch.sh stage2: set MODEL=path/to/the/first-stage/network-snapshot-*.safetensors"),
    ("fid", {}, "launch.sh fid: set IMAGES="),
    ("prdc", dict(IMAGES="a"), "launch.sh prdc: set IMAGES_REF="),
    ("clip", {}, "launch.sh clip: set IMAGES="),
    ("ldm", {}, "launch.sh ldm: set DATASET=lsun_bedroom_ldm or DATASET=ffhq_ldm"),
])
def test_bad_settings_are_one_line_with_exit_code_2(tmp_path, recipe, env, message):
    result = launch(recipe, DRY="1", **env)
    assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout


def test_clip_scores_sample_sd_images_and_captions_travel_as_options():
    """`clip` runs clip_score.py (under torchrun for several processes) with the paper's OpenCLIP model; CAPTIONS (or
    the older SFD_COCO_CAPTIONS) reaches sd, sample_sd and clip as an option, never through the environment."""
    clip = launch("clip", DRY="1", GPUS="2", IMAGES="samples/ms_coco/x", CAPTIONS="caps.csv")
    assert clip.returncode == 0, clip.stderr
    assert clip.stdout.split() == ["torchrun", "--standalone", "--nproc_per_node=2", "clip_score.py", "calc",
                                   "--images=samples/ms_coco/x", "--model=ViT-g-14", "--pretrained=laion2b_s34b_b88k",
                                   "--prompts=caps.csv"]
    assert "--prompts" not in launch("clip", DRY="1", GPUS="1", IMAGES="x").stdout  # default: the download
    for recipe in ("sd", "sample_sd"):
        for env in (dict(CAPTIONS="caps.csv"), dict(SFD_COCO_CAPTIONS="caps.csv")):
            assert launch(recipe, DRY="1", GPUS="1", **env).stdout.rstrip().endswith("--captions=caps.csv"), recipe
        assert "--captions" not in launch(recipe, DRY="1", GPUS="1").stdout


def test_several_processes_check_train_options_before_torchrun_and_keep_exit_code_2(tmp_path):
    """GPUS=2: train.py's options are checked for two ranks (its --dry-run) before torchrun starts; a bad input
    found inside torchrun (sample.py: no such experiment) still ends with our exit code 2, not torchrun's 1."""
    bad = launch("stage2", GPUS="2", MODEL=str(tmp_path / "missing.safetensors"))
    assert bad.returncode == 2 and "no such file" in bad.stderr and "torchrun" not in bad.stderr + bad.stdout
    assert "ChildFailedError" not in bad.stderr
    inside = launch("sample", GPUS="2", EXP="7")
    assert inside.returncode == 2 and "no experiment folder" in inside.stderr, inside.stderr[-2000:]


def test_every_recipe_in_the_help_runs_and_the_help_ends_where_the_header_ends():
    import re

    help_text = launch("help").stdout
    assert help_text.rstrip().endswith("is 2 NFE.") and "set -euo" not in help_text
    recipes = re.findall(r"bash launch.sh (\w+)", help_text)
    assert "bedroom" in recipes
    bedroom = launch("bedroom", DRY="1", GPUS="1").stdout
    assert "--dataset_name=lsun_bedroom" in bedroom and "--batch=128 --batch-gpu=4 --lr=5e-5" in bedroom
    for recipe in recipes:  # recipes that need an input say so and exit 2; none is unknown
        result = launch(recipe, DRY="1", GPUS="1", MODEL="m.safetensors", IMAGES="a", REF="r.npz", IMAGES_REF="b")
        assert "unknown recipe" not in result.stderr, recipe
    assert "clip" in recipes
