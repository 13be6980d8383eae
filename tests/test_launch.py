"""launch.sh: unknown recipes are refused, and the process count follows the machine."""

import os
import subprocess

from tests.conftest import ROOT


def launch(*args, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("GPUS", "DRY")}
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
    assert default.stdout.startswith(f"torchrun --standalone --nproc_per_node={expected} train.py"), default.stdout
    assert "--total_kimg=200 --batch=128 --lr=5e-5" in default.stdout
    assert launch("sfd", DRY="1", GPUS="3").stdout.startswith("torchrun --standalone --nproc_per_node=3 ")


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
