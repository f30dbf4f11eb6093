"""The prepared GPU check (run by ``benchmarks/device_check.sh``): the parts of megatron that only a CUDA device
exercises — mixed precision (bf16 autocast, fp16 autocast + gradient scaler), the learners on CUDA, two
processes sharing one GPU — each checked against its fp32 / single-process reference, with the numbers written
to JSON.

Parts (``python benchmarks/device_check.py <part> --out DIR [--cpu-only]``):

- ``amp``: every learner (maml second and first order, anil, reptile, proto, finetune, incremental) on YOLOX-tiny,
  a few meta-steps from the same weights on the same synthetic episodes with ``amp`` off, ``bf16`` and ``fp16``
  (fp16 with ``torch.amp.GradScaler``, as the runner sets it up), plus two fp32 *controls* on imperceptibly
  perturbed images. Checks: every loss finite; the weights moved (so the fp16 scaler did not skip every step);
  fp16: the scaler's scale finite and positive after the steps; mixed precision close to fp32 — the first
  meta-step's loss (same weights, same episodes) and the fp32 held-out loss of the final weights within
  :data:`TOLERANCE` of the fp32 run, measured against the controls' spread. Gradient and update cosines are
  reported.
- ``distributed``: two processes on one device train the cases of ``tests/dist_workers.LEARNER_CASES`` (the tiny
  detector, 3 outer steps, global meta-batch 4, each rank decoding only its share) with backend ``nccl``
  (falling back to ``gloo`` when NCCL refuses two ranks on one GPU); checks that the ranks hold bit-identical
  weights and end where one process ends (float tolerance).
- ``data``: the train-step rates the loader must feed (YOLOX-tiny/-s, a Reptile meta-step), the loader's rate
  with this machine's cores, and the share of a training loop's time spent waiting for data
  (``benchmarks/device_data.py``; goal: under 5 %).
- ``summary``: one ``summary.md`` from the parts' JSON (and the learner benchmark's, when present).

``--cpu-only`` runs the same code paths on the CPU at a small input size and says what it skipped: fp16 (the
runner falls back to bf16 without CUDA), NCCL, and everything timed on CUDA. It is how the check is tested
without a GPU (``tests/test_device_check.py``); its numbers are not GPU numbers.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny detector and the blobs tasks of the distributed check

#: how far a mixed-precision run may end from the fp32 run (same weights, same episodes), as a relative difference
#: of the first meta-step's loss and of the fp32 held-out loss of the final weights: at most ``times_control`` x
#: the larger difference the two controls make (fp32 on images moved by up to one gray level, the size of a bf16
#: rounding step of a bright pixel), or ``floor``. An untrained YOLOX's gradient direction changes with such a perturbation alone (cosine ~0.2 on
#: CPU), so gradient and update cosines are reported, not checked.
TOLERANCE = {"times_control": 3.0, "floor": 0.05}
LEARNERS = ("maml", "maml-fo", "anil", "reptile", "proto", "finetune", "incremental")


# --- helpers ----------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def environment(device: torch.device) -> dict:
    info = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform(), "python": platform.python_version(),
            "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                     "bf16_supported": torch.cuda.is_bf16_supported(),
                     "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None})
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write(out: Path, name: str, record: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return path


# --- amp -------------------------------------------------------------------------------------------------
def build(name: str, det, ctx):
    from bench_learners import build_learner

    if name == "incremental":
        from megatron_plugins.learners.incremental import Incremental

        return Incremental(det, None, ctx)
    return build_learner(name, det, ctx)


def flat_params(det) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in det.parameters()])


def flat_grads(det) -> torch.Tensor:
    return torch.cat([(p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)).flatten()
                      for p in det.parameters()])


def perturbed(episodes, gray_levels: float = 1.0, seed: int = 5):
    """The episodes with every pixel moved by up to ``gray_levels`` (uniform, of 255): the size of a bf16
    rounding step of a bright pixel, and invisible. An fp32 run on them is the control of the amp runs."""
    from megatron.types import Batch, Episode

    g = torch.Generator().manual_seed(seed)

    def shake(b: Batch) -> Batch:
        noise = (torch.rand(b.images.shape, generator=g) * 2 - 1).to(b.images.device) * gray_levels
        return Batch(images=(b.images + noise).clamp(0, 255), boxes=b.boxes, labels=b.labels, meta=b.meta)

    return [Episode(e.task_name, shake(e.support), shake(e.query), e.categories, e.label_map) for e in episodes]


def part_amp(device: torch.device, size: int, steps: int, learners: list[str], out: Path, cpu_only: bool) -> dict:
    from bench_detector import make_batch
    from bench_learners import GRAD_CLIP, INNER_LR, NUM_CLASSES, OUTER_LR, make_episodes
    from megatron.api.learner import LearnerContext
    from megatron_plugins.detectors.yolox import YOLOX

    # the controls: fp32 on imperceptibly perturbed images (two draws), the noise floor of the comparison
    amps = ["off", "control1", "control2"]
    skipped = []
    if device.type == "cpu" or torch.cuda.is_bf16_supported():
        amps.append("bf16")
    else:
        skipped.append("bf16: this GPU does not support it")
    if device.type == "cuda":
        amps.append("fp16")
    else:
        skipped.append("fp16 + GradScaler: needs CUDA (the runner uses bf16 on the CPU instead)")
    torch.manual_seed(0)
    base = YOLOX(NUM_CLASSES, size).to(device).train()
    theta0 = flat_params(base)
    episodes = make_episodes(2, 4, 4, size, device)
    shaken = {"control1": perturbed(episodes, seed=5), "control2": perturbed(episodes, seed=6)}
    held = make_batch(4, size, NUM_CLASSES, device, seed=999)

    def run_one(name: str, amp: str) -> dict:
        det = copy.deepcopy(base).train()
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        ctx = LearnerContext(device=device, amp="off" if amp.startswith("control") else amp, scaler=scaler, inner_steps=2,
                             inner_lr=INNER_LR, outer_lr=OUTER_LR, outer_optimizer="adam", grad_clip=GRAD_CLIP)
        learner = build(name, det, ctx)
        learner.set_progress(0.0)
        data = shaken.get(amp, episodes)
        losses, scales = [], []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        for step in range(steps):
            losses.append(float(learner.meta_step(data)["loss"]))
            scales.append(float(scaler.get_scale()) if scaler is not None else None)
            if step == 0:  # the gradient the first step applied (unscaled; clipping keeps its direction)
                grad = flat_grads(det)
        sync(device)
        row = {"learner": name, "amp": amp, "seconds_per_meta_step": (time.perf_counter() - t0) / steps}
        if device.type == "cuda":
            row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        update = flat_params(det) - theta0
        with torch.no_grad():  # fp32, functional (BatchNorm statistics untouched): the quality of the weights
            eval_loss = float(det.loss(held, params={})["loss"])
        row.update(losses=losses, scales=scales, eval_loss=eval_loss, update_norm=float(update.norm()),
                   update_finite=bool(torch.isfinite(update).all()), _update=update, _grad=grad)
        return row

    rows, failures = [], []
    for name in learners:
        ref, controls = None, []
        for amp in amps:
            try:
                row = run_one(name, amp)
                problems = []
                if not all(v == v and abs(v) != float("inf") for v in row["losses"] + [row["eval_loss"]]):
                    problems.append("a loss is not finite")
                if not (row["update_norm"] > 0 and row["update_finite"]):
                    problems.append("the weights did not move (or moved to inf/nan)")
                if row["scales"][-1] is not None and not (0 < row["scales"][-1] < float("inf")):
                    problems.append(f"the fp16 scaler's scale is {row['scales'][-1]}")
                if amp == "off":
                    ref = row
                elif ref is not None:
                    for key, value in (("first_loss", row["losses"][0]), ("eval_loss", row["eval_loss"])):
                        base_value = ref["losses"][0] if key == "first_loss" else ref["eval_loss"]
                        row[f"{key}_rel_diff"] = abs(value - base_value) / abs(base_value)
                    row["update_cosine"] = cosine(row["_update"], ref["_update"])
                    row["first_grad_cosine"] = cosine(row["_grad"], ref["_grad"])
                    if amp.startswith("control"):
                        controls.append(row)
                    else:
                        for key in ("first_loss", "eval_loss"):
                            noise = max((c[f"{key}_rel_diff"] for c in controls), default=0.0)
                            allowed = max(TOLERANCE["floor"], TOLERANCE["times_control"] * noise)
                            row[f"{key}_allowed"] = allowed
                            if row[f"{key}_rel_diff"] > allowed:
                                problems.append(f"{key.replace('_', ' ')} {row[f'{key}_rel_diff']:.2%} from fp32's "
                                                f"(allowed {allowed:.2%})")
                row["ok"] = not problems
                row["problems"] = problems
            except Exception as exc:  # noqa: BLE001 - a failing learner is a finding; the others still run
                row = {"learner": name, "amp": amp, "ok": False, "problems": [f"{type(exc).__name__}: {exc}"],
                       "traceback": traceback.format_exc()}
            if not row["ok"]:
                failures.append(f"{name} amp={amp}: {'; '.join(row['problems'])}")
            print(f"  {name:12s} amp={amp:8s} {'ok' if row['ok'] else 'FAIL ' + '; '.join(row['problems'])}"
                  + (f"  loss {row['losses'][0]:.4f} -> {row['losses'][-1]:.4f}" if row.get("losses") else "")
                  + (f"  (vs fp32: first {row['first_loss_rel_diff']:.2%}, held-out {row['eval_loss_rel_diff']:.2%})"
                     if "first_loss_rel_diff" in row else ""), flush=True)
            rows.append(row)
    for row in rows:
        row.pop("_update", None), row.pop("_grad", None)
    record = {"part": "amp", "environment": environment(device), "cpu_only": cpu_only, "input_size": size,
              "meta_steps": steps, "inner_steps": 2, "meta_batch": 2, "support": 4, "query": 4, "amps": amps,
              "skipped": skipped, "tolerance": TOLERANCE, "rows": rows, "failures": failures, "ok": not failures}
    write(out, "amp.json", record)
    return record


#: how far a family's meta-step loss under mixed precision may be from fp32's: relative, plus an absolute floor
#: (RTMDet's quality focal loss starts near 0.01 from random weights, where a relative bound alone means nothing)
FAMILY_LOSS_TOLERANCE = 0.05
FAMILY_LOSS_ATOL = 0.01


def _family_row(family: str, base, amp: str, episode, device: torch.device, ref: float | None) -> dict:
    """One MAML meta-step of a copy of ``base`` under ``amp`` (first order where the family cannot go second),
    its loss compared with fp32's ``ref``."""
    from megatron.api.detector import CAPABILITY_SECOND_ORDER
    from megatron.api.learner import LearnerContext
    from megatron_plugins.detectors.mmdet import MMDet
    from megatron_plugins.learners.maml import MAML

    first_order = CAPABILITY_SECOND_ORDER in MMDet.unsupported(base.options)
    row = {"family": family, "amp": amp, "first_order": first_order}
    try:
        det = copy.deepcopy(base).train()
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        ctx = LearnerContext(device=device, amp=amp, scaler=scaler, inner_steps=1, inner_lr=1e-3, outer_lr=1e-4)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        torch.manual_seed(1)
        loss = float(MAML(det, MAML.Options(first_order=first_order), ctx).meta_step([episode])["loss"])
        sync(device)
        row.update(loss=loss, seconds=time.perf_counter() - t0)
        if device.type == "cuda":
            row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        problems = [] if loss == loss and abs(loss) != float("inf") else ["the loss is not finite"]
        if amp != "off" and ref is not None and not problems:
            row["loss_rel_diff"] = abs(loss - ref) / max(abs(ref), 1e-12)
            allowed = FAMILY_LOSS_TOLERANCE * abs(ref) + FAMILY_LOSS_ATOL
            if abs(loss - ref) > allowed:
                problems.append(f"loss {loss:.4g} vs fp32's {ref:.4g}: {abs(loss - ref):.3g} apart (allowed {allowed:.3g} "
                                f"= {FAMILY_LOSS_TOLERANCE:.0%} + {FAMILY_LOSS_ATOL})")
    except Exception as exc:  # noqa: BLE001 - a failing family is a finding; the others still run
        problems = [f"{type(exc).__name__}: {exc}"]
        row["traceback"] = traceback.format_exc()
    row.update(ok=not problems, problems=problems)
    return row


