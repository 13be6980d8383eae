"""Our real training iteration (`training.training_loop.sfd_iteration`) against SFD and SFD-v iterations of the paper's
training loop, recorded on EDM pickle (a) (tests/data/reference/sfd-iteration.*).

We build the same student (pickle (a); for SFD-v plus the stored initial step layers), feed the stored latents and
record what reaches the loss and the optimizer. Tolerances (tests/data/reference/README.md §4):
- teacher trajectory / targets, student inputs and outputs: rel 1e-4 of max|expected|;
- L1 maps: 1e-4 of max|student output| (|s - t| near 0 magnifies float32 rounding); loss scalars: rel 1e-4;
- gradient norms and gradients: rel 1e-3;
- parameters after Adam (its first steps move each element by ~lr·sign(g), so elements with g ~ 0 may flip):
  ||dp_got - dp_ref|| / ||dp_ref|| < 1e-2 for the change dp from the initial values.
"""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

import solvers
from models import load_network
from models.edm import is_step_layer_key
from training import sfd_loss
from training.training_loop import make_optimizer, sfd_iteration, solver_options

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reference")
RECORD = json.load(open(os.path.join(REF, "sfd-iteration.json")))
ARRAYS = np.load(os.path.join(REF, "sfd-iteration.npz"))
RUNS = ["sfd", "sfdv"]


def array(name):
    return ARRAYS[name]


def assert_close_rel(got, expected, tol, what, scale=None):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    err = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max()) if scale is None else scale
    assert err <= tol * scale, f"{what}: max|got - expected| = {err:.3e} > {tol:g} * {scale:.3e}"


def run_recorded(run):
    """Our student, teacher and optimizer set up as the loop sets them up, stepped by sfd_iteration over the stored
    iterations; returns what reached the teacher solver, the student network, the L1 loss and Adam.step."""
    info = RECORD["runs"][run]
    st, lk = info["settings"], info["settings"]["loss_kwargs"]
    sfdv = lk["use_step_condition"]
    net = load_network(model_path=os.path.join(REF, info["teacher_pickle"]), use_step_condition=sfdv).net
    if sfdv:  # the paper's fresh step layers, exactly as its run started
        init = {k: torch.from_numpy(array(v)) for k, v in info["initial_step_params"].items()}
        missing, unexpected = net.load_state_dict(init, strict=False)
        assert not unexpected and not any(is_step_layer_key(k) for k in missing)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    if sfdv:
        teacher.ignore_step_condition()
    net.train().requires_grad_(True)
    opt_kwargs = st["optimizer_kwargs"]
    assert (opt_kwargs["class_name"], opt_kwargs["betas"], opt_kwargs["eps"]) == ("torch.optim.Adam", [0.9, 0.999],
                                                                                    1e-8)
    optimizer = make_optimizer(net.parameters(), opt_kwargs["lr"])  # the loop's own optimizer
    cfg = sfd_loss.TeacherConfig(
        solver=lk["sampler_tea"], schedule_type=lk["schedule_type"], schedule_rho=lk["schedule_rho"],
        sigma_min=st["sigma_min"], sigma_max=st["sigma_max"], afs=False,
        solver_options=solver_options(lk["sampler_tea"], lk["max_order"], lk["predict_x0"], lk["lower_order_final"],
                                      thresholding=True))  # float32 on a CPU: the paper's thresholding is on
    params = dict(net.named_parameters())
    initial = {name: p.detach().clone() for name, p in params.items()}
    iterations = []
    for it in info["iterations"]:
        rec = dict(trajectories=[], student_calls=[], l1=[], optimizer_steps=[], thresholded=[], params_before={
            name: p.detach().clone() for name, p in params.items()})
        num_steps = it["num_steps"]
        M = sfd_loss.SFDV_TEACHER_M if sfdv else lk["M"]
        schedule = sfd_loss.make_distill_schedule(num_steps, M, st["sigma_min"], st["sigma_max"], lk["schedule_type"],
                                                  lk["schedule_rho"], net=teacher)
        # The paper's loop draws sigma_max * randn and hands its teacher latents / t_steps[0] (float32 79.99998).
        latents = torch.from_numpy(array(it["latents"])) / torch.tensor(it["t_steps"][0])
        step_condition = torch.full([len(latents)], float(num_steps)) if sfdv else None  # as the loop passes it

        def student(x, sigma, **kwargs):
            rec["student_calls"].append(dict(x=x.detach().clone(), sigma=float(sigma),
                                              step_condition=kwargs.get("step_condition")))
            return net(x, sigma, **kwargs)

        real_solver, real_l1, real_step = solvers.SOLVERS[cfg.solver], sfd_loss.l1_loss, torch.optim.Adam.step
        real_threshold = solvers.dpm_solver_pp.dynamic_threshold

        def solver(*args, **kwargs):
            out = real_solver(*args, **kwargs)
            rec["trajectories"].append(out.clone())
            return out

        def l1(out, target):
            rec["l1"].append(dict(out=out.detach().clone(), target=target.clone()))
            return real_l1(out, target)

        def step(self, *args, **kwargs):
            rec["optimizer_steps"].append(dict(lr=self.param_groups[0]["lr"], grads={
                name: None if p.grad is None else p.grad.clone() for name, p in params.items()}))
            return real_step(self, *args, **kwargs)

        def threshold(x0, *args, **kwargs):
            out = real_threshold(x0, *args, **kwargs)
            rec["thresholded"].append(not torch.equal(out, x0))
            return out

        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(solvers.SOLVERS, cfg.solver, solver)
            mp.setattr(sfd_loss, "l1_loss", l1)
            mp.setattr(torch.optim.Adam, "step", step)
            mp.setattr(solvers.dpm_solver_pp, "dynamic_threshold", threshold)
            result = sfd_iteration(student, optimizer, teacher, [latents], schedule, cfg, lk["afs"],
                                   step_condition=step_condition)
        iterations.append(dict(rec, schedule=schedule, result=result))
    final = {name: p.detach().clone() for name, p in params.items()}
    return dict(info=info, iterations=iterations, initial=initial, final=final, lr=opt_kwargs["lr"])


