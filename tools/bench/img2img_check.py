#!/usr/bin/env python3
r"""Image-to-image and inpainting on a full-size random-weight model (tools/bench/fullsize.py make): diffusers
against altdiff at 512x512, the real architecture, the same seed.

    .venv/bin/python tools/bench/img2img_check.py --model-dir /tmp/altdiff-fullsize/m18 \
        [--altdiff target/release/altdiff] [--work /tmp/altdiff-img2img-check]

For each mode (img2img: AltDiffusionImg2ImgPipeline, DDIM, 4 steps at strength 0.5; inpaint:
StableDiffusionInpaintPipeline from the AltDiffusion components, Euler ancestral, 3 steps at strength
0.9) it writes a 512x512 procedural picture (and mask), runs diffusers with
`generator=torch.Generator().manual_seed(seed)`, then `altdiff generate --init-image [--mask] --seed
--dump-tensors`, and prints the worst |a-b| / (1e-4 + 1e-3|b|) of `init_image`, the VAE encoder alone
(`image_latent_mean` / `image_latent_std`: `vae.encode(init_image).latent_dist` mean and std),
`image_latents` (mean + std x sample, scaled), `latents_init`, `latents_final` and `image`. Exit 1 if a ratio exceeds 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "fixtures"))
sys.path.insert(0, str(REPO / "tools" / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import fullsize  # noqa: E402
import img2img as fx  # noqa: E402
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionInpaintPipeline  # noqa: E402
from diffusers.pipelines.deprecated.alt_diffusion import AltDiffusionImg2ImgPipeline  # noqa: E402


def worst(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / (1e-4 + 1e-3 * b.abs())).max())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--altdiff", type=Path, default=REPO / "target" / "release" / "altdiff")
    ap.add_argument("--work", type=Path, default=Path("/tmp/altdiff-img2img-check"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    picture = args.work / "picture.png"
    Image.fromarray(fx.scene(512, 512, 5), "RGB").save(picture)
    mask = args.work / "mask.png"
    m = np.zeros((512, 512), np.uint8)
    m[96:352, 128:448] = 255
    Image.fromarray(m, "L").save(mask)

    comps = fullsize.Components(args.model_dir)
    prompt = "un renard roux dans la neige"
    failed = False
    for mode, cls, sched_cls, sched_name, steps, strength, seed in (
        ("img2img", AltDiffusionImg2ImgPipeline, DDIMScheduler, "ddim", 4, 0.5, 11),
        ("inpaint", StableDiffusionInpaintPipeline, EulerAncestralDiscreteScheduler, "euler-a", 3, 0.9, 12),
    ):
        sched = sched_cls.from_pretrained(str(args.model_dir / "scheduler"))
        pipe = fullsize.gen.build_pipeline(cls, comps, comps.tokenizer(77), sched)
        image = Image.open(picture).convert("RGB")
        init_image = pipe.image_processor.preprocess(image)
        dist = comps.vae.encode(init_image).latent_dist
        print(f"[{mode}] diffusers latent_dist: mean std {dist.mean.std():.4f}, std mean {dist.std.mean():.4f}")
        captured: dict = {}
        orig = pipe.prepare_latents

        def prepare(*a, _orig=orig, _mode=mode, **k):
            out = _orig(*a, **k)
            if _mode == "inpaint":
                captured["latents_init"], _, captured["image_latents"] = (t.clone() for t in out)
            else:
                captured["latents_init"] = out.clone()
            return out

        pipe.prepare_latents = prepare
        if mode == "img2img":
            orig_add = sched.add_noise

            def add_noise(o, n, t, _orig=orig_add):
                captured.setdefault("image_latents", o.clone())
                return _orig(o, n, t)

            sched.add_noise = add_noise
        last = []
        extra = dict(mask_image=Image.open(mask), height=512, width=512) if mode == "inpaint" else {}
        t0 = time.time()
        result = pipe(
            prompt=[prompt], image=image, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(seed), output_type="pt",
            callback_on_step_end=lambda p, i, t, kw: (last.append(kw["latents"].clone()), {})[1],
            callback_on_step_end_tensor_inputs=["latents"], **extra,
        )
        print(f"[{mode}] diffusers: {time.time() - t0:.1f} s")
        want = {
            "init_image": init_image, "image_latent_mean": dist.mean, "image_latent_std": dist.std,
            "image_latents": captured["image_latents"],
            "latents_init": captured["latents_init"], "latents_final": last[-1], "image": result.images,
        }
        dump = args.work / f"{mode}.safetensors"
        cmd = [
            str(args.altdiff), "generate", "--model", str(args.model_dir), "--prompt", prompt,
            "--init-image", str(picture), "--strength", str(strength), "--steps", str(steps),
            "--scheduler", sched_name, "--guidance", "7.5", "--seed", str(seed), "--max-length", "77",
            "--device", "cpu", "--dump-tensors", str(dump), "--output", str(args.work / f"{mode}.png"),
            "--overwrite",
        ]
        if mode == "inpaint":
            cmd += ["--mask", str(mask)]
        t0 = time.time()
        subprocess.run(cmd, check=True, env={"RAYON_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"})
        print(f"[{mode}] altdiff: {time.time() - t0:.1f} s")
        got = load_file(str(dump))
        ratios = {k: worst(got[k], v) for k, v in want.items()}
        print(f"[{mode}] worst |a-b|/(1e-4+1e-3|b|): " + json.dumps({k: round(r, 4) for k, r in ratios.items()}))
        failed |= any(r > 1.0 for r in ratios.values())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