def part_families(device: torch.device, size: int, out: Path, cpu_only: bool) -> dict:
    """The verified mmdet families (issue 23) under mixed precision: one meta-step each of the strongest learner the
    family allows (second-order MAML, first-order for deformable attention) with amp off / bf16 / fp16 + scaler,
    the loss finite and within FAMILY_LOSS_TOLERANCE of fp32's. CUDA; ``--cpu-only`` runs YOLOX and RTMDet with
    amp off / bf16 only (the script path, not the numbers)."""
    from bench_detector import make_batch
    from megatron.types import Episode
    from megatron_plugins.detectors.mmdet import SMALL_CONFIGS, MMDet

    families = ["yolox", "rtmdet"] if cpu_only else list(SMALL_CONFIGS)
    amps = ["off", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    skipped = [] if device.type == "cuda" else ["fp16 + GradScaler: needs CUDA", "families other than yolox, rtmdet: "
                                                "CUDA run only"]
    episode = Episode("t", make_batch(2, size, 3, device, seed=1), make_batch(2, size, 3, device, seed=2), ["a", "b", "c"])
    rows, failures = [], []
    for family in families:
        config, cfg_options = SMALL_CONFIGS[family]
        torch.manual_seed(0)
        base = MMDet(3, size, MMDet.Options(config=config, cfg_options=cfg_options)).to(device).train()
        ref = None
        for amp in amps:
            row = _family_row(family, base, amp, episode, device, ref)
            ref = row.get("loss") if amp == "off" else ref
            if row["problems"]:
                failures.append(f"{family} amp={amp}: {'; '.join(row['problems'])}")
            print(f"  {family:16s} amp={amp:5s} {'ok' if row['ok'] else 'FAIL ' + '; '.join(row['problems'])}"
                  + (f"  loss {row['loss']:.4f}" if "loss" in row else ""), flush=True)
            rows.append(row)
    record = {"part": "families", "environment": environment(device), "cpu_only": cpu_only, "input_size": size,
              "amps": amps, "skipped": skipped, "tolerance": {"relative": FAMILY_LOSS_TOLERANCE, "absolute": FAMILY_LOSS_ATOL},
              "rows": rows,
              "failures": failures, "ok": not failures}
    write(out, "families.json", record)
    return record


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# --- distributed -----------------------------------------------------------------------------------------
def _rank(rank: int, world: int, port: int, backend: str, device_type: str, out_dir: str) -> None:
    import torch.distributed as dist

    from megatron.runtime import distributed as mdist

    torch.set_num_threads(1)
    try:
        device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # both ranks on GPU 0: what `--nproc 2` on a one-GPU machine means
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=90), **kwargs)
        env = mdist.DistEnv(rank, world, 0, backend)
        try:
            results = train_cases(env, device)
        finally:
            dist.destroy_process_group()
        torch.save(results, Path(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def train_cases(env, device: torch.device) -> dict:
    import dist_workers as dw
    from megatron.data.episodes import EpisodeSampler
    from megatron.data.preprocess import Preprocessor
    from megatron.runtime import distributed as mdist

    tasks = dw.blobs_tasks()
    factory = dw.tiny_detector_factory()
    results = {}
    for key, name, options in dw.LEARNER_CASES:
        learner = dw.build_learner(name, options, env, lambda: factory().to(device), device=device)
        sampler = EpisodeSampler(2, 2, Preprocessor(64), seed=7)
        t0 = time.perf_counter()
        losses = dw.outer_steps(learner, env, sampler, tasks, 4, 3)
        sync(device)
        seconds = time.perf_counter() - t0
        mdist.check_in_sync(learner.detector, env, key)  # raises when the ranks' weights differ
        results[key] = {"state": {k: v.detach().cpu().clone() for k, v in learner.detector.state_dict().items()},
                        "losses": losses, "seconds": seconds}
    return results


def spawn(world: int, backend: str, device_type: str, timeout_s: float) -> list[dict]:
    import torch.multiprocessing as mp

    import dist_workers as dw

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_rank, args=(world, dw.free_port(), backend, device_type, tmp), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} ranks ({backend}) did not finish within {timeout_s:.0f} s")
        except Exception as exc:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            errors = "\n".join(f.read_text()[-1500:] for f in sorted(Path(tmp).glob("rank*.err")))
            raise RuntimeError(f"{exc}\n{errors}") from None
        return [torch.load(Path(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def part_distributed(device: torch.device, out: Path, cpu_only: bool, timeout_s: float) -> dict:
    import dist_workers as dw
    from megatron.runtime.distributed import DistEnv

    skipped, attempts = [], []
    backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo"]
    if device.type != "cuda":
        skipped.append("nccl and CUDA tensors: no CUDA device (gloo on the CPU instead)")
    ranks = None
    for backend in backends:
        t0 = time.perf_counter()
        try:
            # NCCL refuses (or may hang on) two ranks on one GPU: keep time for the gloo attempt
            ranks = spawn(2, backend, device.type, min(timeout_s, 60.0) if backend == "nccl" else timeout_s)
            attempts.append({"backend": backend, "ok": True, "seconds": time.perf_counter() - t0})
            break
        except Exception as exc:  # noqa: BLE001 - NCCL refusing two ranks on one GPU is expected; try gloo
            attempts.append({"backend": backend, "ok": False, "error": str(exc)[-3000:]})
            print(f"  2 processes with {backend}: failed ({str(exc).splitlines()[0][:200]})", flush=True)
    failures = []
    cases = {}
    if ranks is None:
        failures.append("no backend could run 2 processes on one device")
    else:
        torch.manual_seed(1234)
        initial = {k: v.clone() for k, v in dw.tiny_detector_factory()().state_dict().items()}
        one = train_cases(DistEnv(), device)
        for key, _, _ in dw.LEARNER_CASES:
            ref_key = dw.REFERENCE_CASE.get(key, key)
            s0, s1, s_one = ranks[0][key]["state"], ranks[1][key]["state"], one[ref_key]["state"]
            identical = all(torch.equal(s0[n], s1[n]) for n in s0)
            worst = 0.0  # max over tensors of |two - one| / (1e-6 + moved), the tests' criterion scaled to 1
            for n in s_one:
                moved = float((s_one[n].float() - initial[n].float()).abs().max())
                diff = float((s0[n].float() - s_one[n].float()).abs().max())
                worst = max(worst, diff / (1e-6 / 1e-4 + moved))
            cases[key] = {"ranks_identical": identical, "max_rel_diff_to_one_process": worst,
                          "seconds_two": max(ranks[r][key]["seconds"] for r in range(2)), "seconds_one": one[ref_key]["seconds"]}
            # the CPU tests allow 1e-4 (summation order only); CUDA kernels add their own non-determinism
            limit = 1e-4 if device.type == "cpu" else 1e-3
            if not identical:
                failures.append(f"{key}: the two ranks' weights differ")
            if worst > limit:
                failures.append(f"{key}: 2 processes end {worst:.2e} (relative) from 1 process (limit {limit:g})")
            print(f"  {key:14s} ranks identical {identical}, 2 vs 1 process {worst:.1e}", flush=True)
    record = {"part": "distributed", "environment": environment(device), "cpu_only": cpu_only,
              "backend": next((a["backend"] for a in attempts if a["ok"]), None), "attempts": attempts,
              "skipped": skipped, "cases": cases, "failures": failures, "ok": not failures}
    write(out, "distributed.json", record)
    return record


# --- summary ---------------------------------------------------------------------------------------------
def part_summary(out: Path) -> int:
    lines = ["# Device check", ""]
    ok = True
    amp = json.loads((out / "amp.json").read_text()) if (out / "amp.json").exists() else None
    dist = json.loads((out / "distributed.json").read_text()) if (out / "distributed.json").exists() else None
    bench = json.loads((out / "bench_learners.json").read_text()) if (out / "bench_learners.json").exists() else None
    env = (amp or dist or {}).get("environment", {})
    lines += [f"- device: **{env.get('device', '?')}**, torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
              f"{env.get('when', '')}", ""]
    for name, rec in (("amp", amp), ("distributed", dist)):
        if rec is None:
            lines.append(f"- {name}: **not run** (timed out or failed before writing its JSON)")
            ok = False
            continue
        ok &= bool(rec["ok"])
        lines.append(f"- {name}: **{'ok' if rec['ok'] else 'FAILED'}**"
                     + (f"; skipped: {'; '.join(rec['skipped'])}" if rec.get("skipped") else ""))
        lines += [f"  - {f}" for f in rec["failures"]]
    if amp is not None:
        lines += ["", "| learner | amp | s/meta-step | peak MiB | first loss | vs fp32 | held-out fp32 loss | vs fp32 | "
                  "update cos | fp16 scale | ok |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in amp["rows"]:
            def f(key, fmt):
                return format(r[key], fmt) if r.get(key) is not None else ""
            scale = r["scales"][-1] if r.get("scales") and r["scales"][-1] is not None else None
            lines.append(f"| {r['learner']} | {r['amp']} | {f('seconds_per_meta_step', '.3f')} | {f('peak_memory_mib', '.0f')} | "
                         f"{r['losses'][0]:.4f} | {f('first_loss_rel_diff', '.2%')} | {f('eval_loss', '.4f')} | "
                         f"{f('eval_loss_rel_diff', '.2%')} | {f('update_cosine', '.3f')} | "
                         f"{'' if scale is None else f'{scale:g}'} | {'yes' if r['ok'] else 'NO'} |"
                         if r.get("losses") else f"| {r['learner']} | {r['amp']} | | | | | | | | | NO |")
    if dist is not None and dist.get("cases"):
        lines += ["", f"2 processes on one device, backend **{dist['backend']}** "
                  f"(attempts: {', '.join(a['backend'] + (' ok' if a['ok'] else ' failed') for a in dist['attempts'])})", "",
                  "| case | ranks identical | 2 vs 1 process (rel.) | s (2 procs) | s (1 proc) |", "|---|---|---|---|---|"]
        for key, c in dist["cases"].items():
            lines.append(f"| {key} | {c['ranks_identical']} | {c['max_rel_diff_to_one_process']:.1e} | "
                         f"{c['seconds_two']:.2f} | {c['seconds_one']:.2f} |")
    if bench is not None:
        lines += ["", f"bench_learners ({bench['device']}, {bench['input_size']} px, inner steps {bench['inner_steps']}, "
                  f"clock: {bench['clock']})", "",
                  "| learner | s/meta-step | bare s | overhead | paired | peak MiB | bare MiB |", "|---|---|---|---|---|---|---|"]
        for r in bench["results"]:
            s, m = r["seconds_per_meta_step"], r["peak_memory_mib"]
            lines.append(f"| {r['learner']} | {s['learner']:.4f} | {s['bare']:.4f} | {r['overhead']:.3f} | "
                         f"{r['overhead_paired']:.3f} | {m['learner']:.0f} | {m['bare']:.0f} |")
        if bench.get("anil_speedup_over_maml"):
            a = bench["anil_speedup_over_maml"]
            lines.append(f"\nANIL speed-up over second-order MAML: {a['learner']:.2f}x (bare loops {a['bare']:.2f}x)")
        if bench.get("checkpoint_inner_steps"):
            c = bench["checkpoint_inner_steps"]
            lines.append(f"\ncheckpoint_inner_steps (second-order MAML): {100 * c['peak_saving']:.0f}% less peak memory "
                         f"for {c['time_ratio']:.2f}x the time")
    elif (out / "bench_learners.skipped").exists():
        lines += ["", f"bench_learners: skipped ({(out / 'bench_learners.skipped').read_text().strip()})"]
    else:
        lines += ["", "bench_learners: **not run** (timed out or failed)"]
        ok = False
    if (out / "families.json").exists():
        fam = json.loads((out / "families.json").read_text())
        lines += ["", f"mmdet families under mixed precision: {'ok' if fam['ok'] else 'FAILED'}"
                  + "".join(f"\n- {f}" for f in fam["failures"])]
        ok = ok and fam["ok"]
    if (out / "data.json").exists():
        import device_data  # benchmarks/ (on the path above)

        lines += device_data.summary_lines(json.loads((out / "data.json").read_text()))
    else:
        lines += ["", "data path: **not run** (timed out or failed)"]
        ok = False
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["amp", "families", "distributed", "data", "summary", "device-slug"])
    ap.add_argument("--out", type=Path, help="folder for the JSON (device_check.sh chooses it)")
    ap.add_argument("--cpu-only", action="store_true", help="CPU, small input: test the script without a GPU")
    ap.add_argument("--input-size", type=int, default=None, help="default 256 on CUDA, 64 with --cpu-only")
    ap.add_argument("--meta-steps", type=int, default=3)
    ap.add_argument("--learners", default=",".join(LEARNERS))
    ap.add_argument("--timeout-s", type=float, default=100.0, help="distributed: per attempt (nccl: at most 60 s)")
    args = ap.parse_args(argv)
    if not args.cpu_only and not torch.cuda.is_available():
        ap.error("no CUDA device visible; run with --cpu-only to test the script on the CPU")
    device = torch.device("cpu") if args.cpu_only else torch.device("cuda", 0)
    if args.part == "device-slug":
        print(slug(device_name(device)))
        return 0
    if args.out is None:
        ap.error("--out is required")
    if args.cpu_only:
        torch.set_num_threads(1)
    os.environ.setdefault("MEGATRON_DISABLE_PLUGIN_AUTOLOAD", "1")
    if args.part == "amp":
        rec = part_amp(device, args.input_size or (64 if args.cpu_only else 256), args.meta_steps,
                       [n.strip() for n in args.learners.split(",") if n.strip()], args.out, args.cpu_only)
        return 0 if rec["ok"] else 1
    if args.part == "families":
        rec = part_families(device, args.input_size or (64 if args.cpu_only else 128), args.out, args.cpu_only)
        return 0 if rec["ok"] else 1
    if args.part == "distributed":
        return 0 if part_distributed(device, args.out, args.cpu_only, args.timeout_s)["ok"] else 1
    if args.part == "data":
        import device_data  # benchmarks/ (on the path above); imports megatron's data path and the plugins

        rec = device_data.part_data(device, args.cpu_only)
        rec["environment"] = environment(device)
        write(args.out, "data.json", rec)
        print("\n".join(device_data.summary_lines(rec)))
        return 0 if rec["ok"] else 1
    return part_summary(args.out)


if __name__ == "__main__":
    sys.exit(main())
