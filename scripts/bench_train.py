"""Training throughput: ``cliptune-train`` against ``python -m open_clip_train.main`` on the same work.

    python scripts/bench_train.py --preset cpu                 # tiny64 on CPU, ~4 min on 2 cores
    python scripts/bench_train.py --preset cpu --reps 1 --steps 30   # a quick look
    python scripts/bench_train.py --preset cpu --no-trim       # cliptune without text-padding trimming
    python scripts/bench_train.py --preset gpu                 # ViT-B/32 and ViT-B/16, bf16, compile off/on
    python scripts/bench_train.py --preset gpu --models ViT-B-32 --compile off --reps 1   # ~3 min

The same work: both trainers read the same WebDataset shards (synthetic image/caption pairs of
``cliptune.data.synthetic`` written with cliptune's writer, ``cliptune.data.writer.build_shards``, jpg +
txt + json per sample, at the preset's image size), train the same open_clip model config from scratch
(CPU: cliptune's ``model=tiny64``, registered for open_clip_train with ``open_clip.add_model_config``,
for which it has no flag; GPU: open_clip's ViT-B-32 / ViT-B-16) with the same batch, loader workers,
torch threads, precision, optimiser (AdamW lr 5e-4, weight decay 0.2, betas 0.9/0.98, eps 1e-6, 100
warm-up steps, gradient norm clipped at 1), resampled shards with a 5,000-sample shuffle buffer, and
the same number of steps, logging every 10 steps, without evaluation or mid-run checkpoints.

Each run is its own process: ``python scripts/bench_train.py --child SPEC`` runs the trainer's own entry
point (``cliptune.train.cli.main`` as ``cliptune-train``; ``open_clip_train.main.main``) after a prelude
that registers the model config, applies the one-line webdataset 1.0 fix open_clip's reader needs (see
scripts/bench_loader.py), times every optimiser step with a global ``torch.optim`` post-step hook (the
same clock for both, whatever each logs), reads the CPU time of the process and its loader workers at
the two ends of the measured window, and writes the peak memory at exit.

Steady state: the first ``--warmup`` steps (start-up, compilation, shuffle-buffer fill) are left out;
samples/s = the samples of the remaining steps / the time from the end of step ``warmup`` to the end of
the last step (on CUDA the device is synchronised at those two steps only). samples per CPU second =
the same samples / the CPU time of the trainer and its workers over that window: on a machine shared
with other work it moves much less than wall-clock time. Repetitions alternate which trainer runs
first; the ratio is taken per repetition and the table shows its median and range (min-max).

On the 2-core CPU preset each trainer runs one torch thread (``OMP_NUM_THREADS=1``): with two threads
on two shared cores every parallel region waits for the thread another process preempted, and steps
took 1-11 s instead of 0.3-0.6 s. The loader has 2 workers.

Peak memory: the trainer process's peak RSS (``ru_maxrss``, loader workers not included) on CPU,
``torch.cuda.max_memory_allocated`` on GPU. MFU = samples/s x model FLOPs per sample / peak FLOP/s, with
FLOPs per sample counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward of
the model and open_clip's loss on the meta device, at the full text context (cliptune leaves out text
padding its causal tower never reads, so its MFU counts some FLOPs it does not run; ``--no-trim``
measures without that); the peak is a 2048^3 fp32 matmul measured here on as many threads on CPU, and
the dense bf16 (or TF32) peak of an H100/H200 SXM on GPU (``--peak-tflops`` for another device).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPLS = ("cliptune", "open_clip")

# Dense peaks of H100 / H200 SXM (NVIDIA datasheets; the two chips share the compute): TFLOP/s.
GPU_PEAK_TFLOPS = {"bf16": 989.4, "fp32": 494.7}  # fp32 = TF32 tensor cores (open_clip_train turns TF32 on)

PRESETS: dict[str, dict] = {
    "cpu": {
        "device": "cpu",
        "models": ["tiny64"],
        "image_size": 64,
        "batch": 64,
        "workers": 2,
        "precision": "fp32",
        "threads": 1,  # torch threads per trainer: with 2 threads on 2 shared cores, every step waits for the slower
        "steps": 60,
        "warmup": 10,
        "reps": 3,
        "compile": ["off"],
        "num_samples": 2000,
        "shard_size": 250,
    },
    "gpu": {
        "device": "cuda",
        "models": ["ViT-B-32", "ViT-B-16"],
        "image_size": 224,
        "batch": 256,
        "workers": 12,  # of 16 cores: 224 px decoding and augmentation must keep up with the GPU
        "precision": "bf16",
        "threads": None,  # torch's default
        "steps": 120,
        "warmup": 30,
        "reps": 2,
        "compile": ["off", "on"],
        "num_samples": 8192,
        "shard_size": 512,
    },
}

# The model presets of cliptune whose config lives in configs/model (not in open_clip's registry).
CLIPTUNE_PRESETS = {"tiny64": "cliptune-tiny64", "tiny": "cliptune-tiny"}


# ----------------------------------------------------------------------------- the work both sides do
def preset_arch(preset: str) -> dict:
    """The open_clip model config of a cliptune model preset (``configs/model/<preset>.yaml``)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cliptune.cli import CONFIG_PACKAGE
    from cliptune.config import register_configs, register_resolvers

    register_resolvers()  # what train.yaml names, as cliptune-train registers them
    register_configs()
    with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={preset}"])
    return OmegaConf.to_container(cfg.model.arch, resolve=True)