@pytest.fixture(scope="module", params=RUNS)
def recorded(request):
    return run_recorded(request.param)


def pairs(recorded):
    return zip(recorded["info"]["iterations"], recorded["iterations"])


def test_schedules_and_teacher_slice(recorded):
    info = recorded["info"]
    assert [it["num_steps"] for it in info["iterations"]] == ([4] if info is RECORD["runs"]["sfd"] else [4, 4, 6])
    for it, ours in pairs(recorded):
        schedule = ours["schedule"]
        assert schedule.num_steps_teacher == it["num_steps_teacher"]
        assert list(schedule.teacher_index) == it["tea_slice"]
        # Point by point: the paper computes (a + f (b - a))^7 in float32, whose 7th power turns the rounding of
        # the base into ~7 eps32 ~ 1e-6 relative; ours is computed in float64 and rounded once.
        ours_t = schedule.t_steps.tolist()
        assert ours_t == pytest.approx(it["t_steps"], rel=1e-5)
        for s in it["student_steps"]:  # what the paper's student Euler step ran between (its 2-point schedule)
            assert ours_t[s["step_idx"]:s["step_idx"] + 2] == pytest.approx(s["eff_t"], rel=1e-5)


def test_teacher_trajectory_targets_and_thresholding(recorded):
    for it, ours in pairs(recorded):
        tag = f"iteration {it['index']}"
        assert len(ours["trajectories"]) == 1
        trajectory = ours["trajectories"][0]
        assert trajectory.shape[0] == it["num_steps_teacher"]
        if it["teacher_full_traj"] is not None:
            expected = array(it["teacher_full_traj"])
            for f in range(len(expected)):
                assert_close_rel(trajectory[f], expected[f], 1e-4, f"{tag} teacher frame {f}")
        targets = array(it["teacher_targets"])
        assert ours["result"].targets[0].shape == targets.shape
        for i in range(len(targets)):
            assert_close_rel(ours["result"].targets[0][i], targets[i], 1e-4, f"{tag} teacher target {i}")
        stats = it["teacher_dynamic_thresholding"]
        assert (len(ours["thresholded"]), sum(ours["thresholded"])) == (stats["calls"], stats["changed_x0"])


def test_student_steps_inputs_and_outputs(recorded):
    for it, ours in pairs(recorded):
        tag = f"iteration {it['index']}"
        steps = it["student_steps"]
        assert len(ours["l1"]) == len(steps)
        calls = iter(ours["student_calls"])
        for i, s in enumerate(steps):
            if not s["afs_step"]:  # the AFS step makes no network call
                call = next(calls)
                assert_close_rel(call["x"], array(s["input"]), 1e-4, f"{tag} step {i} network input")
                assert call["sigma"] == pytest.approx(s["t_cur"], rel=1e-5)  # float32 schedules, see above
                sc = call["step_condition"]
                assert (None if sc is None else sorted(set(sc.tolist()))) == (
                    None if s["step_condition"] is None else [float(s["step_condition"])])
            assert_close_rel(ours["l1"][i]["out"], array(s["output"]), 1e-4, f"{tag} step {i} student output")
        assert next(calls, None) is None


