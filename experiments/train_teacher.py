"""Train a small EDM-style diffusion model (a teacher for SFD) on an EDM-style image dataset, in one process.

The algorithm is EDM's (NVlabs/edm training_loop.py): EDM loss (training/edm_loss.py), Adam with a linear
learning-rate warm-up, gradients through nan_to_num, and an EMA of the weights whose half-life grows with
the images seen (ema_rampup_ratio) up to ema_halflife_kimg. Every --snap minutes (and at the end) the full
state goes atomically to OUTDIR/training-state.pt and the EMA network to OUTDIR/network-snapshot-KKKKKK.pkl,
an EDM-format pickle (float32, key 'ema') that `models.load_network(model_path=...)` and EDM itself read.
"""

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from anywhere

import click  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import dnnlib  # noqa: E402
from models import EDMPrecond, load_network  # noqa: E402
from models.edm import load_state_strict  # noqa: E402
from torch_utils import cli  # noqa: E402
from torch_utils.persistence import save_edm_pickle  # noqa: E402
from training.dataset import DatasetError, load_image_dataset  # noqa: E402
from training.edm_loss import EDMLoss  # noqa: E402

STATE_FILE = "training-state.pt"
OPTIONS_FILE = "training_options.json"
# Options that must not change when a run resumes (they define the network or the data it learns).
FIXED_ON_RESUME = ("data", "cbase", "cmult", "num_blocks", "attn_res", "dropout", "xflip", "sigma_data", "seed")


def positive_ints(text, option):
    values = cli.parse_int_list(text, option)
    if min(values) < 1:
        raise click.BadParameter(f"{text!r}: give positive integers, e.g. 1,2,4", param_hint=option)
    return values


def build_network(resolution, channels, opts):
    """The EDMPrecond SongUNet (DDPM++ layout, unconditional) this script trains."""
    return EDMPrecond(img_resolution=resolution, img_channels=channels, label_dim=0, sigma_data=opts.sigma_data,
                      model_type="SongUNet", model_channels=opts.cbase, channel_mult=opts.cmult,
                      num_blocks=opts.num_blocks, attn_resolutions=opts.attn_res, dropout=opts.dropout, augment_dim=0)


def ema_beta(batch, cur_nimg, halflife_kimg, rampup_ratio):
    """EDM's EMA decay per step: half-life min(halflife_kimg, rampup_ratio * images seen) in images."""
    ema_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        ema_nimg = min(ema_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


def atomic_torch_save(obj, path):
    with dnnlib.util.atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Batches:
    """Shuffled passes over the dataset from a seeded generator whose state is saved for --resume."""

    def __init__(self, num_items, batch, seed):
        self.num_items, self.batch = num_items, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(num_items, generator=self.generator), 0

    def next(self):
        if self.pos + self.batch > self.num_items:  # drop the ragged end of a pass, as EDM's sampler does
            self.order, self.pos = torch.randperm(self.num_items, generator=self.generator), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def state_dict(self):
        return dict(generator=self.generator.get_state(), order=self.order, pos=self.pos)

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.order, self.pos = state["order"], int(state["pos"])


@click.command()
@click.option("--data", required=True, metavar="ZIP|DIR", help="EDM-style dataset (dataset_tool.py output).")
@click.option("--outdir", required=True, metavar="DIR", help="Where the state, EMA pickles and log.txt go.")
@click.option("--resume", is_flag=True, help="Continue from OUTDIR/training-state.pt (same data and network options).")
@click.option("--init", metavar="PKL", default=None,
              help="Start a new run from this network pickle's weights (net and EMA), with a fresh optimizer and "
                   "learning-rate warm-up; the network options must describe the same network.  [default: random init]")
@click.option("--init_kimg", type=click.FloatRange(min=0), default=0, show_default=True, metavar="KIMG",
              help="Images the --init network has seen: the count starts there, so the EMA half-life ramp and "
                   "the snapshot names continue its run (0 restarts them, as EDM's --transfer).")
@click.option("--cbase", type=click.IntRange(min=4), default=16, show_default=True, metavar="INT",
              help="model_channels of the SongUNet.")
@click.option("--cmult", default="1,2,4", show_default=True, metavar="LIST", help="channel_mult per resolution.")
@click.option("--num_blocks", type=click.IntRange(min=1), default=2, show_default=True, metavar="INT",
              help="Residual blocks per resolution.")
@click.option("--attn_res", default="8", show_default=True, metavar="LIST",
              help="Resolutions with self-attention ('' = none).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              metavar="FLOAT", help="Dropout probability (a few epochs on 60k images do not over-fit).")
@click.option("--xflip", is_flag=True, help="Random horizontal flips of the training images.  [default: off]")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, metavar="INT", help="Batch size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, metavar="FLOAT",
              help="Adam learning rate (betas 0.9/0.999, eps 1e-8, as EDM).")
@click.option("--lr_rampup_kimg", type=click.FloatRange(min=0), default=10, show_default=True, metavar="KIMG",
              help="Linear learning-rate warm-up length.")
@click.option("--ema_halflife_kimg", type=click.FloatRange(min=0), default=10, show_default=True, metavar="KIMG",
              help="EMA half-life (EDM: 500 for 200 Mimg runs; a short run needs a short one).")
@click.option("--ema_rampup_ratio", type=click.FloatRange(min=0), default=0.05, show_default=True, metavar="FLOAT",
              help="EMA half-life is at most this fraction of the images seen so far (EDM's ramp-up).")
@click.option("--sigma_data", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              metavar="FLOAT", help="sigma_d of the preconditioning and of the loss weight.")
@click.option("--total_kimg", type=click.FloatRange(min=0, min_open=True), default=200, show_default=True,
              metavar="KIMG", help="Training length in thousands of images.")
@click.option("--max_minutes", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MIN",
              help="Also stop (with a checkpoint) after this much wall-clock time in this process.  [default: none]")
@click.option("--tick_kimg", type=click.FloatRange(min=0, min_open=True), default=2, show_default=True,
              metavar="KIMG", help="Progress line interval.")
@click.option("--snap", "snap_minutes", type=click.FloatRange(min=0, min_open=True), default=5, show_default=True,
              metavar="MIN", help="Checkpoint interval in wall-clock minutes.")
@click.option("--seed", type=int, default=0, show_default=True, metavar="INT", help="Seed of weights, batches, noise.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="INT",
              help="torch CPU threads.  [default: torch's choice, i.e. OMP_NUM_THREADS]")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True, metavar="STR",
              help="Device to train on.")
