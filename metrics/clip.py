"""CLIP score of text-to-image samples (design §8): how well image i matches caption i, by OpenCLIP.

    score = mean over images i of 100 * cos(E_img(image_i), E_txt(caption_i))

with OpenCLIP's model (default ViT-g-14, weights laion2b_s34b_b88k), its own evaluation transform for the images
and its tokenizer for the captions. Image i is the PNG of seed i that sample.py wrote; its caption is row i of the
caption file, so images are paired with captions by the seed in their file name, never by listing order.

The weights of a named tag come through our download cache ({cache}/metrics/open_clip/{model}-{tag}/), so offline
the error names the file, its URL and the folder, as for the FID detector. `--model` may also be an OpenCLIP model
configuration (.json) and `--pretrained` a weights file: a custom or tiny model, loaded without any download.
"""

import math
import os
import re

import PIL.Image
import torch

import dnnlib

DEFAULT_MODEL = "ViT-g-14"
DEFAULT_PRETRAINED = "laion2b_s34b_b88k"
# OpenCLIP's own file names on the Hugging Face hub; it prefers the safetensors file where one exists.
HUB_FILE_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
HUB_DEFAULT_FILE = "open_clip_pytorch_model.bin"
HUB_SAFE_FILE = "open_clip_model.safetensors"


def import_open_clip():
    """open_clip, imported on first use (it takes seconds); ValueError when it is not installed."""
    from torch_utils.torchvision_compat import allow_import

    allow_import()  # open_clip imports torchvision, whose index wheel fails to import beside a CPU-only torch
    try:
        import open_clip
    except ImportError as e:
        raise ValueError(f"the CLIP score needs open_clip ({e}); install it: pip install -r requirements.txt") from None
    return open_clip


# ----------------------------------------------------------------------------------------------
# Which model, which weights: resolved without building anything, so a command can refuse bad input first.


def resolve_model(spec):
    """The OpenCLIP model name of --model: a name OpenCLIP knows, or a model configuration .json (registered here
    under its file's stem). ValueError otherwise."""
    open_clip = import_open_clip()
    spec = str(spec)
    if spec.lower().endswith(".json"):
        if not os.path.isfile(spec):
            raise ValueError(f"no such model configuration file: {spec}")
        try:
            open_clip.add_model_config(spec)
        except (ValueError, KeyError, OSError) as e:
            raise ValueError(f"{spec} is not an OpenCLIP model configuration ({e})") from None
        name = os.path.splitext(os.path.basename(spec))[0]
        if name not in open_clip.list_models():
            raise ValueError(f"{spec} is not an OpenCLIP model configuration (it needs embed_dim, vision_cfg and "
                             "text_cfg)")
        return name
    if spec not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().startswith(spec.lower()[:5])][:4]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(f"OpenCLIP knows no model {spec!r}{hint}; see open_clip.list_models(), or give a model "
                         "configuration .json")
    return spec


def weight_sources(model, pretrained, cache_root):
    """Where the weights come from: ('file', path, {}) for a local file, or ('download', (file names, URLs, folder),
    the tag's preprocessing settings) for a tag OpenCLIP lists for `model`. ValueError for anything else."""
    open_clip = import_open_clip()
    if os.path.isfile(str(pretrained)):
        return "file", str(pretrained), {}
    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    tags = open_clip.list_pretrained_tags_by_model(model)
    if not cfg:
        known = f"its tags: {', '.join(tags)}" if tags else "OpenCLIP lists no weights for it: give a weights file"
        raise ValueError(f"{pretrained!r} is neither a file nor a tag of {model} ({known})")
    if cfg.get("url"):
        urls = [cfg["url"]]
    elif cfg.get("hf_hub"):
        repo, file_name = os.path.split(cfg["hf_hub"])  # 'org/name/' (OpenCLIP's default file) or 'org/name/file'
        file_name = file_name or HUB_DEFAULT_FILE
        safe = HUB_SAFE_FILE if file_name == HUB_DEFAULT_FILE else (
            file_name[:-4] + ".safetensors" if file_name.endswith((".bin", ".pth")) else None)
        names = ([safe] if safe else []) + [file_name]  # the safetensors file first, as OpenCLIP tries them
        urls = [HUB_FILE_URL.format(repo=repo, file=n) for n in names]
    else:
        raise ValueError(f"OpenCLIP gives no download for {model} {pretrained}; give a weights file")
    folder = os.path.abspath(os.path.join(cache_root, "metrics", "open_clip", f"{model}-{pretrained}"))
    names = [dnnlib.util._file_name_from_url(u) for u in urls]
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode", "quick_gelu") if k in cfg}
    return "download", (names, urls, folder), preprocess


