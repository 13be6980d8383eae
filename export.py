"""Export an SFD student distilled from a diffusers pipeline as a diffusers pipeline folder (issue 53, design §6).

python export.py --model_path=exps/00000-.../network-snapshot-000200.safetensors --outdir=student-pipeline

The folder holds the fine-tuned U-Net (diffusers' key layout, save_pretrained), an EulerDiscreteScheduler config
that reproduces the student's time points, and the pipeline's frozen parts: text-to-image students become a
StableDiffusionPipeline, pixel students a ConsistencyModelPipeline (the stock pixel pipeline that scales the model
input and the initial noise as Euler needs). Only configs and weights are written, never code. Then

    pipe = DiffusionPipeline.from_pretrained(DIR)
    pipe(num_inference_steps=N - 1, ...)      # N = the student's num_steps; also in DIR/sfd_export.json

samples the student with stock classes: Karras sigmas (rho 7) are our polynomial schedule (exponential sigmas our
logsnr one) from sigma_max to t_{N-2}, and final_sigmas_type='sigma_min' is the last point t_{N-1} = sigma(t=0).
AFS (the analytical first step) has no stock scheduler form: an AFS student is exported with AFS off (its first step
calls the network: one NFE more), and the command says so.
"""

import json
import math
import os

import click

import dnnlib
from torch_utils import cli
from torch_utils.cli import CommandError

SFD_EXPORT_FILE = "sfd_export.json"


def karras_config(settings, num_steps):
    """EulerDiscreteScheduler keywords reproducing the student's num_steps time points with num_steps - 1 calls."""
    kind, rho = settings["schedule_type"], float(settings["schedule_rho"])
    hi, lo = float(settings["sigma_max"]), float(settings["sigma_min"])
    frac = (num_steps - 2) / (num_steps - 1)
    if kind == "polynomial" and rho == 7:
        last = (hi ** (1 / rho) + frac * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        return dict(use_karras_sigmas=True, sigma_min=last, sigma_max=hi)
    if kind == "logsnr":
        return dict(use_exponential_sigmas=True, sigma_min=math.exp(math.log(hi) + frac * (math.log(lo) - math.log(hi))),
                    sigma_max=hi)
    raise ValueError(f"schedule_type={kind} (rho {rho:g}) has no stock diffusers form; export students distilled with "
                     "--schedule_type=polynomial --schedule_rho=7 (Karras sigmas) or --schedule_type=logsnr")


def check_student(loaded):
    from models.diffusers_pipeline import DATASET_NAME
    from models.snapshot import is_sfdv

    st = loaded.settings
    if loaded.source != "snapshot" or st.get("dataset_name") != DATASET_NAME:
        raise ValueError(f"{loaded.path} is not an SFD snapshot distilled from a diffusers pipeline (dataset_name "
                         f"{st.get('dataset_name')!r}); export takes those only")
    if "num_steps" not in st:
        raise ValueError(f"{loaded.path} is not a distilled student (no num_steps in its settings)")
    if is_sfdv(st) or st.get("use_step_condition"):
        raise ValueError(f"{loaded.path} is step-conditioned (SFD-v); export takes SFD students only")
    if abs(float(st["sigma_min"]) / loaded.net.sigma_min - 1) > 1e-6:
        raise ValueError(f"{loaded.path}: sigma_min {st['sigma_min']:g} is not the scheduler's sigma(t=0) "
                         f"{loaded.net.sigma_min:g}, which is the only last point a stock scheduler ends on")


def export(model_path, outdir):
    """Write the pipeline folder; returns the sfd_export.json record."""
    import diffusers
    import torch

    from models import load_network

    loaded = load_network(model_path=model_path)
    check_student(loaded)
    net, st = loaded.net, loaded.settings
    num_steps = int(st["num_steps"])
    sigmas = karras_config(st, num_steps)
    schedule = dict(net.init_kwargs["schedule"])
    scheduler = diffusers.EulerDiscreteScheduler(**schedule, prediction_type=net.prediction_type,
                                                 timestep_spacing="linspace", final_sigmas_type="sigma_min", **sigmas)
    unet = net.unet
    frozen = os.path.join(net.pipeline)
    if net.guidance_type == "cfg":
        from transformers import CLIPTextModel, CLIPTokenizer

        pipe = diffusers.StableDiffusionPipeline(
            vae=diffusers.AutoencoderKL.from_pretrained(os.path.join(frozen, "vae")),
            text_encoder=CLIPTextModel.from_pretrained(os.path.join(frozen, "text_encoder"), local_files_only=True),
            tokenizer=CLIPTokenizer.from_pretrained(os.path.join(frozen, "tokenizer"), local_files_only=True),
            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    with torch.no_grad():
        pipe.save_pretrained(outdir, safe_serialization=True)
    record = dict(num_inference_steps=num_steps - 1, student_num_steps=num_steps, afs_in_student=bool(st["afs"]),
                  afs_in_export=False, guidance_scale=st.get("guidance_rate") if net.guidance_type == "cfg" else None,
                  schedule_type=st["schedule_type"], schedule_rho=st["schedule_rho"], sigma_min=st["sigma_min"],
                  sigma_max=st["sigma_max"], snapshot=os.path.abspath(model_path), pipeline=net.pipeline)
    dnnlib.util.write_atomic(os.path.join(outdir, SFD_EXPORT_FILE), json.dumps(record, indent=2))
    return record


@click.command()
@click.option("--model_path", help="An SFD snapshot distilled from a diffusers pipeline", metavar="PATH", type=str,
              required=True)
@click.option("--outdir", help="The diffusers pipeline folder to write", metavar="DIR", type=str, required=True)
def main(model_path, outdir):
    """Write an SFD student as a diffusers pipeline folder (stock classes, no code)."""
    cli.check_input_file(model_path, "--model_path")
    cli.check_output_dir(outdir, "--outdir")
    if os.path.isdir(outdir) and os.listdir(outdir):
        raise click.BadParameter(f"{outdir} is not empty; give a new folder", param_hint="--outdir")
    try:
        record = export(model_path, outdir)
    except ValueError as e:
        raise CommandError(e) from None
    note = ""
    if record["afs_in_student"]:
        note = (" | AFS has no stock scheduler form: the export calls the network at the first step too "
                f"(NFE {record['num_inference_steps']} instead of {record['num_inference_steps'] - 1})")
    guidance = f", guidance_scale={record['guidance_scale']:g}" if record["guidance_scale"] is not None else ""
    print(f"Wrote {outdir}: DiffusionPipeline.from_pretrained({outdir!r})(num_inference_steps="
          f"{record['num_inference_steps']}{guidance}){note}")


if __name__ == "__main__":
    cli.run(main)
