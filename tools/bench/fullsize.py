#!/usr/bin/env python3
r"""Full-size random-weight AltDiffusion models and diffusers reference runs on them, for benchmarking
`altdiff` (speed, memory) and checking it at the real sizes without the real checkpoints.

    .venv/bin/python tools/bench/fullsize.py make [m9] [m18] [--root /tmp/altdiff-fullsize]
    .venv/bin/python tools/bench/fullsize.py reference --model-dir /tmp/altdiff-fullsize/m18 \
        --prompt "un renard roux dans la neige" --out /tmp/altdiff-fullsize/ref-m18.safetensors

`make` writes <root>/m9 and <root>/m18 in the diffusers layout of the real BAAI repositories (real
architectures, hand-written config.json key sets, random perturbed f32 weights as safetensors, the tiny
fixture tokenizer). Several GB each: never commit them.

`reference` runs diffusers' AltDiffusionPipeline (CPU, fp32) on such a directory with fixed latents and
writes a safetensors file with the same keys and layouts as tests/fixtures/reference/*.safetensors, plus
per-stage wall times (printed as JSON on stdout and stored in the file's metadata).

The model building, checks and the reference run itself are tools/fixtures/generate.py's (imported), so
the outputs are produced exactly as the committed tiny fixtures are. See tools/bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = Path("/tmp/altdiff-fullsize")
VARIANTS = ("m9", "m18")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    sub = ap.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make", help="build full-size random-weight models")
    mk.add_argument("variants", nargs="*", metavar="VARIANT", help="m9 and/or m18 (default: both)")
    mk.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="models go to ROOT/<variant> (default %(default)s)")
    mk.add_argument("--dir", type=Path, default=None, help="output directory (only with a single variant)")
    mk.add_argument("--no-tokenizer-json", action="store_true",
                    help="leave out tokenizer/tokenizer.json (the real repositories ship none)")
    mk.add_argument("--no-check", action="store_true",
                    help="skip loading the model back (weights equal the files + activation statistics)")
    mk.add_argument("--threads", type=int, default=None, dest="threads_sub", help=argparse.SUPPRESS)

    rf = sub.add_parser("reference", help="run diffusers' AltDiffusionPipeline on a model directory")
    rf.add_argument("--model-dir", type=Path, required=True)
    rf.add_argument("--out", type=Path, required=True, help="output .safetensors")
    rf.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    rf.add_argument("--negative-prompt", default=None)
    rf.add_argument("--steps", type=int, default=2)
    rf.add_argument("--guidance", type=float, default=7.5)
    rf.add_argument("--scheduler", choices=["pndm", "ddim"], default="pndm")
    rf.add_argument("--height", type=int, default=512)
    rf.add_argument("--width", type=int, default=512)
    rf.add_argument("--num-images", type=int, default=1)
    rf.add_argument("--max-length", type=int, default=77, help="tokenizer.model_max_length (pad length)")
    rf.add_argument("--seed", type=int, default=1000, help="latents = torch.randn(..., generator=manual_seed(SEED))")
    rf.add_argument("--name", default=None, help="case name stored in the metadata (default: output file stem)")
    rf.add_argument("--verify-weights", action="store_true",
                    help="after the timed load, check that the loaded weights equal the files (slow, more memory)")
    rf.add_argument("--threads", type=int, default=None, dest="threads_sub", help=argparse.SUPPRESS)

    args = ap.parse_args(argv)
    if getattr(args, "threads_sub", None) is not None:
        args.threads = args.threads_sub
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0))
    if args.command == "make":
        args.variants = list(dict.fromkeys(args.variants or VARIANTS))  # dedupe, keep order
        if not set(args.variants) <= set(VARIANTS):
            ap.error(f"variants must be among {VARIANTS}, got {args.variants}")
        if args.dir is not None and len(args.variants) != 1:
            ap.error("--dir needs exactly one variant")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
# Thread count must be in the environment before torch is imported (generate.py only sets a default of 1).
if ARGS is not None:
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)
    os.environ["MKL_NUM_THREADS"] = str(ARGS.threads)

sys.path.insert(0, str(REPO / "tools" / "fixtures"))
import generate as gen  # noqa: E402  (sets up offline mode, logging, deterministic algorithms)
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.deprecated.alt_diffusion import AltDiffusionPipeline  # noqa: E402
from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (  # noqa: E402
    RobertaSeriesConfig,
    RobertaSeriesModelWithTransformation,
)

TINY_TOKENIZER = REPO / "tests" / "fixtures" / "models" / "tiny-m18" / "tokenizer"
TOKENIZER_MAX_LENGTH = {"m9": 512, "m18": 77}  # as the real repositories' tokenizer_config.json
SEEDS = {  # torch's global RNG seed before building each component
    ("m9", "text_encoder"): 90001,
    ("m9", "unet"): 90002,
    ("m9", "vae"): 90003,
    ("m18", "text_encoder"): 180001,
    ("m18", "unet"): 180002,
    ("m18", "vae"): 180003,
}

# ----------------------------------------------------------------------------------------------------
# Configs. Written by hand with the key sets of the real hub files as far as known (see README: the
# uncertain keys are listed there). The models are BUILT from these dicts, so the files on disk describe
# exactly the architecture of the saved weights. Version keys carry the versions that wrote the files.
# ----------------------------------------------------------------------------------------------------
def text_encoder_config(variant: str) -> dict:
    cfg = {
        "architectures": ["RobertaSeriesModelWithTransformation"],
        "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0,
        "classifier_dropout": None,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 1024,
        "initializer_range": 0.02,  # XLM-R large's value; gives O(1) activations at hidden size 1024
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-05,
        "learn_encoder": True,
        "max_position_embeddings": 514,
        "model_type": "xlm-roberta",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "pad_token_id": 1,
        "pooler_fn": "cls",
        "position_embedding_type": "absolute",
        "project_dim": 768 if variant == "m9" else 1024,
        "torch_dtype": "float32",
        "transformers_version": gen.transformers.__version__,
        "type_vocab_size": 1,
        "use_attention_mask": True,
        "use_cache": True,
        "vocab_size": 250002,
    }
    if variant == "m18":
        cfg["has_pre_transformation"] = True
    return dict(sorted(cfg.items()))


_SD_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def unet_config(variant: str) -> dict:
    # m9: the Stable Diffusion 1.x key set of the diffusers 0.x conversions (no use_linear_projection,
    # upcast_attention, ... : class defaults apply).
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": gen.diffusers.__version__,
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        **_SD_BLOCKS,
    }
    if variant == "m18":
        # SD 2.1-base (64-dim heads, linear proj_in/out) with the keys diffusers ~0.14 wrote.
        cfg.update(
            attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024,
            class_embed_type=None,
            conv_in_kernel=3,
            conv_out_kernel=3,
            dual_cross_attention=False,
            mid_block_type="UNetMidBlock2DCrossAttn",
            num_class_embeds=None,
            only_cross_attention=False,
            projection_class_embeddings_input_dim=None,
            resnet_time_scale_shift="default",
            time_cond_proj_dim=None,
            time_embedding_type="positional",
            timestep_post_act=None,
            upcast_attention=False,
            use_linear_projection=True,
        )
    return dict(sorted(cfg.items()))


def vae_config(variant: str) -> dict:
    cfg = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": gen.diffusers.__version__,
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    if variant == "m18":
        # scaling_factor appeared in diffusers 0.13 (2023); the m9 conversion (2022) predates it, so its
        # file has no such key and the class default 0.18215 applies.
        cfg["scaling_factor"] = 0.18215
    return dict(sorted(cfg.items()))


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "diffusers": gen.diffusers.__version__,
        "transformers": gen.transformers.__version__,
        "tokenizers": gen.tokenizers.__version__,
        "sentencepiece": gen.spm.__version__,
    }


def check_versions() -> None:
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON result
        gen.check_versions()


# ----------------------------------------------------------------------------------------------------
# make
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def build_component(variant: str, what: str, out: Path) -> dict:
    """Build one component from its hand-written config, perturb it as generate.py does, save it (f32
    safetensors) and overwrite the config.json that save_pretrained wrote with the hand-written one."""
    t0 = time.perf_counter()
    torch.manual_seed(SEEDS[(variant, what)])
    if what == "text_encoder":
        cfg = text_encoder_config(variant)
        model = RobertaSeriesModelWithTransformation(RobertaSeriesConfig.from_dict(dict(cfg)))
        assert model.has_pre_transformation == (variant == "m18")
        model.eval()
        gen.perturb(model, embedding_std=cfg["initializer_range"])
    elif what == "unet":
        cfg = unet_config(variant)
        model = UNet2DConditionModel.from_config(dict(cfg)).eval()
        gen.perturb(model)
    else:
        cfg = vae_config(variant)
        model = AutoencoderKL.from_config(dict(cfg)).eval()
        gen.perturb(model)
        model.decoder.conv_out.weight.mul_(gen.VAE_CONV_OUT_SCALE)
        model.decoder.conv_out.bias.mul_(gen.VAE_CONV_OUT_SCALE)
    t_build = time.perf_counter() - t0
    nparams = sum(p.numel() for p in model.parameters())
    gen.check_state_dict(model.state_dict(), f"{variant}/{what}")
    t1 = time.perf_counter()
    model.save_pretrained(str(out / what), safe_serialization=True)
    gen.write_json(out / what / "config.json", cfg)
    t_save = time.perf_counter() - t1
    del model
    gc.collect()
    files = sorted(p.name for p in (out / what).iterdir())
    log(f"  {variant}/{what}: {nparams / 1e6:.1f} M params, build {t_build:.1f} s, save {t_save:.1f} s, files {files}")
    return {"params": nparams, "build_s": round(t_build, 2), "save_s": round(t_save, 2)}


def write_tokenizer(variant: str, out: Path, with_json: bool) -> None:
    dst = out / "tokenizer"
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(TINY_TOKENIZER.iterdir()):
        if f.name == "tokenizer.json" and not with_json:
            continue
        shutil.copyfile(f, dst / f.name)
    tc_path = dst / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc["model_max_length"] = TOKENIZER_MAX_LENGTH[variant]
    gen.write_json(tc_path, tc)


class Components(gen.Loaded):
    """generate.Loaded for an arbitrary directory, timing each component's load."""

    def __init__(self, directory: Path, verify: bool = False):  # noqa: D107 (no super().__init__: it loads)
        self.dir = Path(directory)
        self.timings: dict[str, float] = {}
        t = time.perf_counter()
        self.text_encoder, info = RobertaSeriesModelWithTransformation.from_pretrained(
            str(self.dir / "text_encoder"), output_loading_info=True, torch_dtype=torch.float32
        )
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        self.timings["load_text_encoder"] = time.perf_counter() - t
        t = time.perf_counter()
        self.unet = UNet2DConditionModel.from_pretrained(str(self.dir / "unet"), torch_dtype=torch.float32)
        self.timings["load_unet"] = time.perf_counter() - t
        t = time.perf_counter()
        self.vae = AutoencoderKL.from_pretrained(str(self.dir / "vae"), torch_dtype=torch.float32)
        self.timings["load_vae"] = time.perf_counter() - t
        for m in (self.text_encoder, self.unet, self.vae):
            m.eval()
            assert all(p.dtype == torch.float32 for p in m.parameters())
        if verify:
            self.verify()

    def verify(self) -> None:
        """Loaded weights must equal the files (one file in memory at a time)."""
        for sub, m, fname in (
            ("text_encoder", self.text_encoder, "model.safetensors"),
            ("unet", self.unet, "diffusion_pytorch_model.safetensors"),
            ("vae", self.vae, "diffusion_pytorch_model.safetensors"),
        ):
            sd_file = load_file(str(self.dir / sub / fname))
            sd_model = m.state_dict()
            assert set(sd_file) <= set(sd_model), (sub, sorted(set(sd_file) - set(sd_model))[:5])
            for k, v in sd_file.items():
                assert torch.equal(sd_model[k], v), (self.dir, sub, k)
            gen.check_state_dict(sd_file, f"{self.dir.name}/{sub}")
            del sd_file, sd_model
            gc.collect()


