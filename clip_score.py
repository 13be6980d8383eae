"""CLIP score of text-to-image samples: how well each image matches its caption (design §8)."""

import os

import click
import torch

import dnnlib
from fid import check_not_same_file, default_workers
from metrics import clip
from metrics.detectors import one_line
from metrics.images import ImageFiles, ImageSourceError
from torch_utils import cli
from torch_utils.cli import CommandError
from torch_utils import distributed as dist

CAPTION_BACKBONE = "ms_coco"  # whose caption file (and its download) --prompts defaults to


@click.group()
def main():
    """Calculate the CLIP score of text-to-image samples (OpenCLIP; default ViT-g-14, laion2b_s34b_b88k).

    Image SEED.png is paired with caption row SEED of the MS-COCO 30k caption file that sample.py samples
    --dataset_name=ms_coco with: the seed in the file name decides, so a partial or sharded folder pairs correctly.

    \b
    # 30k Stable Diffusion samples (sample.py --dataset_name=ms_coco --seeds=0-29999), on 4 GPUs
    torchrun --standalone --nproc_per_node=4 clip_score.py calc --images=samples/ms_coco/euler_step4_nfe4

    \b
    # A local caption file, the first 5000 seeds, a line appended to a results file
    python clip_score.py calc --images=samples/ms_coco/euler_step4_nfe4 --prompts=MS-COCO_val2014_30k_captions.csv \\
        --num=5000 --results=results.tsv --label=sfd-nfe4

    \b
    # Another OpenCLIP model, or a model configuration (.json) with a weights file
    python clip_score.py calc --images=DIR --model=ViT-L-14 --pretrained=laion2b_s32b_b82k
    python clip_score.py calc --images=DIR --model=my-clip.json --pretrained=my-clip.safetensors
    """


@main.command()
@click.option("--images", "images_path", required=True, metavar="DIR|ZIP",
              help="Folder (searched recursively) or zip of the samples, named SEED.png as sample.py writes them.")
@click.option("--prompts", "prompts_path", default=None, metavar="CSV",
              help="Caption file: a CSV with a 'text' column, row = seed (or a 'seed' column, as the captions.csv "
                   "sample.py writes beside its images).  [default: the MS-COCO 30k caption file, downloaded once to "
                   "CACHE/ms_coco/]")
@click.option("--num", type=click.IntRange(min=1), default=None, metavar="INT",
              help="Score the images of the NUM lowest seeds; fewer images are refused.  [default: all images]")
@click.option("--model", "model_spec", default=clip.DEFAULT_MODEL, show_default=True, metavar="NAME|JSON",
              help="OpenCLIP model name (open_clip.list_models()) or a model configuration .json.")
@click.option("--pretrained", default=clip.DEFAULT_PRETRAINED, show_default=True, metavar="TAG|FILE",
              help="OpenCLIP weights tag of --model (downloaded once to CACHE/metrics/open_clip/) or a weights file.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, metavar="INT",
              help="Images per model call on each rank.")
@click.option("--results", "results_path", default=None, metavar="FILE",
              help="Append one line 'label<TAB>clip_score<TAB>num<TAB>images' to FILE.  [default: none]")
@click.option("--label", default=None, metavar="TEXT",
              help="Label of the --results line.  [default: the --images path]")
@click.option("--workers", type=click.IntRange(min=0), default=None, metavar="INT",
              help="Image-decoding worker processes per rank (0 = decode in the main process).  "
                   f"[default: min(3, CPU cores available - 1), here {default_workers()}]")
@click.option("--cache", default="./src", show_default=True, metavar="DIR",
              help="Download cache root (the CLIP weights and the caption file).")
@click.option("--device", default=None, metavar="DEVICE",
              help="Where the model runs: cpu, cuda or cuda:N; under torchrun each rank uses cuda:LOCAL_RANK.  "
                   "[default: cuda if this machine has it, else cpu]")