def write_shards(out: Path, num_samples: int, image_size: int, shard_size: int, seed: int = 0) -> str:
    """Synthetic pairs (``cliptune.data.synthetic``: a coloured square per concept, captions naming it)
    written as cliptune shards (jpg + txt + json per sample, read by both trainers); returns a brace
    pattern of the training shards."""
    import io
    import zlib

    from cliptune.data.writer import ShardSettings, build_shards
    from cliptune.data.synthetic import N_CONCEPTS, caption, render

    rows = []
    for i in range(num_samples):
        h = zlib.crc32(f"{seed}/{i}".encode())
        buf = io.BytesIO()
        render(h % N_CONCEPTS, h, size=image_size).save(buf, format="JPEG", quality=90)  # stored as is
        rows.append({"image": buf.getvalue(), "caption": caption(h % N_CONCEPTS, h // N_CONCEPTS)})
    index = build_shards(rows, out, ShardSettings(split="train", image_size=0, image_format="jpg", quality=90,
                         shard_size=shard_size, workers=min(8, os.cpu_count() or 1), progress=False,
                         summary=False))["train"]
    n = len(index["shards"])
    return str(out / f"train-{{000000..{n - 1:06d}}}.tar")


def model_name(model: str) -> str:
    """The open_clip registry name both trainers are given."""
    return CLIPTUNE_PRESETS.get(model, model)


def cliptune_argv(case: dict, run_root: Path, name: str) -> list[str]:
    steps, batch = case["steps"], case["batch"]
    if case["model"] in CLIPTUNE_PRESETS:
        model = [f"model={case['model']}"]
    else:  # an open_clip architecture, trained from scratch with the pre-training optimiser values
        model = ["model=open_clip", f"model.name={case['model']}", "model.pretrained=null", "optim=adamw"]
    return [
        *model,
        "data=wds", f"data.train=\"{case['shards']}\"", f"data.workers={case['workers']}",
        f"data.samples_per_epoch={steps * batch}", "data.sample_shuffle=5000",
        f"batch_size={batch}",
        "trainer=" + ("gpu" if case["device"] == "cuda" else "cpu"),
        "trainer.precision=" + ("bf16-mixed" if case["precision"] == "bf16" else "32-true"),
        f"trainer.max_steps={steps}", "trainer.log_every_n_steps=10",
        "optim.lr=5e-4", "optim.weight_decay=0.2", "optim.warmup_steps=100", "optim.grad_clip=1.0",
        f"compile={str(case['compile'] == 'on').lower()}",
        "eval.before=false", "eval.after=false", "export=false", "export_start=false",
        "checkpoint_every=100000", "seed=0",
        f"out_root={run_root}", f"name={name}",
    ]


def open_clip_argv(case: dict, run_root: Path, name: str) -> list[str]:
    argv = [
        "--train-data", case["shards"], "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(case["steps"] * case["batch"]),
        "--batch-size", str(case["batch"]), "--workers", str(case["workers"]), "--epochs", "1",
        "--model", model_name(case["model"]),
        "--precision", "amp_bf16" if case["precision"] == "bf16" else "fp32",
        "--lr", "5e-4", "--wd", "0.2", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--warmup", "100", "--grad-clip-norm", "1.0",
        "--log-every-n-steps", "10", "--logs", str(run_root), "--name", name, "--seed", "0",
    ]
    if case["compile"] == "on":
        argv.append("--torchcompile")
    return argv


# ----------------------------------------------------------------------------- one run, in its own process
def _child(spec: dict) -> None:
    """The prelude, then the trainer's own entry point.

    The prelude times every optimiser step of the process (a global ``torch.optim`` post-step hook: the
    same clock for both trainers, whatever each logs) and records the peak memory at exit."""
    import atexit
    import resource

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import psutil

    pid = os.getpid()
    ends: list[float] = []  # perf_counter at the end of each optimiser step
    cpu: list[list[float]] = []  # [main process, its DataLoader workers] CPU seconds at the window's ends
    cuda = spec["device"] == "cuda"
    me = psutil.Process()

    def cpu_seconds() -> list[float]:
        main = me.cpu_times()
        workers = 0.0
        for child in me.children(recursive=True):
            try:
                t = child.cpu_times()
                workers += t.user + t.system
            except psutil.Error:
                pass
        return [main.user + main.system, workers]

    def on_step(optimizer, args, kwargs) -> None:
        window_end = len(ends) + 1 in (spec["warmup"], spec["steps"])
        if window_end and cuda:
            torch.cuda.synchronize()  # the two clock readings the rate is taken between see finished work
        ends.append(time.perf_counter())
        if window_end:
            cpu.append(cpu_seconds())

    def report() -> None:
        if os.getpid() != pid:  # a forked DataLoader worker
            return
        out = {"step_ends": ends, "window_cpu_s": cpu,
               "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        Path(spec["report"]).write_text(json.dumps(out))

    register_optimizer_step_post_hook(on_step)
    atexit.register(report)
    if spec["impl"] == "cliptune":
        if not spec.get("trim_text", True):  # --no-trim: what cliptune costs without leaving out text padding
            import functools

            from cliptune.train import module

            # (a partialmethod keeps the signature Lightning's save_hyperparameters reads)
            module.ContrastiveModule.__init__ = functools.partialmethod(module.ContrastiveModule.__init__,
                                                                        trim_text_padding=False)
        sys.argv = ["cliptune-train", *spec["argv"]]
        from cliptune.train.cli import main

        main()
        return
    import open_clip

    if spec.get("arch") is not None:
        path = Path(spec["report"]).with_name(f"{spec['model_name']}.json")
        path.write_text(json.dumps(spec["arch"]))
        open_clip.add_model_config(path)
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander, url_opener

    def tarfile_to_samples_nothrow(src, handler=ocd.log_and_continue):
        # open_clip pins webdataset<=0.2.86; 1.0 ends each shard with a {} marker that its grouping
        # fails on (webdataset issue 384, open_clip issue 935): the fix given there, eof_value=None
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, eof_value=None)
        return ocd.group_by_keys_nothrow(files, handler=handler)

    ocd.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
    from open_clip_train.main import main

    main(spec["argv"])


def steady_rate(step_ends: list[float], batch: int, warmup: int) -> float:
    """samples/s of the steps after ``warmup``: their samples over the time from the end of step ``warmup``
    to the end of the last step."""
    if len(step_ends) <= warmup or warmup < 1:
        raise ValueError(f"{len(step_ends)} steps timed: need more than warmup={warmup} (>= 1)")
    return batch * (len(step_ends) - warmup) / (step_ends[-1] - step_ends[warmup - 1])


def median_step_rate(step_ends: list[float], batch: int, warmup: int) -> float:
    """batch / the median step time after ``warmup`` (less moved by bursts of load than the mean)."""
    times = [b - a for a, b in zip(step_ends[warmup - 1:], step_ends[warmup:])]
    return batch / statistics.median(times)


def run_one(impl: str, case: dict, work: Path, tag: str, timeout: float) -> dict:
    run_root = work / "runs"
    name = f"{impl}-{tag}"
    argv = cliptune_argv(case, run_root, name) if impl == "cliptune" else open_clip_argv(case, run_root, name)
    report = work / f"{name}.report.json"
    report.unlink(missing_ok=True)
    shutil.rmtree(run_root / name, ignore_errors=True)  # a kept --workdir: start each run afresh
    spec = {"impl": impl, "argv": argv, "report": str(report), "model_name": model_name(case["model"]),
            "arch": case.get("arch"), "device": case["device"], "steps": case["steps"], "warmup": case["warmup"],
            "trim_text": case.get("trim_text", True)}
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    if case.get("threads"):
        env.update(OMP_NUM_THREADS=str(case["threads"]), MKL_NUM_THREADS=str(case["threads"]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=work)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not report.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{impl} run failed (exit {proc.returncode}):\n{tail}")
    rep = json.loads(report.read_text())
    ends, cpu = rep.pop("step_ends"), rep.pop("window_cpu_s")
    # open_clip_train rounds its schedule up to whole epochs: it may run a few steps past ours
    if len(ends) < case["steps"] or len(cpu) != 2:
        raise RuntimeError(f"{impl}: {len(ends)} optimiser steps timed, expected {case['steps']}")
    ends = ends[: case["steps"]]
    b, k = case["batch"], case["warmup"]
    samples = b * (case["steps"] - k)
    main_cpu, worker_cpu = cpu[1][0] - cpu[0][0], cpu[1][1] - cpu[0][1]
    return {"samples_per_s": steady_rate(ends, b, k), "median_step_samples_per_s": median_step_rate(ends, b, k),
            "samples_per_cpu_s": samples / (main_cpu + worker_cpu), "main_cpu_s": main_cpu, "worker_cpu_s": worker_cpu,
            "wall_s": wall, **rep}


# ----------------------------------------------------------------------------- FLOPs and the peak
def flops_per_sample(model: str, arch: dict | None, batch: int, image_size: int) -> float:
    """Forward + backward FLOPs of the model and open_clip's ClipLoss per sample (FlopCounterMode), counted
    on the meta device (shapes only) at the benchmark's batch."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    name = model_name(model)
    if arch is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(arch))
            open_clip.add_model_config(path)
    with torch.device("meta"):
        net = open_clip.create_model(name, output_dict=True, device="meta")
    cfg = open_clip.get_model_config(name)
    ctx = cfg["text_cfg"].get("context_length", 77)
    images = torch.randn(batch, 3, image_size, image_size, device="meta")
    texts = torch.zeros(batch, ctx, dtype=torch.long, device="meta")
    loss_fn = open_clip.loss.ClipLoss()
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
    return counter.get_total_flops() / batch


def cpu_peak_flops(threads: int | None = None, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` fp32 [n, n] @ [n, n] matmuls on ``threads`` torch threads."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: str, precision: str, override_tflops: float | None, threads: int | None) -> tuple[float, str]:
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (given)"
    if device == "cpu":
        p = cpu_peak_flops(threads)
        return p, f"{p / 1e9:.0f} GFLOP/s (fp32 2048^3 matmul on {threads or 'all'} thread(s), measured here)"
    import torch

    gpu = torch.cuda.get_device_name()
    if not any(k in gpu for k in ("H100", "H200")):
        raise SystemExit(f"no peak FLOP/s known for {gpu!r}: pass --peak-tflops")
    p = GPU_PEAK_TFLOPS[precision] * 1e12
    return p, f"{GPU_PEAK_TFLOPS[precision]:g} TFLOP/s ({gpu}, dense {precision})"


# ----------------------------------------------------------------------------- the table
def spread(xs: list[float], fmt: str) -> str:
    med = statistics.median(xs)
    return f"{med:{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})" if len(xs) > 1 else f"{med:{fmt}}"


def summarise(case: dict, results: dict[str, list[dict]], flops: float, peak: float) -> dict:
    ct, oc = results["cliptune"], results["open_clip"]
    mem_key = "cuda_max_allocated_mib" if case["device"] == "cuda" else "max_rss_mib"
    row = {"model": case["model"], "compile": case["compile"], "batch": case["batch"], "flops_per_sample": flops,
           "ratio": [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(ct, oc)],
           "cpu_ratio": [a["samples_per_cpu_s"] / b["samples_per_cpu_s"] for a, b in zip(ct, oc)]}
    for impl, res in results.items():
        rates = [r["samples_per_s"] for r in res]
        row[impl] = {"samples_per_s": rates, "samples_per_cpu_s": [r["samples_per_cpu_s"] for r in res],
                     "median_step_samples_per_s": [r["median_step_samples_per_s"] for r in res],
                     "peak_mib": max(r.get(mem_key, float("nan")) for r in res),
                     "mfu": statistics.median(rates) * flops / peak, "wall_s": [r["wall_s"] for r in res]}
    return row


def print_table(rows: list[dict], device: str) -> None:
    mem = "peak CUDA MiB" if device == "cuda" else "peak RSS MiB"
    head = (f"{'model':>9} {'compile':>7} | {'cliptune samples/s':>22} {'open_clip samples/s':>22} | "
            f"{'ratio':>18} | {'ratio per CPU-s':>18} | {mem + ' ct / oc':>21} | {'MFU ct / oc':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ct, oc = r["cliptune"], r["open_clip"]
        print(f"{r['model']:>9} {r['compile']:>7} | {spread(ct['samples_per_s'], '.1f'):>22} "
              f"{spread(oc['samples_per_s'], '.1f'):>22} | {spread(r['ratio'], '.2f'):>18} | "
              f"{spread(r['cpu_ratio'], '.2f'):>18} | {ct['peak_mib']:>9.0f} / {oc['peak_mib']:<9.0f} | "
              f"{100 * ct['mfu']:>5.1f}% / {100 * oc['mfu']:.1f}%")
    print("ratio = cliptune / open_clip training samples/s (wall clock), per repetition: median (min-max); "
          "per CPU-s: samples per CPU second of the trainer and its loader workers (hardly moved by other load)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--models", nargs="+", help="models (cliptune presets tiny64/tiny or open_clip names)")
    p.add_argument("--compile", nargs="+", choices=["off", "on"], help="torch.compile settings to run")
    p.add_argument("--batch", type=int, help="batch size per device")
    p.add_argument("--workers", type=int, help="DataLoader workers per device")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--warmup", type=int, help="steps left out at the start of each run")
    p.add_argument("--threads", type=int, help="torch threads per trainer (OMP_NUM_THREADS; 0: torch's default)")
    p.add_argument("--reps", type=int, help="repetitions (alternating which trainer runs first)")
    p.add_argument("--no-trim", action="store_true",
                   help="cliptune without leaving out the text padding its causal text tower never reads")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s of the device, in TFLOP/s, for MFU")
    p.add_argument("--shards", help="a shard pattern to read instead of writing synthetic shards")
    p.add_argument("--workdir", help="keep shards and runs here (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return

    cfg = dict(PRESETS[args.preset])
    for key in ("models", "compile", "batch", "workers", "threads", "steps", "warmup", "reps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["warmup"] >= cfg["steps"]:
        raise SystemExit(f"--warmup {cfg['warmup']} must be below --steps {cfg['steps']}")
    if cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--preset gpu needs a CUDA device")
    peak, peak_text = peak_flops(cfg["device"], cfg["precision"], args.peak_tflops, cfg["threads"])

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        shards = args.shards
        if shards is None:
            t = time.perf_counter()
            shards = write_shards(work / "shards", cfg["num_samples"], cfg["image_size"], cfg["shard_size"])
            print(f"wrote {cfg['num_samples']} synthetic {cfg['image_size']} px samples in "
                  f"{time.perf_counter() - t:.1f} s: {shards}")
        print(f"device {cfg['device']}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              f"batch {cfg['batch']}, workers {cfg['workers']}, threads {cfg['threads'] or 'default'}, "
              f"{cfg['precision']}, {cfg['steps']} steps "
              f"({cfg['warmup']} warm-up left out), {cfg['reps']} repetitions"
              f"{'; cliptune without text trimming' if args.no_trim else ''}; peak {peak_text}", flush=True)
        rows = []
        for model in cfg["models"]:
            arch = preset_arch(model) if model in CLIPTUNE_PRESETS else None
            flops = flops_per_sample(model, arch, cfg["batch"], cfg["image_size"])
            print(f"{model}: {flops / 1e9:.3f} GFLOPs per sample (forward + backward)", flush=True)
            for comp in cfg["compile"]:
                shared = ("device", "batch", "workers", "precision", "threads", "steps", "warmup")
                case = {**{k: cfg[k] for k in shared},
                        "model": model, "arch": arch, "compile": comp, "shards": shards, "trim_text": not args.no_trim}
                results: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
                for rep in range(cfg["reps"]):
                    for impl in (IMPLS if rep % 2 == 0 else IMPLS[::-1]):
                        res = run_one(impl, case, work, f"{model}-{comp}-{rep}", args.timeout)
                        results[impl].append(res)
                        print(f"  rep {rep} {impl:9s} {model} compile={comp}: {res['samples_per_s']:8.1f} samples/s, "
                              f"{res['samples_per_cpu_s']:7.1f} samples/CPU-s (main {res['main_cpu_s']:.1f} + "
                              f"workers {res['worker_cpu_s']:.1f} CPU s; run {res['wall_s']:.0f} s, "
                              f"load {os.getloadavg()[0]:.1f})", flush=True)
                rows.append(summarise(case, results, flops, peak))
        print()
        print_table(rows, cfg["device"])
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        if args.json:
            Path(args.json).write_text(json.dumps({"preset": args.preset, "config": cfg, "peak": peak_text,
                                                   "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