def test_loss_maps_and_scalars(recorded):
    for it, ours in pairs(recorded):
        tag = f"iteration {it['index']}"
        losses = ours["result"].losses
        assert len(losses) == len(it["student_steps"])
        for i, s in enumerate(it["student_steps"]):
            loss = losses[i][0].double()
            scale = float(np.abs(array(s["output"])).max())
            assert_close_rel(loss, array(s["loss_map"]), 1e-4, f"{tag} step {i} L1 map", scale=scale)
            norms = loss.flatten(1).norm(dim=1)  # what the paper's loop prints per step
            got = dict(loss_backward_value=float(loss.sum()) / len(loss), loss_l1_mean=float(loss.mean()),
                       printed_loss_mean=float(norms.mean()), printed_loss_std=float(norms.std()))
            for key, value in got.items():
                assert value == pytest.approx(s[key], rel=1e-4), (tag, i, key, value, s[key])


def test_optimizer_steps_lr_and_gradients(recorded):
    names = recorded["info"]["param_names"]
    for it, ours in pairs(recorded):
        tag = f"iteration {it['index']}"
        steps = it["optimizer_steps"]
        # One optimizer step per student step with a network call (none for the AFS step).
        assert len(ours["optimizer_steps"]) == len(steps) == sum(s["backward"] for s in it["student_steps"])
        for j, (expected, got) in enumerate(zip(steps, ours["optimizer_steps"])):
            assert got["lr"] == expected["lr"] == recorded["lr"]
            grads = got["grads"]
            total = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values() if g is not None))
            assert total == pytest.approx(expected["grad_l2_norm"], rel=1e-3), (tag, j)
            assert sum(g is not None for g in grads.values()) == expected["num_tensors_with_grad"]
            for name, norm in zip(names, array(expected["grad_norms_per_tensor"])):
                grad = grads.get(name)  # our SFD network has no step layers at all; the paper's has them unused
                if np.isnan(norm):
                    assert grad is None and (name in grads or is_step_layer_key(name)), (tag, j, name)
                    continue
                assert grad is not None, (tag, j, name)
                got_norm = float(grad.double().norm())
                assert got_norm == pytest.approx(norm, rel=1e-3), (tag, j, name, got_norm, norm)
            for name, key in expected["selected_grads"].items():
                assert_close_rel(grads[name], array(key), 1e-3, f"{tag} optimizer step {j} gradient of {name}")


def assert_adam_moved_like_the_paper(got, before, reference, ref_before, what):
    got, before = got.double().numpy(), before.double().numpy()
    reference, ref_before = reference.astype(np.float64), ref_before.astype(np.float64)
    assert np.array_equal(before, ref_before), f"{what}: different starting values"
    dp_got, dp_ref = got - before, reference - ref_before
    # README §4 also allows "every element within 2 lr per optimizer step", but Adam never moves an element much
    # more than lr per step, so that bound holds for nearly any Adam variant; the norm of the change is the test.
    norm_ref = float(np.linalg.norm(dp_ref))
    assert norm_ref > 0, f"{what}: the reference did not move"
    rel = float(np.linalg.norm(dp_got - dp_ref)) / norm_ref
    assert rel < 1e-2, f"{what}: ||dp_got - dp_ref|| / ||dp_ref|| = {rel:.3e} >= 1e-2"


def test_parameters_after_adam(recorded):
    info = recorded["info"]
    for name, key in info["params_initial"].items():
        assert np.array_equal(recorded["initial"][name].numpy(), array(key)), name
    for it, ours in pairs(recorded):
        for name, key in it.get("params_before", {}).items():
            assert_adam_moved_like_the_paper(ours["params_before"][name], recorded["initial"][name], array(key),
                                             array(info["params_initial"][name]),
                                             f"{name} before iteration {it['index']}")
    for name, key in info["params_final"].items():
        assert_adam_moved_like_the_paper(recorded["final"][name], recorded["initial"][name], array(key),
                                         array(info["params_initial"][name]), f"{name} at the end")