def calc(images_path, prompts_path, num, model_spec, pretrained, batch, results_path, label, workers, cache, device):
    """Calculate the CLIP score of a folder of samples against their captions."""
    device = cli.check_device(device)
    workers = default_workers() if workers is None else workers
    if label is not None and results_path is None:
        raise click.BadParameter("only the --results line carries a label; add --results=FILE or drop --label",
                                 param_hint="--label")
    if results_path is not None:
        cli.check_output_file(results_path, "--results")
        check_not_same_file(results_path, "--results", prompts_path, "--prompts", "file, which a line would be "
                            "appended to")
        check_not_same_file(results_path, "--results", images_path, "--images", "zip, which a line would be "
                            "appended to")
    images, pairs = open_seeded_images(images_path, num)
    if prompts_path is not None:
        cli.check_input_file(prompts_path, "--prompts")
    model_name, weights = check_model(model_spec, pretrained, cache)
    captions, prompts_file = read_captions(prompts_path, cache)
    check_pairing(images_path, pairs, captions, prompts_file)

    device = dist.init(device)
    dist.print0(f"Loading CLIP {model_name} ({pretrained})...")
    try:
        net, transform, tokenizer = dist.rank0_first(lambda: clip.load_clip(model_name, pretrained, device, cache))
    except dnnlib.util.DownloadError as e:
        raise CommandError(one_line(e)) from None
    except ValueError as e:
        raise click.BadParameter(one_line(e), param_hint="--pretrained") from None
    dist.print0(f"Scoring {len(pairs)} images of {images_path} against {prompts_file}...")
    try:
        mine = clip.rank_cosines(net, transform, tokenizer, images, pairs, captions, batch, device,
                                 rank=dist.get_rank(), world_size=dist.get_world_size(), num_workers=workers,
                                 progress=dist.get_rank() == 0)
    except ImageSourceError as e:
        raise click.BadParameter(one_line(e), param_hint="--images") from None
    every = [mine]
    if dist.is_distributed():
        every = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        score = clip.clip_score([pair for part in every for pair in part])
        print(f"CLIP score: {score:.6g}", flush=True)
        if results_path:
            line = f"{label if label is not None else images_path}\t{score:.6g}\t{len(pairs)}\t{images_path}\n"
            os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
            with open(results_path, "a") as f:
                f.write(line)
    dist.barrier()
    dist.shutdown()


# --- checks made before any model loads: one line naming the option, exit code 2, nothing written ----------------


def open_seeded_images(path, num):
    """(ImageFiles, [(seed, index)] sorted by seed, the num lowest when num is given) of --images."""
    try:
        images = ImageFiles(path)
        pairs = clip.images_by_seed(images)
    except (ImageSourceError, ValueError) as e:
        raise click.BadParameter(one_line(e), param_hint="--images") from None
    if num is not None:
        if num > len(pairs):
            raise click.BadParameter(f"--num={num} but {path} holds only {len(pairs)} images; lower --num or sample "
                                     "the missing seeds", param_hint="--num")
        pairs = pairs[:num]
    return images, pairs


def check_model(model_spec, pretrained, cache):
    """(OpenCLIP model name, weight sources); a model OpenCLIP does not know, weights that are neither a file nor a
    tag of it, or a cache that cannot take their download are refused."""
    try:
        name = clip.resolve_model(model_spec)
    except ValueError as e:
        raise click.BadParameter(one_line(e), param_hint="--model") from None
    try:
        kind, where, _ = clip.weight_sources(name, pretrained, cache)
    except ValueError as e:
        raise click.BadParameter(one_line(e), param_hint="--pretrained") from None
    if kind == "download" and clip.cached_weights(where) is None:
        cli.check_output_dir(where[2], "--cache")
    return name, where


def read_captions(prompts_path, cache):
    """({seed: caption}, the file they came from): --prompts, or the MS-COCO caption file that sample.py samples
    ms_coco with (the same reader and the same download as sample.py and train.py)."""
    from models.latent.loading import caption_file
    from models.latent.text import captions_by_seed

    if prompts_path is None:
        try:
            prompts_path = caption_file({"cache_root": cache}, CAPTION_BACKBONE)
        except dnnlib.util.DownloadError as e:  # offline: names the file, its URL and the folder
            raise CommandError(one_line(e)) from None
    try:
        return captions_by_seed(prompts_path), prompts_path
    except ValueError as e:
        raise click.BadParameter(one_line(e), param_hint="--prompts") from None


def check_pairing(images_path, pairs, captions, prompts_file):
    """Every image has a caption; where sample.py recorded the caption of each seed beside the images, it must be
    the caption this run pairs the image with."""
    from models.latent.text import SEED_CAPTIONS_FILE, captions_by_seed

    missing = [seed for seed, _ in pairs if seed not in captions]
    if missing:
        what = f"{len(missing)} images have" if len(missing) > 1 else "1 image has"
        raise click.BadParameter(f"{what} no caption in {prompts_file} (first: seed {missing[0]}; it has "
                                 f"{len(captions)} captions); score only seeds it covers (--num) or give their caption "
                                 "file with --prompts", param_hint="--images")
    record = os.path.join(images_path, SEED_CAPTIONS_FILE)
    if not os.path.isfile(record) or os.path.abspath(record) == os.path.abspath(prompts_file):
        return
    try:
        sampled = captions_by_seed(record)
    except ValueError as e:
        raise click.BadParameter(f"{one_line(e)}; remove it or mend it", param_hint="--images") from None
    for seed, _ in pairs:
        if seed not in sampled:
            raise click.BadParameter(f"seed {seed} is not in {record}, the record of the captions these images were "
                                     "sampled with: the folder mixes in images of another run", param_hint="--images")
        if sampled[seed] != captions[seed]:
            raise click.BadParameter(
                f"seed {seed} was sampled with {short(sampled[seed])} ({record}) but {prompts_file} gives it "
                f"{short(captions[seed])}; give the caption file the images were sampled with (--prompts={record} "
                "scores against that record)", param_hint="--images")


def short(text, width=40):
    return repr(text if len(text) <= width else text[:width - 3] + "...")


if __name__ == "__main__":
    cli.run(main)
