"""Multi-GPU correctness and speed of ``backend="distri"`` (issue 5), launched with torchrun.

For each resolution, on N ranks (one GPU each, NCCL; gloo on CPUs):

1. correctness: one ``full_sync`` UNet call against the uncompiled UNet on one device (rank 0);
   the displaced default mode's final latent after a DDIM trajectory with classifier-free
   guidance (batch 2) against the same trajectory on one device: PSNR;
2. speed: latency of that trajectory (UNet calls and scheduler steps) and of the whole pipeline
   from ``prompt_embeds`` to latents, for the best single device (``torch.compile`` with
   ``--baseline``, rank 0 alone) and for ``distri`` displaced with the CFG batch split on and off.

    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --sizes 1024 2048 3840 --steps 50
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --model tiny --sizes 256 --steps 6 \\
        --dtype fp32 --lowering eager --baseline eager          # a CPU check of the script

Rank 0 prints one table last; ``--out`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from common import device_name, output, print_table, sync
from unet_bench import build

import districompile
from districompile.metrics import psnr, relative_error

GUIDANCE = 5.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sdxl", "tiny"), default="sdxl")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps of the displaced mode")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--lowering", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--baseline", choices=("reduce-overhead", "default", "eager"), default="reduce-overhead",
                        help="the single-device baseline: torch.compile mode, or the uncompiled UNet")
    parser.add_argument("--out", help="folder for the JSON table")
    return parser.parse_args()


def ddim_trajectory(unet, latents, context, added, steps, reset=None):
    """The final latent of a DDIM trajectory with classifier-free guidance (batch 2 per call)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(steps, device=latents.device)
    if reset is not None:
        reset()
    x = latents
    for t in scheduler.timesteps:
        noise = output(unet(torch.cat([x, x]), t, context, added_cond_kwargs=added))
        uncond, cond = noise.chunk(2)
        x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    return x


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def cfg_inputs(args_one, kwargs_one):
    """Batch-1 inputs of ``unet_bench.build`` made into a CFG pair (unconditional, conditional)."""
    latents, _, context = args_one
    added = {k: torch.cat([v, v]) for k, v in kwargs_one["added_cond_kwargs"].items()}
    return latents, torch.cat([torch.zeros_like(context), context]), added


def pipeline(unet, latents, context, added, steps):
    """An SDXL pipeline around ``unet`` (no text encoders, a tiny VAE: only latents come out)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4).to(latents.device)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    size = latents.shape[-1] * 8
    embeds = {
        "prompt_embeds": context[1:], "negative_prompt_embeds": context[:1],
        "pooled_prompt_embeds": added["text_embeds"][1:], "negative_pooled_prompt_embeds": added["text_embeds"][:1],
    }
    return pipe, dict(**embeds, latents=latents, height=size, width=size, num_inference_steps=steps,
                      guidance_scale=GUIDANCE, output_type="latent")


def main():
    opts = parse_args()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    rows = []
    for size in opts.sizes:
        unet, args_one, kwargs_one = build(opts.model, size, 1, dtype, device)
        latents, context, added = cfg_inputs(args_one, kwargs_one)
        row = {"size": size, "GPUs" if device.type == "cuda" else "ranks": world, "steps": opts.steps}
        log = (lambda message: print(f"[{size}] {message}", flush=True)) if rank == 0 else (lambda message: None)
        with torch.no_grad():
            # One device: the reference trajectory and the baseline's latency, on rank 0 alone.
            if rank == 0:
                eager_out = output(unet(torch.cat([latents, latents]), args_one[1], context, added_cond_kwargs=added))
                baseline = unet if opts.baseline == "eager" else torch.compile(unet, mode=opts.baseline)
                ddim_trajectory(baseline, latents, context, added, 2)  # compile and warm up
                seconds, reference = timed(lambda: ddim_trajectory(baseline, latents, context, added, opts.steps), device)
                row["1 device UNet loop s"] = seconds
                pipe, call = pipeline(baseline, latents, context, added, opts.steps)
                pipe(**{**call, "num_inference_steps": 2})  # warm up
                row["1 device pipeline s"] = timed(lambda: pipe(**call), device)[0]
                log(f"one device: {row}")
                torch._dynamo.reset()
            dist.barrier()

            # full_sync: one call, against the uncompiled UNet.
            exact = torch.compile(unet, backend="distri", options={"sync_mode": "full_sync", "lowering": opts.lowering})
            out = output(exact(torch.cat([latents, latents]), args_one[1], context, added_cond_kwargs=added))
            if rank == 0:
                row["full_sync rel err"] = relative_error(out, eager_out)
                log(f"full_sync: {row}")
            torch._dynamo.reset()

            for split in (True, False):
                name = f"distri split {'on' if split else 'off'}"
                options = {"lowering": opts.lowering, "warmup_steps": opts.warmup_steps, "split_batch": split}
                distri = torch.compile(unet, backend="distri", options=options)
                reset = lambda: districompile.reset(unet)  # noqa: E731
                ddim_trajectory(distri, latents, context, added, 2, reset)  # compile both phases
                seconds, final = timed(lambda: ddim_trajectory(distri, latents, context, added, opts.steps, reset), device)
                pipe, call = pipeline(unet, latents, context, added, opts.steps)
                districompile.parallelize(pipe, **options).set_progress_bar_config(disable=True)
                pipe(**{**call, "num_inference_steps": 2})  # compile
                pipeline_seconds = timed(lambda: pipe(**call), device)[0]
                if rank == 0:
                    row[f"{name} UNet loop s"] = seconds
                    row[f"{name} speedup"] = row["1 device UNet loop s"] / seconds
                    row[f"{name} pipeline s"] = pipeline_seconds
                    row[f"{name} PSNR dB"] = psnr(final, reference)
                    log(f"{name}: {row}")
                torch._dynamo.reset()
        rows.append(row)
        del unet
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if rank == 0:
        print_table(rows, f"{opts.model}, {opts.dtype}, {world} x {device_name(device)}, baseline {opts.baseline}, "
                          f"lowering {opts.lowering}, torch {torch.__version__}")
        if opts.out:
            os.makedirs(opts.out, exist_ok=True)
            with open(os.path.join(opts.out, f"multi_gpu_{world}.json"), "w") as f:
                json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