def main(**kwargs):
    """Train an unconditional EDM-style diffusion model (SongUNet + EDMPrecond) on a small dataset.

    \b
    # The built-in Fashion-MNIST teacher (assets/fmnist-teacher.pkl, see assets/README.md), on one CPU core
    python dataset_tool.py fmnist --dest=datasets/fmnist-32x32.zip
    OMP_NUM_THREADS=1 python experiments/train_teacher.py --data=datasets/fmnist-32x32.zip --outdir=teacher-runs/fmnist \\
        --total_kimg=240 --max_minutes=75
    cp "$(ls teacher-runs/fmnist/network-snapshot-*.pkl | tail -1)" assets/fmnist-teacher.pkl

    \b
    # Continue after the run was killed, or train longer (same data and network options)
    OMP_NUM_THREADS=1 python experiments/train_teacher.py --data=datasets/fmnist-32x32.zip --outdir=teacher-runs/fmnist \\
        --total_kimg=400 --resume

    \b
    # Train an existing teacher further when its run's state is gone: weights from the pickle, fresh Adam
    OMP_NUM_THREADS=2 python experiments/train_teacher.py --data=datasets/fmnist-32x32.zip --outdir=teacher-runs/more \\
        --init=assets/fmnist-teacher.pkl --init_kimg=217.536 --total_kimg=700 --ema_halflife_kimg=30
    """
    opts = dnnlib.EasyDict(kwargs)
    if opts.init is None and opts.init_kimg:
        raise click.BadParameter("is only meaningful with --init PKL", param_hint="--init_kimg")
    if opts.init is not None and not os.path.isfile(opts.init):
        raise click.BadParameter(f"{opts.init!r} is not a file; give a network pickle (e.g. assets/fmnist-teacher.pkl)",
                                 param_hint="--init")
    opts.cmult = positive_ints(opts.cmult, "--cmult")
    opts.attn_res = positive_ints(opts.attn_res, "--attn_res") if opts.attn_res.strip() else []
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)

    os.makedirs(opts.outdir, exist_ok=True)
    state_path = os.path.join(opts.outdir, STATE_FILE)
    options_path = os.path.join(opts.outdir, OPTIONS_FILE)
    saved_options = {k: v for k, v in opts.items() if k not in ("resume", "threads", "device")}
    if opts.resume:
        if not os.path.isfile(state_path):
            raise click.BadParameter(f"nothing to resume: {state_path} does not exist", param_hint="--resume")
        with open(options_path) as f:
            before = json.load(f)
        changed = [k for k in FIXED_ON_RESUME if before.get(k) != saved_options[k]]
        if changed:
            raise click.BadParameter(f"--{changed[0]} was {before.get(changed[0])!r} in the run being resumed, "
                                     f"now {saved_options[changed[0]]!r}; give the same value", param_hint="--resume")
    elif os.path.exists(state_path):
        raise click.BadParameter(f"{opts.outdir} already holds a run; add --resume or choose another folder",
                                 param_hint="--outdir")
    dnnlib.util.tee_stdout(os.path.join(opts.outdir, "log.txt"))

    print(f"Loading {opts.data}...", flush=True)
    try:
        dataset = load_image_dataset(opts.data)
    except DatasetError as e:
        raise click.BadParameter(str(e), param_hint="--data") from None
    if len(dataset) < opts.batch:
        raise click.BadParameter(f"{opts.data} holds {len(dataset)} images, fewer than --batch={opts.batch}",
                                 param_hint="--batch")
    res = dataset.resolution
    if res % 2 ** (len(opts.cmult) - 1):
        raise click.BadParameter(f"{res}x{res} images cannot be halved {len(opts.cmult) - 1} times", param_hint="--cmult")

    torch.manual_seed(opts.seed)
    net = build_network(res, dataset.channels, opts).to(device).train()
    ema = build_network(res, dataset.channels, opts).to(device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=opts.lr, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = EDMLoss(sigma_data=opts.sigma_data)
    batches = Batches(len(dataset), opts.batch, opts.seed)
    cur_nimg = start_nimg = 0
    if opts.resume:
        state = torch.load(state_path, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        cur_nimg = int(state["cur_nimg"])
        start_nimg = int(before.get("init_kimg", 0) * 1000)
        print(f"Resumed from {state_path} at {cur_nimg / 1000:.1f} kimg", flush=True)
    else:
        if opts.init is not None:
            try:
                load_state_strict(net, load_network(model_path=opts.init).net.state_dict(), opts.init)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--init") from None
            ema.load_state_dict(net.state_dict())
            cur_nimg = start_nimg = int(opts.init_kimg * 1000)
            print(f"Initialised from {opts.init} at {cur_nimg / 1000:.1f} kimg (fresh optimizer)", flush=True)
        with open(options_path, "w") as f:
            json.dump(saved_options, f, indent=2)
    num_params = sum(p.numel() for p in net.parameters())
    print(f"{len(dataset)} images {dataset.channels}x{res}x{res}; SongUNet cbase={opts.cbase} cmult={opts.cmult} "
          f"num_blocks={opts.num_blocks} attn={opts.attn_res}: {num_params / 1e6:.2f}M parameters; device {device}, "
          f"{torch.get_num_threads()} threads", flush=True)

    def checkpoint():
        atomic_torch_save(dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                               batches=batches.state_dict(), torch_rng=torch.get_rng_state(), cur_nimg=cur_nimg),
                          state_path)
        pkl = os.path.join(opts.outdir, f"network-snapshot-{cur_nimg // 1000:06d}.pkl")
        save_edm_pickle(pkl, {"ema": ema})
        print(f"Saved {pkl} and {state_path}", flush=True)

    total_nimg = int(opts.total_kimg * 1000)
    start = last_snap = time.time()
    tick_start_nimg, tick_start_time, tick_losses = cur_nimg, start, []
    while cur_nimg < total_nimg:
        idx = batches.next()
        images = dataset.images[idx].to(device).to(torch.float32) / 127.5 - 1
        if opts.xflip:
            flip = torch.rand([images.shape[0], 1, 1, 1], device=device) < 0.5
            images = torch.where(flip, images.flip(3), images)

        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net, images)
        loss.sum().div(images.shape[0]).backward()
        for g in optimizer.param_groups:  # linear warm-up (EDM), counted from the start of the run
            g["lr"] = opts.lr * min((cur_nimg - start_nimg) / max(opts.lr_rampup_kimg * 1000, 1e-8), 1)
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()
        cur_nimg += images.shape[0]

        beta = ema_beta(images.shape[0], cur_nimg, opts.ema_halflife_kimg, opts.ema_rampup_ratio)
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        tick_losses.append(loss.mean().item())

        now = time.time()
        done = cur_nimg >= total_nimg or (opts.max_minutes is not None and now - start >= opts.max_minutes * 60)
        if done or cur_nimg >= tick_start_nimg + opts.tick_kimg * 1000:
            sec_per_kimg = (now - tick_start_time) / max((cur_nimg - tick_start_nimg) / 1000, 1e-8)
            print(f"kimg {cur_nimg / 1000:8.1f}  loss {np.mean(tick_losses):.4f}  sec/kimg {sec_per_kimg:6.1f}  "
                  f"elapsed {cli.format_time(now - start)}  lr {optimizer.param_groups[0]['lr']:.2e}", flush=True)
            tick_start_nimg, tick_start_time, tick_losses = cur_nimg, now, []
        if done or now - last_snap >= opts.snap_minutes * 60:
            checkpoint()
            last_snap = now
        if done:
            break
    print(f"Done at {cur_nimg / 1000:.1f} kimg after {cli.format_time(time.time() - start)} in this process.", flush=True)


if __name__ == "__main__":
    main()