def cached_weights(sources):
    """The weights file already in the cache folder, else None."""
    names, _urls, folder = sources
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def download_weights(sources):
    """The weights file, downloaded once into its cache folder (the first URL that answers)."""
    found = cached_weights(sources)
    if found:
        return found
    names, urls, folder = sources
    reason = "failed"
    for name, url in zip(names, urls):
        try:
            return dnnlib.util.download_file(url, folder, file_name=name)
        except dnnlib.util.DownloadError as e:
            reason = str(e).rpartition(" (")[2].rstrip(")") or reason
    raise dnnlib.util.DownloadError(
        f"cannot get the CLIP weights {' or '.join(repr(n) for n in names)} from {' or '.join(urls)}: download one yourself and put "
        f"it in {folder}/ ({reason})")


def load_clip(model, pretrained, device, cache_root):
    """(model in eval mode on device, OpenCLIP's evaluation image transform, its tokenizer)."""
    open_clip = import_open_clip()
    kind, where, preprocess = weight_sources(model, pretrained, cache_root)
    path = where if kind == "file" else download_weights(where)
    options = dict(image_mean=preprocess.get("mean"), image_std=preprocess.get("std"),
                   image_interpolation=preprocess.get("interpolation"),
                   image_resize_mode=preprocess.get("resize_mode"),
                   force_quick_gelu=bool(preprocess.get("quick_gelu", False)))
    try:
        net, _, transform = open_clip.create_model_and_transforms(model, pretrained=path, device=device, **options)
    except RuntimeError as e:  # e.g. weights of another architecture
        raise ValueError(f"{path} does not load into OpenCLIP's {model}: {str(e).strip().splitlines()[0]}") from None
    return net.eval().requires_grad_(False), transform, open_clip.get_tokenizer(model)


# ----------------------------------------------------------------------------------------------
# Images and their seeds


SEED_NAME = re.compile(r"(\d+)\.(?:png|jpe?g)", re.IGNORECASE)


def seed_of(name):
    """The seed in an image's file name (sample.py writes {seed:06d}.png), else None."""
    m = SEED_NAME.fullmatch(os.path.basename(name.replace("\\", "/")))
    return int(m.group(1)) if m else None


def images_by_seed(images):
    """[(seed, index into images)] sorted by seed, for an ImageFiles; ValueError for a name without a seed or a seed
    that two files carry."""
    found = {}
    for i in range(len(images)):
        name = images.name(i)
        seed = seed_of(name)
        if seed is None:
            raise ValueError(f"{name} carries no seed in its name (sample.py writes SEED.png), so it has no caption")
        if seed in found:
            raise ValueError(f"seed {seed} has two images, {images.name(found[seed])} and {name}")
        found[seed] = i
    return sorted(found.items())


class TransformedImages(torch.utils.data.Dataset):
    """Item k: OpenCLIP's transform of the image of the k-th (seed, index) pair."""

    def __init__(self, images, pairs, transform):
        self.images, self.pairs, self.transform = images, pairs, transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, k):
        chw = self.images.read(self.images.name(self.pairs[k][1]))
        hwc = chw.transpose(1, 2, 0)
        pil = PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc, "L" if hwc.shape[2] == 1 else "RGB")
        return self.transform(pil)


def fixed_batches(num_items, batch_size, rank=0, world_size=1):
    """This rank's index batches: items cut into batches of batch_size in order, dealt round-robin. Every image lands
    in the same batch whatever the number of ranks, so its embedding, and the score, do not depend on it."""
    starts = range(0, num_items, batch_size)
    return [list(range(s, min(s + batch_size, num_items))) for s in starts][rank::world_size]


@torch.no_grad()
def cosines(net, tokenizer, pixels, texts, device):
    """cos(E_img, E_txt) per pair, float64, of a batch of transformed images and their captions."""
    image = net.encode_image(pixels.to(device)).double()
    text = net.encode_text(tokenizer(list(texts)).to(device)).double()
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(dim=-1).cpu()


def rank_cosines(net, transform, tokenizer, images, pairs, captions, batch_size, device, rank=0, world_size=1,
                 num_workers=0, progress=False):
    """[(seed, cosine)] of this rank's share of `pairs` ([(seed, index)], sorted by seed)."""
    batches = fixed_batches(len(pairs), batch_size, rank, world_size)
    if not batches:
        return []
    data = TransformedImages(images, pairs, transform)
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=num_workers)
    if progress:
        import tqdm

        loader = tqdm.tqdm(loader, total=len(batches), unit="batch", leave=False)
    found = []
    for batch, pixels in zip(batches, loader):
        seeds = [pairs[k][0] for k in batch]
        found += zip(seeds, cosines(net, tokenizer, pixels, [captions[s] for s in seeds], device).tolist())
    return found


def clip_score(seed_cosines):
    """100 × the mean cosine; math.fsum rounds the sum once, so the order the ranks' parts arrive in does not matter."""
    values = [c for _, c in seed_cosines]
    return 100.0 * math.fsum(values) / len(values)

