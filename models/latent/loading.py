"""Finding, reading and strictly loading the LDM / Stable Diffusion checkpoints (loader family 'latent').

    load_network('ffhq_ldm')                     ./src/ffhq_ldm/model.ckpt (from ffhq.zip), VQ-f4 first stage
    load_network('ms_coco')                      ./src/ms_coco/v1-5-pruned-emaonly.ckpt (or .safetensors)
    load_network('ms_coco', model_path=DIR)      a diffusers-format SD folder (unet/ vae/ text_encoder/ tokenizer/)
    load_network('ffhq_ldm', model_path=FILE)    any CompVis checkpoint of that configuration

Files live in `{cache_root}/{dataset_name}/`; a present file is never fetched again; offline, the error names
the file, its URL and that folder. Extra files: the VQ-f4 checkpoint (only when model.ckpt lacks the first
stage), the CLIP tokenizer (vocab.json, merges.txt) for single-file SD, and the MS-COCO caption CSV (a local copy is
given explicitly: `net.use_caption_file(path)`, from a command's --captions).
"""

import copy
import os
import tempfile
import zipfile

import torch

import dnnlib

from ..snapshot import NETWORK_CLASSES
from .checkpoints import (EMA_PREFIX, FIRST_STAGE_PREFIX, IGNORABLE, SCHEDULE_BUFFERS, TEXT_PREFIX, UNET_PREFIX,
                          alphas_cumprod_of, ema_name, read_diffusers_weights, read_json, read_state_dict, shapes,
                          sniff, take_strict, unet_compvis_name, with_prefix)
from .first_stage import build_first_stage, compvis_name, is_attention_matrix, modern_diffusers_name
from .text import PromptEncoder, build_text_encoder, load_text_weights
from ..edm import is_step_layer_key

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(spec):
    """A backbone configuration: a dict, a YAML path, or the name of a file in models/configs/."""
    if isinstance(spec, dict):
        config = copy.deepcopy(spec)
    else:
        from omegaconf import OmegaConf

        path = spec if os.path.isfile(str(spec)) else os.path.join(CONFIG_DIR, f"{spec}.yaml")
        if not os.path.isfile(path):
            raise ValueError(f"no backbone configuration {spec!r} (looked for {path})")
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for section in ("schedule", "latent", "unet", "first_stage"):
        if section not in config:
            name = "<dict>" if isinstance(spec, dict) else spec
            raise ValueError(f"backbone configuration {name} lacks its '{section}' section")
    return config


# ----------------------------------------------------------------------------
# The loader family.


def build_latent(row, model_path, use_step_condition, cache_root):
    """(net, settings) for a table row of family 'latent'; `model_path` replaces the cached checkpoint."""
    config = load_config(row.network_kwargs["config"])
    base = dict(cache_root=os.path.abspath(cache_root), checkpoint=None)
    if model_path is not None:
        if not os.path.exists(model_path):
            raise ValueError(f"model_path {model_path!r} does not exist")
        base["checkpoint"] = os.path.abspath(model_path)
    else:
        base["checkpoint"] = _checkpoint_file(row, cache_root)
    parts = read_parts(config, base, row, want=("unet", "first_stage", "text"))
    base.update(parts["base"])  # recorded in the network's init_kwargs: snapshots find the frozen parts again
    with torch.random.fork_rng(devices=[]):  # fresh SFD-v layers must not shift the caller's RNG stream
        net = NETWORK_CLASSES[row.network_class](
            config=config, dataset_name=row.dataset_name, sigma_min=row.sigma_min, sigma_max=row.sigma_max,
            use_step_condition=use_step_condition, guidance_rate=row.network_kwargs.get("guidance_rate", 1.0), base=base)
    _copy_in(net.model.diffusion_model, parts["unet"], parts["unet_source"])
    if "unet_live" in parts:
        # Handed to the loader's LoadedNetwork.student_unet (not kept on the module: copies would carry it).
        net.__dict__["student_unet"] = (parts["unet_live"], parts["unet_source"])
    net.attach_frozen(first_stage=parts["first_stage"], prompts=parts.get("text"))
    settings = dict(dataset_name=row.dataset_name, model_source="ldm", model_path=base["checkpoint"],
                    sigma_min=net.sigma_min, sigma_max=net.sigma_max, use_step_condition=bool(use_step_condition),
                    guidance_type=net.guidance_type)
    return net, settings


