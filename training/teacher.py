"""The teacher of a distillation (design §5): what to load, its sampling settings, its guidance, and the split of
the loaded network into the student and a frozen teacher.

First stage: the pre-trained network under the chosen solver. Second stage: a first-stage snapshot under Euler
with its own stored settings (an SFD-v teacher conditioned on its own num_steps).
"""

import copy

import solvers
from training import sfd_loss


def network_request(cfg):
    """The `models.load_network` keywords (besides device) for a DistillConfig."""
    if cfg.is_second_stage:  # the snapshot brings its own step layers, if it has any
        return dict(dataset_name=cfg.dataset_name, model_path=cfg.model_path, cache_root=cfg.cache_root)
    return dict(dataset_name=cfg.dataset_name, model_path=cfg.model_path, use_step_condition=cfg.use_step_condition,
                cache_root=cfg.cache_root)


def solver_options(sampler_tea, max_order, predict_x0, lower_order_final, thresholding):
    """The options that the teacher solver takes, from those given (None: the solver's own default)."""
    given = dict(max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                 thresholding=thresholding)
    return {k: v for k, v in given.items() if k in solvers.TABLE[sampler_tea].options and v is not None}


def check_guidance(own, guidance_type, name):
    """The guidance a backbone trains with. `own` is its own ('uncond' for LDM, 'cfg' for SD, None for a backbone
    without guidance); --guidance_type must match it (or be left out where it is 'uncond' or None)."""
    if own is None:
        if guidance_type is not None:
            raise ValueError(f"{name or 'this network'} has no guidance; drop --guidance_type (it applies to the LDM "
                             f"and Stable Diffusion backbones)")
        return None
    if guidance_type == own or (own == "uncond" and guidance_type is None):
        return own
    hint = " --guidance_rate=W (e.g. 7.5; sampling uses it)" if own == "cfg" else ""
    raise ValueError(f"{name or 'this backbone'} needs --guidance_type={own}{hint}, got {guidance_type!r}")


def teacher_setup(loaded, cfg):
    """(TeacherConfig, use_step_condition, guidance_type) of the loaded network for a DistillConfig."""
    if cfg.is_second_stage:
        first = loaded.settings
        if loaded.source not in ("snapshot", "paper_snapshot") or "num_steps" not in first:
            raise ValueError(f"--model_path {cfg.model_path}: the second stage needs a first-stage SFD/SFD-v snapshot")
        use_step_condition = bool(first.get("use_step_condition", False))
        teacher_cfg = sfd_loss.TeacherConfig(
            solver="euler", schedule_type=first["schedule_type"], schedule_rho=first["schedule_rho"],
            sigma_min=first["sigma_min"], sigma_max=first["sigma_max"], afs=bool(first["afs"]),
            conditioned=use_step_condition, solver_options={})
    else:
        use_step_condition = cfg.use_step_condition
        teacher_cfg = sfd_loss.TeacherConfig(
            solver=cfg.sampler_tea, schedule_type=cfg.schedule_type, schedule_rho=cfg.schedule_rho,
            sigma_min=loaded.settings["sigma_min"], sigma_max=loaded.settings["sigma_max"], afs=False,
            solver_options=solver_options(cfg.sampler_tea, cfg.max_order, cfg.predict_x0, cfg.lower_order_final,
                                          cfg.thresholding))
    guidance_type = check_guidance(getattr(loaded.net, "guidance_type", None), cfg.guidance_type,
                                   loaded.dataset_name)
    return teacher_cfg, use_step_condition, guidance_type


def split_teacher(loaded, freeze_step_layers):
    """(student, frozen teacher) from the loaded network. The teacher runs on the loaded weights (a latent model's
    EMA weights); the student starts from the live weights where the checkpoint has them, as the paper does."""
    net = loaded.net
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    if loaded.student_unet is not None:
        from models.latent.loading import copy_unet_weights

        copy_unet_weights(net.model.diffusion_model, *loaded.student_unet)
        loaded.student_unet = None
    if freeze_step_layers:
        teacher.ignore_step_condition()  # fresh step layers must not disturb the pre-trained teacher
    net.train().requires_grad_(True)
    for module in (net, teacher):
        if hasattr(module, "guidance_rate"):
            module.guidance_rate = 1.0  # SD trains on the conditional prediction only; sampling uses guidance_rate
    return net, teacher
