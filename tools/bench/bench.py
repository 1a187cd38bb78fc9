#!/usr/bin/env python3
r"""Side-by-side CPU benchmark: altdiff against diffusers' AltDiffusionPipeline on the same full-size
random-weight model, on the same machine, in one run.

    .venv/bin/python tools/bench/bench.py --model m18 [--dtype f32|bf16] [--steps 2] [--size 512] [--threads 2] \
        [--runs 1] [--altdiff target/release/altdiff] [--out BENCHMARKS.md] [--keep DIR] [--f32-images DIR]

What it does, in order:
1. makes the model if missing (`tools/bench/fullsize.py make <variant> --root <root>`; real architecture,
   random weights, about 6 GB);
2. reads every model file once, so both sides load from the page cache;
3. waits until the machine is idle (no cargo / rustc / linker processes, little CPU use by others);
4. runs, one after the other, each under `/usr/bin/time -v` (peak RSS) and with the same thread count,
   prompt, seed (same initial latents), scheduler (PNDM), guidance (7.5) and pad length:
   - diffusers: this script's `_diffusers` subcommand in a fresh Python process (components loaded and
     timed as `fullsize.py reference` does, then one `AltDiffusionPipeline.__call__`, PIL output, without
     `reference`'s after-run consistency checks, which would add time and memory);
   - altdiff: `altdiff generate ... --json -v`, from a copy of the binary in /tmp/altdiff-bench-bin/
     taken just before its first run (a rebuild cannot replace it mid-run); stage times come from its
     `--json` line (`timings`: whatever keys exist, e.g. load_s, encode_s, denoise_s, decode_s, total_s,
     unet_steps_s), and where a key is missing, from the time stamps of its stderr lines (`encode`,
     `denoise`, `step i/n`, `decode`), read as they arrive;
5. prints a table (stage x diffusers / altdiff / ratio) and appends a section to BENCHMARKS.md with the
   date, machine, commit, command, versions, idleness and the table.

The ratio is altdiff / diffusers: below 1 means altdiff is faster (or smaller). See tools/bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FULLSIZE = REPO / "tools" / "bench" / "fullsize.py"
DEFAULT_ROOT = Path("/tmp/altdiff-fullsize")
BIN_DIR = Path("/tmp/altdiff-bench-bin")
PROMPTS = {"m18": "un renard roux dans la neige", "m9": "一只在雪地里的红狐狸"}
# Processes whose presence means the machine is not idle (a build or a test run of the other engineer).
BUSY_NAMES = {
    "cargo", "rustc", "cargo-clippy", "clippy-driver", "rustdoc", "cc", "cc1", "cc1plus", "ld", "ld.lld",
    "ld.bfd", "ld.gold", "mold", "lld", "rust-lld", "collect2", "as",
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TARGETS = {  # issue 14: altdiff / diffusers (same precision) must be at most this
    "f32": {"load": 0.6, "encode": 0.8, "unet_min": 0.8, "unet_median": 0.8, "decode": 0.6, "peak_rss": 0.5},
    # peak RSS for bf16: <= 0.3x of diffusers *fp32* (the table compares with diffusers bf16).
    "bf16": {"unet_min": 0.7, "unet_median": 0.7, "decode": 0.8},
}


def log(*a) -> None:
    print("[bench]", *a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["m18", "m9"], required=True)
    ap.add_argument("--steps", type=int, default=2, help="denoising steps (PNDM: steps + 1 UNet evaluations)")
    ap.add_argument("--size", type=int, default=512, help="image height = width (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both (default %(default)s)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="precision of both sides: altdiff --dtype, the diffusers components in torch.float32 "
                    "or torch.bfloat16 (default %(default)s)")
    ap.add_argument("--f32-images", type=Path, default=None,
                    help="with --dtype bf16: the --keep directory of an f32 run of the same case, to report "
                    "each side's bf16-vs-fp32 image deviation")
    ap.add_argument("--runs", type=int, default=1, help="generations per side, alternating (default 1)")
    ap.add_argument("--altdiff", type=Path, default=REPO / "target" / "release" / "altdiff")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file to append to")
    ap.add_argument("--no-write", action="store_true", help="print the table only; leave --out alone")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="models live in ROOT/<model>")
    ap.add_argument("--prompt", default=None, help="default: a fixed prompt per model")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--max-length", type=int, default=77, help="pad length, passed to both (default 77)")
    ap.add_argument("--wait-idle", type=float, default=900, help="seconds to wait for an idle machine "
                    "before each side (in all; default %(default)s), then run anyway and say so")
    ap.add_argument("--retries", type=int, default=3, help="rerun a side whose run overlapped a build or "
                    "other CPU use (>= 5 %%), after waiting for idle again, up to this many times (default 3)")
    ap.add_argument("--only", choices=["diffusers", "altdiff"], default=None, help="run one side only")
    ap.add_argument("--keep", type=Path, default=None, help="keep the images and logs in this directory")
    ap.add_argument("--altdiff-arg", action="append", default=[], help="extra altdiff argument (repeat)")
    args = ap.parse_args(argv)
    if args.size % 8:
        ap.error("--size must be a multiple of 8")
    return args


# ----------------------------------------------------------------------------------------------------
# Machine state
# ----------------------------------------------------------------------------------------------------
def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already part of user
    return total - idle, total


def proc_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, comm, utime + stime jiffies) for every readable process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        r = s.rfind(")")
        comm = s[s.find("(") + 1 : r]
        fields = s[r + 2 :].split()
        out[int(d)] = (int(fields[1]), comm, int(fields[11]) + int(fields[12]))
    return out


def descendants(table: dict, root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    seen, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(kids.get(p, []))
    return seen


def busy_processes(table: dict | None = None) -> list[str]:
    table = proc_table() if table is None else table
    return sorted({f"{comm}" for pid, (_, comm, _) in table.items() if comm in BUSY_NAMES and pid != os.getpid()})


def other_cpu_fraction(seconds: float = 3.0) -> float:
    """Fraction of all CPUs busy over `seconds`, not counting this process."""
    me = os.getpid()
    b0, t0 = cpu_jiffies()
    m0 = proc_table().get(me, (0, "", 0))[2]
    time.sleep(seconds)
    b1, t1 = cpu_jiffies()
    m1 = proc_table().get(me, (0, "", 0))[2]
    return max(0.0, ((b1 - b0) - (m1 - m0)) / max(1, t1 - t0))


class IdleGate:
    """Waits (up to a total budget) until no build process runs and other CPU use is below 10 %."""

    def __init__(self, budget_s: float):
        self.budget = budget_s
        self.waited = 0.0
        self.forced: list[str] = []

    def wait(self, what: str) -> dict:
        t0 = time.monotonic()
        announced = False
        while True:
            busy = busy_processes()
            frac = other_cpu_fraction()
            if not busy and frac < 0.10:
                break
            if self.waited + (time.monotonic() - t0) >= self.budget:
                self.forced.append(f"{what}: started after waiting {self.waited + time.monotonic() - t0:.0f} s "
                                   f"with the machine busy (processes {busy or 'none'}, other CPU {frac:.0%})")
                log(self.forced[-1])
                break
            if not announced:
                log(f"waiting for an idle machine before {what} (busy: {busy or 'none'}, other CPU {frac:.0%})")
                announced = True
            time.sleep(10)
        self.waited += time.monotonic() - t0
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        return {"busy_processes": busy, "other_cpu": round(frac, 3), "loadavg": load}


class Monitor(threading.Thread):
    """While a child runs: CPU used by processes outside its tree, and build processes seen."""

    def __init__(self, root_pid: int, period: float = 2.0):
        super().__init__(daemon=True)
        self.root, self.period = root_pid, period
        self.stop_event = threading.Event()
        self.other_busy = 0
        self.total = 0
        self.seen: set[str] = set()
        self.samples = 0
        self.windows: list[list[float]] = []  # [from, to] seconds into the run when others were busy
        self.started = time.monotonic()

    def _tree_jiffies(self, table) -> int:
        tree = descendants(table, self.root) | {os.getpid()}
        return sum(table[p][2] for p in tree if p in table)

    def run(self) -> None:
        b0, t0 = cpu_jiffies()
        tab = proc_table()
        m0 = self._tree_jiffies(tab)
        while not self.stop_event.wait(self.period):
            b1, t1 = cpu_jiffies()
            tab = proc_table()
            m1 = self._tree_jiffies(tab)
            # Processes of the tree that exited between samples take their jiffies with them: clamp.
            self.other_busy += max(0, (b1 - b0) - max(0, m1 - m0))
            self.total += t1 - t0
            busy = busy_processes(tab)
            frac = max(0, (b1 - b0) - max(0, m1 - m0)) / max(1, t1 - t0)
            if busy or frac > 0.10:
                t = time.monotonic() - self.started
                if not self.windows or t - self.windows[-1][1] > 3 * self.period:
                    self.windows.append([t, t])
                    log(f"  machine busy {t:.0f} s into the run: {busy or 'no build'}, other CPU {frac:.0%}")
                self.windows[-1][1] = t
            self.seen.update(busy)
            self.samples += 1
            b0, t0, m0 = b1, t1, m1

    def result(self) -> dict:
        self.stop_event.set()
        self.join()
        return {
            "other_cpu": round(self.other_busy / self.total, 3) if self.total else None,
            "build_processes_seen": sorted(self.seen),
            "busy_windows": [[round(a), round(b)] for a, b in self.windows],
            "samples": self.samples,
        }


def machine_info() -> dict:
    cpu, flags = "?", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    fam = {}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for key in ("CPU family", "Model", "Hypervisor vendor", "L2 cache", "L3 cache"):
            m = re.search(rf"^{key}:\s*(.+)$", lscpu, re.M)
            if m:
                fam[key] = m.group(1).strip()
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {
        "cpu": cpu,
        "lscpu": fam,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kib / 2**20, 1),
        "flags": {k: k in flags for k in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")},
        "kernel": platform.release(),
    }


def git(*a: str) -> str:
    r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)
    return r.stdout.strip()


# ----------------------------------------------------------------------------------------------------
# Running a child under /usr/bin/time -v
# ----------------------------------------------------------------------------------------------------
def parse_time_v(text: str) -> dict:
    out = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["peak_rss_gib"] = int(m.group(1)) / 2**20
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        out["time_wall_s"] = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    for key, name in (("User time (seconds)", "user_s"), ("System time (seconds)", "sys_s"),
                      ("Percent of CPU this job got", "cpu_percent"), ("Exit status", "exit_status")):
        m = re.search(re.escape(key) + r": ([\d.]+)", text)
        if m:
            out[name] = float(m.group(1))
    return out


def run_timed(cmd: list[str], env: dict, workdir: Path, name: str) -> dict:
    """Runs cmd under /usr/bin/time -v; stdout is captured whole, stderr line by line with time stamps
    (seconds since the spawn)."""
    time_file = workdir / f"{name}.time"
    full = ["/usr/bin/time", "-v", "-o", str(time_file), *cmd]
    log(f"{name}: {shlex.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    mon = Monitor(proc.pid)
    mon.start()
    lines: list[tuple[float, str]] = []

    def pump():
        for raw in iter(proc.stderr.readline, b""):
            t = time.perf_counter() - t0
            line = ANSI.sub("", raw.decode("utf-8", "replace").rstrip("\n"))
            lines.append((t, line))
            print(f"  [{name} {t:7.1f}s] {line}", file=sys.stderr, flush=True)

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    stdout = proc.stdout.read().decode("utf-8", "replace")
    rc = proc.wait()
    wall = time.perf_counter() - t0
    th.join()
    machine = mon.result()
    (workdir / f"{name}.stdout").write_text(stdout)
    (workdir / f"{name}.stderr").write_text("".join(f"{t:9.3f} {line}\n" for t, line in lines))
    tv = parse_time_v(time_file.read_text()) if time_file.exists() else {}
    if rc != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise SystemExit(f"{name} failed (exit {rc}):\n{tail}")
    return {"stdout": stdout, "stderr": lines, "wall_s": wall, "time": tv, "machine": machine}


# ----------------------------------------------------------------------------------------------------
# diffusers side (the `_diffusers` subcommand runs in its own process)
# ----------------------------------------------------------------------------------------------------
def diffusers_child(argv: list[str]) -> None:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(prog="bench.py _diffusers")
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--guidance", type=float, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args(argv)
    # Before torch is imported (tools/fixtures/generate.py only sets a default of 1).
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    os.environ["MKL_NUM_THREADS"] = str(a.threads)
    sys.path.insert(0, str(REPO / "tools" / "bench"))
    import fullsize as fs  # noqa: PLC0415  (imports torch, diffusers, generate.py)

    torch = fs.torch
    torch.set_num_threads(a.threads)
    fs.check_versions()
    import_s = time.perf_counter() - t_start

    t0 = time.perf_counter()
    comps = fs.Components(a.model_dir)
    timings = {k: round(v, 3) for k, v in comps.timings.items()}
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if dtype != torch.float32:
        # "bf16 weights": the components converted after loading (counted in load).
        t = time.perf_counter()
        for m in (comps.text_encoder, comps.unet, comps.vae):
            m.to(dtype)
        timings["to_bf16"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    tok, sched = comps.tokenizer(a.max_length), comps.scheduler("pndm")
    timings["load_tokenizer_scheduler"] = round(time.perf_counter() - t, 3)
    pipe = fs.AltDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=tok, unet=comps.unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    timings["load"] = round(time.perf_counter() - t0, 3)
    rss_after_load = fs.peak_rss_gib()
    fs.log(f"loaded in {timings['load']:.1f} s (peak RSS {rss_after_load:.2f} GiB)")

    # The same initial noise as `altdiff generate --seed` (PyTorch's CPU generator) and fullsize.py reference.
    gen = torch.Generator().manual_seed(a.seed)
    latents = torch.randn((1, 4, a.size // 8, a.size // 8), generator=gen, dtype=torch.float32).to(dtype)
    timer = fs.StageTimer(comps)
    try:
        result = pipe(
            prompt=[a.prompt], height=a.size, width=a.size, num_inference_steps=a.steps,
            guidance_scale=a.guidance, latents=latents, output_type="pil",
        )
    finally:
        timer.remove()
    timings.update(timer.summary())
    t = time.perf_counter()
    result.images[0].save(a.image)
    timings["save_png"] = round(time.perf_counter() - t, 3)
    print(json.dumps({
        "import_s": round(import_s, 3),
        "timings_s": timings,
        "threads": torch.get_num_threads(),
        "timesteps": [int(x) for x in sched.timesteps],
        "versions": fs.versions(),
        "peak_rss_gib_after_load": round(rss_after_load, 3),
        "peak_rss_gib": round(fs.peak_rss_gib(), 3),
    }))


def run_diffusers(args, model_dir: Path, prompt: str, workdir: Path, label: str) -> dict:
    image = workdir / f"{label}.png"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "_diffusers", "--model-dir", str(model_dir),
           "--prompt", prompt, "--steps", str(args.steps), "--guidance", str(args.guidance), "--size",
           str(args.size), "--max-length", str(args.max_length), "--seed", str(args.seed), "--threads",
           str(args.threads), "--image", str(image), "--dtype", args.dtype]
    r = run_timed(cmd, env, workdir, label)
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    t = res["timings_s"]
    stages = {
        "load": t["load"],
        "encode": t["encode"],
        "unet_steps": list(t["unet_steps"]),
        "unet_total": t["unet_total"],
        "decode": t["decode"],
        "total": t["pipeline_total"],
        "wall": r["wall_s"],
        "peak_rss": r["time"].get("peak_rss_gib"),
        "startup": res["import_s"],
    }
    return {"stages": stages, "raw": res, "time": r["time"], "machine": r["machine"], "image": image,
            "command": cmd, "env": {"OMP_NUM_THREADS": env["OMP_NUM_THREADS"], "MKL_NUM_THREADS": env["MKL_NUM_THREADS"]}}


# ----------------------------------------------------------------------------------------------------
# altdiff side
# ----------------------------------------------------------------------------------------------------
def altdiff_supports(binary: Path, flag: str) -> bool:
    r = subprocess.run([str(binary), "generate", "--help"], capture_output=True, text=True, check=False)
    return flag in r.stdout


def parse_timings_line(lines: list[str]) -> dict:
    """A `timings:` summary line on stderr, if the binary prints one: `key 1.23 s` / `key=1.23` pairs."""
    out = {}
    for line in lines:
        m = re.search(r"timings?(?: \([^)]*\))?:\s*(.*)$", line, re.I)
        if not m:
            continue
        for k, v in re.findall(r"([A-Za-z_][\w ]*?)\s*[=:]?\s*([\d.]+)\s*s\b", m.group(1)):
            out[k.strip().replace(" ", "_")] = float(v)
    return out


def altdiff_stages(json_t: dict, stderr: list[tuple[float, str]], wall: float, evals: int) -> tuple[dict, dict]:
    """Stage times from the --json `timings` (preferred) or the stderr time stamps (fallback).
    Returns (stages, source of each stage)."""
    src: dict[str, str] = {}
    stamps: dict[str, float] = {}
    steps: list[float] = []
    for t, line in stderr:
        text = line.strip()
        body = re.sub(r"^(INFO|DEBUG|TRACE|WARN)\s+", "", text)
        if body in ("encode", "denoise", "decode") and body not in stamps:
            stamps[body] = t
        elif re.fullmatch(r"step \d+/\d+", body):
            steps.append(t)
    end = wall  # the end of decode is not logged; the PNG write after it is small
    stamp_stage = {}
    if "encode" in stamps:
        stamp_stage["load"] = stamps["encode"]
    if "encode" in stamps and "denoise" in stamps:
        stamp_stage["encode"] = stamps["denoise"] - stamps["encode"]
    if "denoise" in stamps and "decode" in stamps:
        stamp_stage["unet_total"] = stamps["decode"] - stamps["denoise"]
        if steps:
            prev, per = stamps["denoise"], []
            for t in steps:
                per.append(t - prev)
                prev = t
            stamp_stage["unet_steps"] = per
    if "decode" in stamps:
        stamp_stage["decode"] = end - stamps["decode"]
    if "encode" in stamps:
        stamp_stage["total"] = end - stamps["encode"]

    summary = parse_timings_line([line for _, line in stderr])
    stages: dict = {}

    def pick(stage: str, *keys: str) -> None:
        for k in keys:
            for d, name in ((json_t, "--json"), (summary, "stderr timings line")):
                if k in d and d[k] is not None:
                    stages[stage] = d[k]
                    src[stage] = f"{name} `{k}`"
                    return
        if stage in stamp_stage:
            stages[stage] = stamp_stage[stage]
            src[stage] = "stderr time stamps"

    pick("load", "load_s", "load")
    pick("encode", "encode_s", "encode", "text_encoding_s", "text_encoding")
    pick("unet_steps", "unet_steps_s", "unet_steps", "steps_s")
    pick("json_unet_min", "unet_step_min_s")
    pick("json_unet_median", "unet_step_median_s")
    pick("unet_total", "denoise_s", "denoise", "unet_s", "denoising")
    pick("decode", "decode_s", "decode", "vae_decode_s", "VAE_decode")
    pick("total", "total_s", "total")
    # Generation total = encode + denoise + decode (diffusers: the pipeline call). Should a `total_s`
    # include the load, take it out.
    if "total" in src and "load" in src and src["total"].split(" `")[0] == src["load"].split(" `")[0] \
            and src["total"] != "stderr time stamps":
        parts = [stages.get(k) for k in ("load", "encode", "unet_total", "decode")]
        if None not in parts and stages["total"] >= 0.98 * sum(parts):
            stages["total"] -= stages["load"]
            src["total"] += " minus the load"
    if "unet_steps" not in stages and "unet_total" in stages and evals:
        stages["unet_steps_mean_only"] = stages["unet_total"] / evals
        src["unet_steps"] = "mean of denoise time (per-step times not reported)"
    return stages, src


def run_altdiff(args, binary: Path, model_dir: Path, prompt: str, workdir: Path, label: str, evals: int) -> dict:
    image = workdir / f"{label}.png"
    json_ok = altdiff_supports(binary, "--json")
    cmd = [str(binary), "generate", "--model", str(model_dir), "--prompt", prompt, "--steps", str(args.steps),
           "--seed", str(args.seed), "--height", str(args.size), "--width", str(args.size), "--scheduler", "pndm",
           "--guidance", str(args.guidance), "--max-length", str(args.max_length), "--device", "cpu",
           "--dtype", args.dtype]
    if json_ok:
        cmd.append("--json")
    cmd += ["-v", "--output", str(image), *args.altdiff_arg]
    # -v plus the per-step debug lines of the generate command (cheap), in case --json lacks unet_steps_s.
    extra_env = {
        "RAYON_NUM_THREADS": str(args.threads),
        "OMP_NUM_THREADS": str(args.threads),
        "ALTDIFF_LOG": "altdiff=info,altdiff::commands::generate=debug",
        "NO_COLOR": "1",
    }
    env = dict(os.environ, **extra_env)
    r = run_timed(cmd, env, workdir, label)
    json_t, record = {}, None
    for line in r["stdout"].splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            record = obj
            json_t = obj.get("timings") or {}
    stages, src = altdiff_stages(json_t, r["stderr"], r["wall_s"], evals)
    stages["wall"] = r["wall_s"]
    stages["peak_rss"] = r["time"].get("peak_rss_gib")
    written = Path(record["path"]) if record and record.get("path") else image
    return {"stages": stages, "source": src, "json": record, "json_supported": json_ok, "time": r["time"],
            "machine": r["machine"], "image": written, "command": cmd, "env": extra_env,
            "timings_lines": [line for _, line in r["stderr"] if re.search(r"timings?(?: \([^)]*\))?:", line, re.I)],
            "kernels": next((line for _, line in r["stderr"] if "CPU kernels:" in line), None)}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
def image_diff(a: Path, b: Path) -> str:
    try:
        import numpy as np  # noqa: PLC0415
        from PIL import Image  # noqa: PLC0415

        x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
        y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
        if x.shape != y.shape:
            return f"shapes differ: {x.shape} vs {y.shape}"
        d = np.abs(x - y)
        return (f"max |diff| {int(d.max())}/255, mean {float(d.mean()):.3f}/255, "
                f"{float((d > 2).mean()):.2%} of values differ by more than 2")
    except Exception as e:  # noqa: BLE001  (informative only)
        return f"not compared ({e})"


def pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def combine(runs: list[dict]) -> dict:
    """Several runs of one side: median per stage, all UNet steps pooled, max peak RSS."""
    out: dict = {}
    keys = {k for r in runs for k in r["stages"]}
    for k in keys:
        vals = [r["stages"][k] for r in runs if r["stages"].get(k) is not None]
        if not vals:
            continue
        if k == "unet_steps":
            out[k] = [x for v in vals for x in v]
        elif k in ("peak_rss", ) :
            out[k] = max(vals)
        elif k == "json_unet_min":
            out[k] = min(vals)
        else:
            out[k] = statistics.median(vals)
    steps = out.get("unet_steps")
    if "json_unet_min" in out and "json_unet_median" in out and all("json_unet_min" in r["stages"] for r in runs):
        # The program's own per-step figures (median of the runs' medians when there are several).
        out["unet_min"], out["unet_median"] = out["json_unet_min"], out["json_unet_median"]
    elif steps:
        out["unet_min"] = min(steps)
        out["unet_median"] = statistics.median(steps)
    elif "unet_steps_mean_only" in out:
        out["unet_mean_only"] = out["unet_steps_mean_only"]
    return out


ROWS = [  # (key, label, unit)
    ("load", "load (weights, tokenizer, scheduler)", "s"),
    ("encode", "text encoding (cond + uncond)", "s"),
    ("unet_min", "UNet step with guidance, min", "s"),
    ("unet_median", "UNet step with guidance, median", "s"),
    ("unet_total", "denoising, all UNet steps", "s"),
    ("decode", "VAE decode", "s"),
    ("total", "generation total (encode + denoise + decode)", "s"),
    ("wall", "process wall time (start to exit)", "s"),
    ("peak_rss", "peak RSS (`/usr/bin/time -v`)", "GiB"),
]


def table(d: dict, a: dict, runs: int, dtype: str = "f32") -> list[str]:
    def fmt(v, unit):
        if v is None:
            return "n/a"
        return f"{v:.2f} GiB" if unit == "GiB" else f"{v:.2f} s"

    lines = ["| stage | diffusers | altdiff | altdiff / diffusers | target |", "| --- | ---: | ---: | ---: | ---: |"]
    for key, label, unit in ROWS:
        dv, av = d.get(key), a.get(key)
        note = ""
        if key in ("unet_min", "unet_median") and av is None and a.get("unet_mean_only") is not None:
            av, note = a["unet_mean_only"], " (mean)"
        ratio = f"{av / dv:.2f}x" if (dv and av is not None) else "n/a"
        targets = TARGETS[dtype]
        target = f"<= {targets[key]}x" if key in targets else ""
        lines.append(f"| {label} | {fmt(dv, unit)} | {fmt(av, unit)}{note} | {ratio} | {target} |")
    if runs > 1:
        lines.append(f"\n(median of {runs} runs per side; UNet min / median over all steps of all runs; peak RSS: max)")
    return lines


def altdiff_version(binary: Path) -> str:
    r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    return r.stdout.strip()


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def warm_cache(model_dir: Path) -> float:
    t = time.perf_counter()
    for f in sorted(model_dir.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    return time.perf_counter() - t


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_diffusers":
        diffusers_child(sys.argv[2:])
        return
    args = parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    model_dir = args.root / args.model
    prompt = args.prompt or PROMPTS[args.model]
    evals = args.steps + 1 if args.steps > 1 else 1  # PNDM (skip_prk_steps): N + 1 evaluations, 1 for N = 1

    if not (model_dir / "model_index.json").exists():
        log(f"{model_dir} missing: building it (fullsize.py make {args.model})")
        subprocess.run([sys.executable, str(FULLSIZE), "make", args.model, "--root", str(args.root)], cwd=REPO,
                       check=True, stdout=sys.stderr)

    binary, bin_info = None, {}
    if args.only != "diffusers" and not args.altdiff.exists():
        raise SystemExit(f"{args.altdiff} not found (cargo build --release)")

    def take_binary() -> Path:
        # Copied just before the first altdiff run (after the idle wait), so a build that was running
        # when the benchmark started has finished, and a later rebuild cannot replace it mid-run.
        BIN_DIR.mkdir(parents=True, exist_ok=True)
        src_stat = args.altdiff.stat()
        dst = BIN_DIR / f"altdiff-{os.getpid()}"
        shutil.copy2(args.altdiff, dst)
        bin_info.update(
            source=str(args.altdiff),
            mtime=dt.datetime.fromtimestamp(src_stat.st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            sha256=sha256(dst)[:16],
            version=altdiff_version(dst),
            json=altdiff_supports(dst, "--json"),
        )
        log(f"altdiff binary: {bin_info}")
        return dst

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="altdiff-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"reading {model_dir} once into the page cache ...")
    warm_s = warm_cache(model_dir)
    log(f"  {warm_s:.1f} s")

    gate = IdleGate(args.wait_idle)
    before, d_runs, a_runs, discarded = {}, [], [], []

    def measured(side: str, i: int, run) -> dict:
        """Runs one side; reruns it (up to --retries times) when others used the machine meanwhile."""
        for attempt in range(args.retries + 1):
            label = f"{side}-{i}" + (f"-retry{attempt}" if attempt else "")
            b = gate.wait(f"{label}")
            r = run(label)
            r["label"], r["before"] = label, b
            m = r["machine"]
            clean = not m["build_processes_seen"] and (m["other_cpu"] or 0) < 0.05
            if clean or attempt == args.retries:
                return r
            note = (f"{label}: discarded (other CPU {pct(m['other_cpu'])}, build processes "
                    f"{m['build_processes_seen'] or 'none'}, busy {m['busy_windows']} s into the run; its total "
                    f"{r['stages'].get('total', float('nan')):.1f} s)")
            log(note)
            discarded.append(note)
        raise AssertionError("unreachable")

    for i in range(args.runs):
        if args.only != "altdiff":
            d_runs.append(measured("diffusers", i, lambda label: run_diffusers(args, model_dir, prompt, workdir, label)))
        if args.only != "diffusers":
            if binary is None:
                gate.wait("copying the altdiff binary")
                binary = take_binary()
            a_runs.append(measured("altdiff", i, lambda label: run_altdiff(args, binary, model_dir, prompt, workdir,
                                                                          label, evals)))
    finished = dt.datetime.now(dt.timezone.utc)

    d = combine(d_runs) if d_runs else {}
    a = combine(a_runs) if a_runs else {}
    tab = table(d, a, args.runs, args.dtype)
    print("\n".join(tab))

    # ---------------------------------------------------------------- idleness
    idle_notes = []
    for r in d_runs + a_runs:
        m, b = r["machine"], r["before"]
        idle_notes.append(
            f"{r['label']}: before: build processes {b['busy_processes'] or 'none'}, other CPU "
            f"{b['other_cpu']:.0%}, loadavg {' '.join(b['loadavg'])}; during: CPU used outside the benchmark "
            f"{pct(m['other_cpu'])} of the machine, build processes seen {m['build_processes_seen'] or 'none'}"
            + (f" (busy {m['busy_windows']} s into the run)" if m["busy_windows"] else "")
            + f"; the process got {r['time'].get('cpu_percent', float('nan')):.0f} % CPU "
            f"(user {r['time'].get('user_s', 0):.0f} s, sys {r['time'].get('sys_s', 0):.0f} s)"
        )
    all_runs = d_runs + a_runs
    idle = not gate.forced and all(
        not r["machine"]["build_processes_seen"] and (r["machine"]["other_cpu"] or 0) < 0.05 for r in all_runs
    )
    print("\nmachine idle:", "yes" if idle else "NO", file=sys.stderr)
    for n in gate.forced + discarded + idle_notes:
        print("  " + n, file=sys.stderr)

    if args.no_write:
        return

    # ---------------------------------------------------------------- markdown
    mi = machine_info()
    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    versions = d_runs[0]["raw"]["versions"] if d_runs else {}
    cmd_line = ".venv/bin/python tools/bench/bench.py " + shlex.join(sys.argv[1:])
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in mi["flags"].items())
    lscpu = ", ".join(f"{k} {v}" for k, v in mi["lscpu"].items())
    md = [
        f"## {started.strftime('%Y-%m-%d %H:%M')} UTC: {args.model}, {args.size}x{args.size}, {args.steps} steps "
        f"(PNDM, {evals} UNet evaluations), {args.threads} threads, {'fp32' if args.dtype == 'f32' else 'bf16'} CPU",
        "",
        "**Random-weight models of the real architecture** (`tools/bench/fullsize.py make`: the real m9 / m18 "
        "configs and tensor shapes, random weights, the tiny fixture tokenizer). Times and memory are those "
        "of the real models; the images are not meaningful.",
        "",
        f"- Machine: {mi['cpu']} ({lscpu}); {mi['cores']} cores ({mi['affinity']} usable), "
        f"{mi['ram_gib']} GiB RAM; flags: {flags}; Linux {mi['kernel']}",
        f"- Idle: **{'yes' if idle else 'NO, see below'}** (no build processes before or during the runs and "
        "< 5 % of the CPU used by other processes is what counts as idle)",
        f"- Commit: `{commit}`{' (working tree has uncommitted changes to tracked files)' if dirty else ''}",
        f"- Command: `{cmd_line}`",
        f"- Started {started.strftime('%H:%M:%S')}, finished {finished.strftime('%H:%M:%S')} UTC; model files "
        f"read into the page cache first ({warm_s:.0f} s), so both sides load from memory",
    ]
    if versions:
        md.append("- diffusers side: " + ", ".join(f"{k} {v}" for k, v in versions.items())
                  + f", Python {platform.python_version()}; `torch.get_num_threads()` "
                  f"{d_runs[0]['raw']['threads']}, OMP_NUM_THREADS={args.threads}")
    if a_runs:
        if a_runs[0].get("kernels"):
            md.append("- altdiff's kernels: `" + ANSI.sub("", a_runs[0]["kernels"]).strip().removeprefix("INFO").strip()
                      + "`")
    if binary is not None:
        md.append(f"- altdiff side: `{bin_info['version']}`, binary `{bin_info['source']}` built "
                  f"{bin_info['mtime']} (sha256 {bin_info['sha256']}...), RAYON_NUM_THREADS={args.threads}")
    md += [
        f"- Case: prompt \"{prompt}\", seed {args.seed} (the same initial latents on both sides), guidance "
        f"{args.guidance}, pad length {args.max_length}, scheduler PNDM, {args.dtype} on both sides"
        + (" (diffusers: the three components converted with `.to(torch.bfloat16)` after loading, latents in "
           "bf16; altdiff: `--dtype bf16`)" if args.dtype == "bf16" else "") + ", CPU",
        "",
        *tab,
        "",
        "How each number is taken:",
        "",
        "- diffusers (a fresh Python process, `bench.py _diffusers`): load = the three `from_pretrained` calls "
        "plus tokenizer and scheduler (as `fullsize.py reference`); the stages are timed inside one "
        "`AltDiffusionPipeline.__call__` (`encode_prompt`, each `unet` forward, `vae.decode`); total = the "
        f"whole `__call__` (PIL output). Python + torch + diffusers import: "
        + (f"{d['startup']:.1f} s, in the process wall time only." if d.get("startup") is not None else "n/a."),
    ]
    if a_runs:
        srcs = a_runs[0]["source"]
        by_src: dict[str, list[str]] = {}
        for k, v in srcs.items():
            by_src.setdefault(v, []).append(k)
        envs = [f"{k}={v}" for k, v in a_runs[0]["env"].items() if k != "NO_COLOR"]
        md.append("- altdiff (`" + " ".join(envs) + " " + shlex.join(["altdiff", *a_runs[0]["command"][1:]])
                  + "`, under `/usr/bin/time -v`): "
                  + "; ".join(f"{', '.join(ks)} from {v}" for v, ks in by_src.items())
                  + ". Stderr time stamps are taken by the benchmark as the lines arrive (load = process start "
                  "to the `encode` line, decode = `decode` line to process exit); the `ALTDIFF_LOG` filter is "
                  "`-v` plus the generate command's `step i/n` debug lines.")
        if a_runs[0]["timings_lines"]:
            md.append("- altdiff's own summary: `" + a_runs[0]["timings_lines"][-1].strip() + "`")
        if a_runs[0]["json"]:
            md.append("- altdiff `--json` timings: `" + json.dumps(a_runs[0]["json"].get("timings")) + "`")
    if d_runs:
        md.append("- diffusers per UNet evaluation: " + ", ".join(f"{x:.2f}" for x in d_runs[0]["stages"]["unet_steps"]) + " s")
    if a_runs and a_runs[0]["stages"].get("unet_steps"):
        md.append("- altdiff per UNet evaluation (" + a_runs[0]["source"].get("unet_steps", "?") + "): " + ", ".join(f"{x:.2f}" for x in a_runs[0]["stages"]["unet_steps"]) + " s")
    if d_runs and a_runs:
        md.append(f"- Images (same latents, random weights): {image_diff(d_runs[0]['image'], a_runs[0]['image'])}")
    if args.dtype == "bf16" and args.f32_images:
        # Each side's deviation from its own fp32 image (same case, --keep of an f32 run).
        for side, runs in (("diffusers", d_runs), ("altdiff", a_runs)):
            ref = args.f32_images / f"{side}-0.png"
            if runs and ref.exists():
                md.append(f"- bf16 vs fp32, {side}: {image_diff(ref, runs[0]['image'])}")
    md.append("- Machine state per run:")
    md += [f"  - {n}" for n in gate.forced + discarded + idle_notes]
    md.append("")

    out = args.out
    if not out.exists():
        out.write_text(
            "# Benchmarks\n\n"
            "altdiff against PyTorch / diffusers on the CPU, same machine, same run. Made with "
            "`tools/bench/bench.py` (see `tools/bench/README.md`). All models here are **random-weight "
            "models of the real architectures** (`tools/bench/fullsize.py make`), not the released "
            "checkpoints: speed and memory are those of the real models, the images are noise. Ratios are "
            "altdiff / diffusers (below 1: altdiff is faster or smaller); targets from issue 6.\n\n"
        )
    with open(out, "a", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    log(f"appended to {out}")
    if binary is not None:
        binary.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
