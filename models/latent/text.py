"""Stable Diffusion's frozen text encoder (CLIP ViT-L/14, transformers' CLIPTextModel) and the MS-COCO captions.

Prompts become the encoder's last hidden state over 77 tokens padded with the end token, as CompVis'
FrozenCLIPEmbedder does. The tokenizer is read from local `vocab.json` + `merges.txt` (never from the hub
at run time).
"""

import csv
import os

import torch

from .checkpoints import take_strict, text_name


def build_text_encoder(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        max_position_embeddings=cfg["max_position_embeddings"], hidden_act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), bos_token_id=cfg.get("bos_token_id", 49406),
        eos_token_id=cfg.get("eos_token_id", 49407), pad_token_id=cfg.get("pad_token_id", 1))
    return CLIPTextModel(config)


def load_text_weights(encoder, found, source):
    """Copy `found` (keys relative to the CLIPTextModel, with or without `text_model.`) into `encoder`, strictly.

    The `position_ids` buffer is saved by some transformers versions and not by others: it may be absent on
    either side, and when both have it the encoder keeps its own 0..76 (some SD files store it as floats).
    """
    own = {text_name(k): k for k in encoder.state_dict()}
    expected = {name: tuple(encoder.state_dict()[key].shape) for name, key in own.items()}
    found = {text_name(k): v for k, v in found.items()}
    expected.setdefault("embeddings.position_ids", tuple(found.get("embeddings.position_ids", torch.zeros(0)).shape))
    taken = take_strict(expected, found, source, "text encoder", optional=("embeddings.position_ids",))
    taken.pop("embeddings.position_ids", None)
    target = encoder.state_dict()
    with torch.no_grad():
        for name, value in taken.items():
            target[own[name]].copy_(value)


class PromptEncoder:
    """Tokenizer + frozen CLIP text encoder: list of prompts -> [B, 77, width] float32 embeddings."""

    def __init__(self, encoder, tokenizer_dir, max_length):
        from transformers import CLIPTokenizer

        vocab, merges = (os.path.join(tokenizer_dir, name) for name in ("vocab.json", "merges.txt"))
        saved_whole = os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json"))  # a newer transformers' save
        for path in () if saved_whole else (vocab, merges):
            if not os.path.isfile(path):
                raise ValueError(f"tokenizer file {path} is missing (a CLIP tokenizer needs vocab.json and merges.txt)")
        # from_pretrained on a local folder reads the same files under every transformers version (the
        # constructor's keyword names changed between them); local_files_only: never the hub.
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length

    def modules(self):
        return [self.encoder]

    @torch.no_grad()
    def __call__(self, prompts):
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        device = next(self.encoder.parameters()).device
        tokens = self.tokenizer(list(prompts), truncation=True, max_length=self.max_length, padding="max_length",
                                return_tensors="pt")["input_ids"].to(device)
        return self.encoder(input_ids=tokens).last_hidden_state.float()


SEED_CAPTIONS_FILE = "captions.csv"  # sample.py's record in its output folder: the caption each seed was sampled with


def read_captions(path):
    """The 'text' column of the MS-COCO 30k caption CSV (text2image-benchmark), in file order: row i is the caption of
    seed i."""
    return _read_rows(path, "text")[1]


def captions_by_seed(path):
    """{seed: caption} of a caption CSV: keyed by its 'seed' column where it has one (sample.py's record,
    SEED_CAPTIONS_FILE), else by row (the MS-COCO file: row i for seed i)."""
    fields, texts, seeds = _read_rows(path, "text", optional="seed")
    if seeds is None:
        return dict(enumerate(texts))
    try:
        keys = [int(s) for s in seeds]
    except ValueError:
        raise ValueError(f"{path}: its 'seed' column holds something that is not a whole number") from None
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path} lists a seed twice")
    return dict(zip(keys, texts))


def record_seed_captions(path, captions):
    """Add {seed: caption} to the record at `path` (created if absent; a seed already there takes the new caption),
    written atomically, sorted by seed."""
    import dnnlib

    merged = captions_by_seed(path) if os.path.isfile(path) else {}
    merged.update(captions)
    with dnnlib.util.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "text"])
        writer.writerows(sorted(merged.items()))


def _read_rows(path, column, optional=None):
    """(fieldnames, values of `column`, values of `optional` or None if the file lacks it) of a CSV with a header."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or column not in reader.fieldnames:
                raise ValueError(f"{path} has no '{column}' column (columns: {reader.fieldnames})")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read the caption file {path}: {e}") from None
    if not rows:
        raise ValueError(f"the caption file {path} has no rows")
    extra = [row[optional] for row in rows] if optional and optional in reader.fieldnames else None
    return reader.fieldnames, [row[column] for row in rows], extra