def make(args: argparse.Namespace) -> None:
    check_versions()
    summary = {}
    for variant in args.variants:
        out = args.dir if args.dir is not None else args.root / variant
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        log(f"{variant}: building into {out}")
        t0 = time.perf_counter()
        comp = {what: build_component(variant, what, out) for what in ("text_encoder", "unet", "vae")}
        write_tokenizer(variant, out, with_json=not args.no_tokenizer_json)
        gen.write_json(out / "scheduler" / "scheduler_config.json", gen.SCHEDULER_CONFIG)
        # generate.model_index picks the feature_extractor class name by fixture name.
        gen.write_json(out / "model_index.json", gen.model_index("tiny-m9" if variant == "m9" else "tiny-m18"))
        t_make = time.perf_counter() - t0
        entry = {
            "dir": str(out),
            "make_s": round(t_make, 1),
            "bytes": dir_size(out),
            "components": comp,
        }
        if not args.no_check:
            t1 = time.perf_counter()
            comps = Components(out, verify=True)
            with contextlib.redirect_stdout(sys.stderr):
                gen.diagnostics(variant, comps)
            del comps
            gc.collect()
            entry["check_s"] = round(time.perf_counter() - t1, 1)
        entry["peak_rss_gib_so_far"] = round(peak_rss_gib(), 2)
        log(f"{variant}: {entry['bytes'] / 1e9:.2f} GB in {t_make:.1f} s (peak RSS so far {entry['peak_rss_gib_so_far']} GiB)")
        summary[variant] = entry
    print(json.dumps({"threads": torch.get_num_threads(), "versions": versions(), "models": summary}, indent=2))