def load_first_stage(config, base, dataset_name):
    """The frozen first stage of a rebuilt network (snapshot), re-read from its base checkpoint."""
    return read_parts(config, _base_again(base, dataset_name), _row(dataset_name), want=("first_stage",))["first_stage"]


def load_prompt_encoder(config, base, dataset_name):
    return read_parts(config, _base_again(base, dataset_name), _row(dataset_name), want=("text",))["text"]


def caption_file(base, dataset_name, path=None):
    """The caption CSV of a text-to-image backbone: `path` when given (a command's --captions, handed over by
    use_caption_file), else the table row's download, cached in {cache_root}/{dataset_name}/ (offline, the error names
    the file, its URL and that folder). The one place that knows where the caption file comes from; its format is
    models/latent/text.py's."""
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"the caption file {path} is not a file")
        return path
    if base.get("captions") and os.path.isfile(base["captions"]):
        return base["captions"]
    row = _row(dataset_name)
    folder = os.path.join(base.get("cache_root") or "./src", dataset_name)
    return _download(row.extra_urls["captions"], folder, what=f"the {dataset_name} caption file")


# ----------------------------------------------------------------------------
# Reading the parts of a checkpoint.


def read_parts(config, base, row, want):
    """{'unet': name -> tensor (CompVis names), 'first_stage': module, 'text': PromptEncoder, 'base': paths}."""
    path = base["checkpoint"]
    layout = sniff(path)
    if layout is None:
        raise ValueError(f"{path} is not a latent-diffusion checkpoint (.ckpt/.safetensors file or diffusers folder)")
    if layout == "diffusers":
        return _read_diffusers(config, path, want)
    return _read_compvis(config, base, row, read_state_dict(path), path, want)


def _read_compvis(config, base, row, state, source, want):
    text_cfg = config.get("text_encoder")
    known = {k for k in state if k.startswith((UNET_PREFIX, FIRST_STAGE_PREFIX, EMA_PREFIX))}
    known |= set(SCHEDULE_BUFFERS) | set(IGNORABLE)
    if text_cfg:
        known |= {k for k in state if k.startswith(TEXT_PREFIX)}
    others = sorted(set(state) - known)
    if others:
        raise ValueError(f"{source}: unexpected entries for this configuration: {', '.join(others[:6])}"
                         + (f", ... ({len(others)} in all)" if len(others) > 6 else ""))
    _check_schedule(state, config, source)
    parts = {"base": {}}
    if "unet" in want:
        parts["unet"], parts["unet_source"] = _unet_tensors(state, config, source), source
        live = with_prefix(state, UNET_PREFIX)
        if any(parts["unet"][k] is not v for k, v in live.items() if k in parts["unet"]):
            parts["unet_live"] = live  # the file has both: the EMA for the teacher, the live weights for the student
    if "first_stage" in want:
        found = with_prefix(state, FIRST_STAGE_PREFIX)
        fs_source = source
        if not found:  # LDM zips may leave the autoencoder to its own file (vq-f4)
            fs_path = base.get("first_stage_checkpoint")
            if not (fs_path and os.path.isfile(fs_path)):
                fs_path = _from_zip(row.extra_urls["vq-f4"], os.path.join(base["cache_root"], row.dataset_name, "vq-f4"),
                                    f"{row.dataset_name}'s first stage (vq-f4)")
            parts["base"]["first_stage_checkpoint"] = fs_path
            found = {k: v for k, v in read_state_dict(fs_path).items() if not k.startswith("loss.")}
            fs_source = fs_path
        parts["first_stage"] = _first_stage_module(config, found, fs_source, compvis=True)
    if "text" in want and text_cfg:
        encoder = build_text_encoder(text_cfg)
        load_text_weights(encoder, with_prefix(state, TEXT_PREFIX), source)
        tokenizer = base.get("tokenizer")
        if not (tokenizer and os.path.isdir(tokenizer)):
            tokenizer = _tokenizer_dir(row, base["cache_root"])
        parts["base"]["tokenizer"] = tokenizer
        parts["text"] = PromptEncoder(encoder, tokenizer, text_cfg["max_position_embeddings"])
    return parts


