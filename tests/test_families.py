"""Every diffusers UNet family with default options, and inputs named by the model's own signature.

- ControlNet: its residuals into the UNet (spatial inputs at several resolutions, each split at
  its own), the ControlNetModel itself (a conditioning image at 8x the latent), and a
  StableDiffusionControlNetPipeline through ``parallelize``;
- video UNets: UNet3DConditionModel (B, C, F, H, W) and SVD's UNetSpatioTemporalConditionModel
  (B, F, C, H, W), split along H, frames whole on every rank;
- added-K/V attention (IF-like and Kandinsky-like SimpleCrossAttn blocks: a text's K/V joined
  with the image's along the tokens), and a guided-diffusion (ADM) style UNet of ours (1x1
  conv1d over flattened tokens, einsum attention).

``full_sync`` equals one process at worlds 2 and 3 (fp32, 1e-4) with no fallback gather in the
plan, and the default displaced mode stays closer to one process than ``naive_patch`` over a
short trajectory. A model whose forward Dynamo breaks into three graphs runs too: the graph
with no spatial input unsplit, the one whose inputs are skips at two resolutions split at each.
One spawn per world runs every family; the tests check what it returns.
"""

import functools

import pytest
import torch
import torch.utils._pytree as pytree
from checks import dynamo_graph, graph_caller
from dist import world_fixtures
from models import adm_unet, as_tensor, tiny_controlnet, tiny_if_unet, tiny_kandinsky_unet, tiny_svd_unet, tiny_unet3d

import districompile
from districompile import DistriCompileError
from districompile.backends.distri import distri_backend
from districompile.metrics import psnr, relative_error

TOLERANCE = 1e-4
TIMESTEPS = (900, 700, 500, 300)