# ----------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------
class StageTimer:
    """Wall times of the pipeline's stages, recorded only while AltDiffusionPipeline.__call__ runs (the
    extra checks that generate.run_case does afterwards are not counted)."""

    def __init__(self, comps: Components):
        self.active = False
        self.events: list[tuple[str, float]] = []
        self.pipeline_total = None
        self._starts: dict[str, float] = {}
        self._undo = []
        for name, mod in (("text_encoder", comps.text_encoder), ("unet", comps.unet)):
            self._undo.append(mod.register_forward_pre_hook(self._pre(name)).remove)
            self._undo.append(mod.register_forward_hook(self._post(name)).remove)
        vae, orig_decode = comps.vae, comps.vae.decode

        def decode(*a, **k):
            t = time.perf_counter()
            r = orig_decode(*a, **k)
            self._add("decode", time.perf_counter() - t)
            return r

        vae.decode = decode
        self._undo.append(lambda: delattr(vae, "decode"))
        for attr, stage in (("__call__", None), ("encode_prompt", "encode")):
            orig = getattr(AltDiffusionPipeline, attr)
            setattr(AltDiffusionPipeline, attr, self._wrap(orig, stage))
            self._undo.append(lambda attr=attr, orig=orig: setattr(AltDiffusionPipeline, attr, orig))

    def _add(self, stage: str, dt: float) -> None:
        if self.active:
            self.events.append((stage, dt))

    def _pre(self, name):
        def hook(mod, args):
            self._starts[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(mod, args, out):
            self._add(name, time.perf_counter() - self._starts.pop(name))

        return hook

    def _wrap(self, orig, stage):
        timer = self

        def wrapped(*a, **k):
            t = time.perf_counter()
            if stage is None:
                timer.active = True
            try:
                return orig(*a, **k)
            finally:
                dt = time.perf_counter() - t
                if stage is None:
                    timer.active = False
                    timer.pipeline_total = dt
                else:
                    timer._add(stage, dt)

        return wrapped

    def remove(self) -> None:
        for f in reversed(self._undo):
            f()

    def summary(self) -> dict:
        by = lambda s: [round(dt, 4) for st, dt in self.events if st == s]  # noqa: E731
        encode, te, unet, decode = by("encode"), by("text_encoder"), by("unet"), by("decode")
        assert len(encode) == 1 and len(decode) == 1, self.events
        known = encode[0] + sum(unet) + decode[0]
        return {
            "encode": encode[0],  # pipe.encode_prompt: tokenisation + text-encoder calls (cond, uncond)
            "text_encoder_calls": te,
            "unet_steps": unet,  # one entry per UNet evaluation (batch 2B with guidance)
            "unet_total": round(sum(unet), 4),
            "decode": decode[0],  # vae.decode
            "pipeline_total": round(self.pipeline_total, 4),
            "pipeline_other": round(self.pipeline_total - known, 4),  # scheduler steps, postprocess, ...
        }


def reference(args: argparse.Namespace) -> None:
    check_versions()
    case = {
        "name": args.name or args.out.stem,
        "model": str(args.model_dir),
        "prompts": list(args.prompt),
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "height": args.height,
        "width": args.width,
        "num_images": args.num_images,
        "max_length": args.max_length,
        "seed": args.seed,
    }
    log(f"case: {json.dumps(case, ensure_ascii=False)} ({torch.get_num_threads()} threads)")
    t0 = time.perf_counter()
    comps = Components(args.model_dir)
    timings = {k: round(v, 3) for k, v in comps.timings.items()}
    t = time.perf_counter()
    tok, sched = comps.tokenizer(args.max_length), comps.scheduler(args.scheduler)
    timings["load_tokenizer_scheduler"] = round(time.perf_counter() - t, 3)
    timings["load"] = round(time.perf_counter() - t0, 3)
    rss_after_load = peak_rss_gib()
    del tok, sched
    if args.verify_weights:
        t = time.perf_counter()
        comps.verify()
        timings["verify_weights"] = round(time.perf_counter() - t, 3)
    log(f"loaded in {timings['load']:.1f} s (peak RSS {rss_after_load:.2f} GiB)")

    timer = StageTimer(comps)
    t = time.perf_counter()
    try:
        out = gen.run_case(0, case, comps, seed=args.seed)
    finally:
        timer.remove()
    run_s = time.perf_counter() - t
    timings.update(timer.summary())
    timings["run_case_total"] = round(run_s, 3)  # pipeline + generate.run_case's consistency checks
    timings["checks"] = round(run_s - timer.pipeline_total, 3)

    img, lf = out["image"], out["latents_final"]
    stats = {
        "timesteps": [int(x) for x in out["timesteps"]],
        "real_tokens": [int((r != 1).sum()) for r in out["input_ids"]],
        "prompt_embeds": gen.stats(out["prompt_embeds"]),
        "latents_final": gen.stats(lf),
        "image": gen.stats(img),
        "image_clamped_fraction": round(float(((img == 0) | (img == 1)).double().mean()), 4),
    }
    result = {
        "case": case,
        "out": str(args.out),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "dtype": "float32",
        "versions": versions(),
        "timings_s": timings,
        "peak_rss_gib_after_load": round(rss_after_load, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "shapes": {k: list(v.shape) for k, v in out.items()},
        "stats": stats,
    }
    metadata = {
        "case": json.dumps(case, ensure_ascii=False),
        "timings_s": json.dumps(timings),
        "threads": str(result["threads"]),
        "versions": json.dumps(result["versions"]),
        "peak_rss_gib": str(result["peak_rss_gib"]),
        "generator": "tools/bench/fullsize.py reference",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(args.out), metadata=metadata)
    result["bytes"] = args.out.stat().st_size
    print(json.dumps(result, indent=2, ensure_ascii=False))


def main() -> None:
    torch.set_num_threads(ARGS.threads)  # generate.py set 1 at import
    {"make": make, "reference": reference}[ARGS.command](ARGS)


if __name__ == "__main__":
    main()