def _read_diffusers(config, folder, want):
    text_cfg = config.get("text_encoder")
    if not text_cfg:
        raise ValueError(f"{folder} is a diffusers folder, but only the text-to-image backbone loads from one")
    _check_scheduler_config(os.path.join(folder, "scheduler", "scheduler_config.json"), config)
    parts = {"base": {}}
    if "unet" in want:
        found, source = read_diffusers_weights(os.path.join(folder, "unet"))
        parts["unet_source"] = source
        try:
            parts["unet"] = {unet_compvis_name(k, config["unet"]): v for k, v in found.items()}
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    if "first_stage" in want:
        found, source = read_diffusers_weights(os.path.join(folder, "vae"))
        found = {modern_diffusers_name(k): v for k, v in found.items()}
        parts["first_stage"] = _first_stage_module(config, found, source, compvis=False)
    if "text" in want:
        found, source = read_diffusers_weights(os.path.join(folder, "text_encoder"))
        encoder = build_text_encoder(text_cfg)
        load_text_weights(encoder, found, source)
        parts["base"]["tokenizer"] = os.path.join(folder, "tokenizer")
        parts["text"] = PromptEncoder(encoder, parts["base"]["tokenizer"], text_cfg["max_position_embeddings"])
    return parts


def _unet_tensors(state, config, source):
    """The U-Net's tensors under CompVis names (relative to model.diffusion_model.), taken from the EMA
    shadows when the config keeps an EMA and the file has one (the weights LDM samples with)."""
    found = with_prefix(state, UNET_PREFIX)
    ema_keys = {k for k in state if k.startswith(EMA_PREFIX)} - {"model_ema.decay", "model_ema.num_updates"}
    if not config.get("use_ema") or not ema_keys:
        return found
    names = {ema_name(k): k for k in found}
    stray = sorted(ema_keys - set(names))
    absent = sorted(n for n, k in names.items() if n not in ema_keys and not is_step_layer_key(k))
    if stray or absent:
        raise ValueError(f"{source}: the EMA weights do not match the U-Net ("
                         + "; ".join(f"{label}: {', '.join(keys[:4])} ({len(keys)} in all)"
                                     for label, keys in (("missing", absent), ("unexpected", stray)) if keys) + ")")
    return {k: state.get(n, found[k]) for n, k in names.items()}


def copy_unet_weights(unet, found, source):
    """Load CompVis-named U-Net tensors into `unet` strictly (the student's live weights, see LoadedNetwork)."""
    _copy_in(unet, found, source)


def _copy_in(unet, found, source):
    """Strict copy of CompVis-named U-Net tensors; SFD-v layers may be absent (fresh) or extra (ignored)."""
    own = shapes(unet)
    file_has_steps = any(is_step_layer_key(k) for k in found)
    if not any(is_step_layer_key(k) for k in own):
        found = {k: v for k, v in found.items() if not is_step_layer_key(k)}  # the paper's files always carry them
    optional = () if file_has_steps else [k for k in own if is_step_layer_key(k)]
    taken = take_strict(own, found, source, "U-Net", optional=optional)
    target = unet.state_dict()
    with torch.no_grad():
        for key, value in taken.items():
            target[key].copy_(value)


def _first_stage_module(config, found, source, compvis):
    module = build_first_stage(config["first_stage"])
    levels = len(config["first_stage"]["ch_mult"])
    own = module.state_dict()
    names = {(compvis_name(k, levels) if compvis else k): k for k in own}
    expected = {name: tuple(own[key].shape) for name, key in names.items()}
    taken = take_strict(expected, found, source, "first stage", reshape_ok=is_attention_matrix)
    with torch.no_grad():
        for name, value in taken.items():
            own[names[name]].copy_(value)
    return module.eval().requires_grad_(False)


def _check_schedule(state, config, source):
    T = config["schedule"]["timesteps"]
    bad = [k for k in SCHEDULE_BUFFERS if k not in state or tuple(state[k].shape) != (T,)]
    if bad:
        raise ValueError(f"{source}: missing or mis-shaped DDPM schedule buffers ({', '.join(bad[:4])}; expected [{T}])")
    ours = alphas_cumprod_of(config["schedule"])
    if not torch.allclose(state["alphas_cumprod"].float(), ours, rtol=1e-5, atol=1e-7):
        sched = config["schedule"]
        raise ValueError(f"{source}: its alphas_cumprod differs from the configuration's schedule "
                         f"(linear_start {sched['linear_start']}, linear_end {sched['linear_end']})")