def controlnet_residuals(batch=1):
    """The UNet with a ControlNet's residuals (computed once, passed as inputs)."""
    unet, controlnet, args, image = tiny_controlnet(batch=batch)
    with torch.no_grad():
        down, mid = controlnet(*args, controlnet_cond=image, return_dict=False)
    return unet, args, {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def controlnet_model(batch=1):
    _, controlnet, args, image = tiny_controlnet(batch=batch)
    return controlnet, args, {"controlnet_cond": image, "return_dict": False}


FAMILIES = {
    "controlnet_residuals": controlnet_residuals,
    "controlnet": controlnet_model,
    "unet3d": tiny_unet3d,
    "svd": tiny_svd_unet,
    "if_like": tiny_if_unet,
    "kandinsky_like": tiny_kandinsky_unet,
    "adm": adm_unet,
}
DENOISERS = ("controlnet_residuals", "unet3d", "svd", "if_like", "kandinsky_like", "adm")  # return a noise prediction


class BrokenUNet(torch.nn.Module):
    """Graph breaks where Dynamo may put them: after the time embedding (a graph with no spatial
    input) and after a downsampling (a graph whose inputs are skips at two resolutions)."""

    def __init__(self, c=8):
        super().__init__()
        self.time = torch.nn.Linear(1, c)
        self.conv_in = torch.nn.Conv2d(4, c, 3, padding=1)
        self.down = torch.nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.up = torch.nn.Conv2d(c, c, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(2 * c, 4, 3, padding=1)

    def forward(self, x, t):
        emb = self.time(t.reshape(-1, 1) / 1000)
        torch._dynamo.graph_break()
        h0 = self.conv_in(x) + emb[:, :, None, None]
        h = self.down(torch.nn.functional.silu(h0))
        torch._dynamo.graph_break()
        h = torch.nn.functional.interpolate(self.up(h), scale_factor=2, mode="nearest")
        return self.conv_out(torch.cat([h, h0], dim=1))


def leaves(output) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def max_error(output, reference) -> float:
    return max(relative_error(a, b) for a, b in zip(leaves(output), leaves(reference)))


def trajectory(model, args, kwargs) -> torch.Tensor:
    """A short denoising loop over falling timesteps: ``x <- x - 0.1 * eps(x, t)``."""
    x, timestep, *rest = args
    for t in TIMESTEPS:
        eps = as_tensor(model(x, torch.full_like(timestep, t), *rest, **kwargs))
        # Where the channels differ (SVD's conditioning channels in, IF's learned variance out), the
        # leading ones are the noisy latent's.
        dim = next((d for d, (a, b) in enumerate(zip(x.shape, eps.shape)) if a != b), 1)
        n = min(x.shape[dim], eps.shape[dim])
        x = torch.cat([x.narrow(dim, 0, n) - 0.1 * eps.narrow(dim, 0, n), x.narrow(dim, n, x.shape[dim] - n)], dim)
    return x


def _run(rank, world):
    errors, quality = {}, {}
    with torch.no_grad():
        for name, factory in FAMILIES.items():
            model, args, kwargs = factory()
            if name == "controlnet_residuals":
                named_case = model, args, kwargs
            reference = model(*args, **kwargs)
            # One Dynamo trace per family serves full_sync and both trajectories.
            gm, inputs = dynamo_graph(model, args, kwargs)
            output = distri_backend(gm, inputs, {"sync_mode": "full_sync", "lowering": "eager"})(*inputs)
            errors[name] = max_error(output, reference)
            if world == 2 and name in DENOISERS:
                exact = trajectory(model, args, kwargs)
                quality[name] = {"exact": exact}
                for mode, options in (("displaced", {}), ("naive_patch", {"parallelism": "naive_patch"})):
                    compiled = graph_caller(gm, inputs, args, kwargs, {"lowering": "eager", "warmup_steps": 1, **options})
                    try:
                        quality[name][mode] = trajectory(compiled, args, kwargs)
                    except DistriCompileError as error:
                        quality[name][mode] = str(error)
        # Named by the model's own signature, through torch.compile: only the sample is split.
        model, args, kwargs = named_case
        torch._dynamo.reset()
        named = torch.compile(model, backend="distri", options={"sync_mode": "full_sync", "lowering": "eager", "spatial_inputs": ("sample",)})
        errors["named"] = max_error(named(*args, **kwargs), model(*args, **kwargs))

        # Three graphs, one of them with no spatial input.
        torch.manual_seed(0)
        model, args = BrokenUNet().eval(), (torch.randn(1, 4, 12, 8), torch.tensor(500.0))
        torch._dynamo.reset()
        broken = torch.compile(model, backend="distri", options={"sync_mode": "full_sync", "lowering": "eager"})
        errors["graph_breaks"] = max_error(broken(*args), model(*args))
        quality["graph_breaks"] = sorted(
            phase for runtime in districompile.runtimes(model) for t in runtime.trajectories.values() for phase in t.programs
        )
    return errors, quality


world2, world3, ranks = world_fixtures(_run, timeout=900.0)


@pytest.mark.parametrize("name", [*FAMILIES, "named", "graph_breaks"])
def test_full_sync_equals_one_process(ranks, name):
    world, per_rank = ranks
    for rank, (errors, _) in enumerate(per_rank):
        assert errors[name] < TOLERANCE, f"world {world} rank {rank}: {name} {errors[name]:.2e}"


def test_graph_with_no_spatial_input_runs_unsplit(ranks):
    _, per_rank = ranks
    for _, quality in per_rank:
        # The time embedding's graph runs whole on every rank; the other two are split.
        assert quality["graph_breaks"] == ["synchronous", "synchronous", "unsplit"]


@functools.cache
def family_report(name):
    """``explain`` of a family at world 2 (a batch of 1: no batch split), shared by the tests that read it."""
    model, args, kwargs = FAMILIES[name]()
    return districompile.explain(model, *args, world_size=2, verbose=False, split_batch=False, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_plan_has_no_fallback(name):
    report = family_report(name)
    assert report.fallbacks == [], [f.node for f in report.fallbacks]
    assert report.count("halo") and report.count("stats_allgather")


@pytest.mark.parametrize("name", DENOISERS)
def test_displaced_beats_naive_patch(world2, name):
    # Trajectories run at world 2 only (CI time).
    for rank, (_, quality) in enumerate(world2):
        runs = quality[name]
        displaced = psnr(runs["displaced"], runs["exact"])
        if rank == 0:
            naive_text = runs["naive_patch"] if isinstance(runs["naive_patch"], str) else f"{psnr(runs['naive_patch'], runs['exact']):.1f} dB"
            print(f"\n{name}: displaced {displaced:.1f} dB, naive_patch {naive_text[:60]}")
        assert displaced > 30, f"rank {rank}: {name} displaced {displaced:.1f} dB"
        if isinstance(runs["naive_patch"], str):  # einsum attention: naive_patch refuses it by name
            assert name == "adm" and "naive_patch" in runs["naive_patch"]
        else:
            naive = psnr(runs["naive_patch"], runs["exact"])
            assert displaced > naive, f"rank {rank}: {name} displaced {displaced:.1f} dB, naive_patch {naive:.1f} dB"


def test_adm_conv1d_on_half_the_batch_is_local():
    # With the CFG split, the 1x1 conv1d runs on the local half of the batch: no gather.
    model, args, kwargs = adm_unet(batch=2)
    report = districompile.explain(model, *args, world_size=2, verbose=False, **kwargs)
    assert report.batch_split and report.fallbacks == []


def test_residuals_and_conditioning_image_split_at_their_own_resolution():
    """A residual at half the latent's rows gets half the rows of each rank; the image, 8x as many."""
    report = family_report("controlnet_residuals")
    specs = {node.name: spec for node, spec in report.plan.propagation.specs.items() if node.op == "placeholder"}
    heights = {tuple(s.split.bounds) for s in specs.values() if hasattr(s, "split")}
    assert {(0, 16, 32), (0, 8, 16)} <= heights
    report = family_report("controlnet")
    heights = {tuple(s.split.bounds) for n, s in report.plan.propagation.specs.items() if n.op == "placeholder" and hasattr(s, "split")}
    assert heights == {(0, 16, 32), (0, 128, 256)}


def test_video_samples_split_their_rows_not_their_frames():
    for name, rows_dim in (("unet3d", 3), ("svd", 3)):
        report = family_report(name)
        (sample,) = [s for n, s in report.plan.propagation.specs.items() if n.op == "placeholder" and hasattr(s, "split")]
        assert sample.dim == rows_dim and report.row_bounds == (0, 8, 16)


def test_added_kv_attention_gathers_keys_like_self_attention():
    # The text's K/V joined with the image's: one K/V gather each (displaceable), not a fallback.
    report = family_report("kandinsky_like")
    assert report.count("kv_gather") == 8 and report.count("gather") == 0


# ----------------------------------------------------------------------------- inputs by name


def test_explain_takes_inputs_by_the_model_s_names():
    model, args, kwargs = controlnet_residuals()
    by_name = districompile.explain(model, *args, world_size=2, verbose=False, spatial_inputs=("sample",), **kwargs)
    assert by_name.fallbacks == [] and by_name.row_bounds == (0, 16, 32)
    placeholders = [n for n, s in by_name.plan.propagation.specs.items() if n.op == "placeholder" and hasattr(s, "split")]
    assert len(placeholders) == 1  # the residuals stay whole: only the sample is named
    one_residual = districompile.explain(
        model, *args, world_size=2, verbose=False, spatial_inputs=("sample", "down_block_additional_residuals[1]"), **kwargs
    )
    assert len([n for n, s in one_residual.plan.propagation.specs.items() if n.op == "placeholder" and hasattr(s, "split")]) == 2


def test_unknown_input_name_lists_the_names_there_are():
    model, args, kwargs = controlnet_residuals()
    with pytest.raises(DistriCompileError, match=r"no input is named \['latents'\]; the inputs of this graph are \['sample', 'timestep', .*'down_block_additional_residuals'"):
        districompile.explain(model, *args, world_size=2, verbose=False, spatial_inputs=("latents",), **kwargs)