def _check_scheduler_config(path, config):
    sched = config["schedule"]
    found = read_json(path)
    wanted = dict(beta_start=sched["linear_start"], beta_end=sched["linear_end"], num_train_timesteps=sched["timesteps"])
    wrong = [f"{k}={found.get(k)!r} (want {v!r})" for k, v in wanted.items()
             if not isinstance(found.get(k), (int, float)) or abs(found[k] - v) > 1e-9]
    if found.get("beta_schedule") != "scaled_linear":
        wrong.append(f"beta_schedule={found.get('beta_schedule')!r} (want 'scaled_linear')")
    if wrong:
        raise ValueError(f"{path}: a different noise schedule: {', '.join(wrong)}")


# ----------------------------------------------------------------------------
# Files in the cache.


def _row(dataset_name):
    from ..registry import get_backbone

    return get_backbone(dataset_name)


def _base_again(base, dataset_name):
    """A snapshot's base files; when the recorded checkpoint has moved, the table row finds it again."""
    if base.get("checkpoint") and os.path.exists(base["checkpoint"]):
        return base
    cache_root = base.get("cache_root") if base.get("cache_root") and os.path.isdir(base["cache_root"]) else "./src"
    return dict(base, cache_root=os.path.abspath(cache_root), checkpoint=_checkpoint_file(_row(dataset_name), cache_root))


def _checkpoint_file(row, cache_root):
    folder = os.path.abspath(os.path.join(cache_root, row.dataset_name))
    if row.file_name == "model.ckpt":  # the LDM zips
        return _from_zip(row.url, folder, f"{row.dataset_name}")
    stem = os.path.splitext(row.file_name)[0]
    for name in (row.file_name, stem + ".safetensors"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    urls = [row.url] + ([row.extra_urls["mirror"]] if "mirror" in row.extra_urls else [])
    for url in urls:
        try:
            return dnnlib.download_file(url, folder, file_name=row.file_name)
        except dnnlib.DownloadError as e:
            reason = str(e).rpartition(" (")[2].rstrip(")") or "failed"
    raise dnnlib.DownloadError(f"{row.dataset_name}: cannot get '{row.file_name}' from {' or '.join(urls)}: download "
                               f"it (or its .safetensors) yourself and put it in {folder}/ ({reason})")


def _tokenizer_dir(row, cache_root):
    folder = os.path.abspath(os.path.join(cache_root, row.dataset_name, "tokenizer"))
    for key in ("tokenizer_vocab", "tokenizer_merges"):
        _download(row.extra_urls[key], folder, what=f"the {row.dataset_name} CLIP tokenizer")
    return folder


def _download(url, folder, what, file_name=None):
    try:
        return dnnlib.download_file(url, folder, file_name=file_name)
    except dnnlib.DownloadError as e:
        raise dnnlib.DownloadError(f"{what}: {e}") from None


def _from_zip(url, folder, what, member="model.ckpt"):
    """`folder/member`, unzipped from the archive at `url` when absent (the archive is deleted afterwards)."""
    target = os.path.join(folder, member)
    if os.path.isfile(target):
        return target
    archive = os.path.basename(url)
    try:
        zip_path = dnnlib.download_file(url, folder, file_name=archive)
    except dnnlib.DownloadError as e:
        raise dnnlib.DownloadError(f"{what} needs {member} in {folder}/ (inside {archive}): {e}") from None
    try:
        with zipfile.ZipFile(zip_path) as z:
            names = [n for n in z.namelist() if os.path.basename(n) == member]
            if not names:
                raise ValueError(f"{zip_path} holds no {member}")
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{member}.", suffix=".part")
            with os.fdopen(fd, "wb") as out, z.open(names[0]) as src:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
        os.replace(tmp, target)
    except zipfile.BadZipFile:
        raise ValueError(f"{zip_path} is not a valid zip archive; delete it to download it again") from None
    os.remove(zip_path)
    return target
