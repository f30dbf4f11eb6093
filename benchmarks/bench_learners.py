"""What does each learner's meta-step cost over the same passes written by hand in bare PyTorch?

Per learner (maml second order, maml first order, reptile, anil, proto, finetune), one meta-step of the
plugin (``learner.meta_step(episodes)`` through the Detector interface) against a **bare** reference loop that
does the same forward/backward passes on the raw mmdet model (``detector.model``), with inputs normalised and
mmdet data samples built once beforehand:

- maml / maml-fo: per episode, k functional SGD steps on the support loss through
  ``torch.func.functional_call`` with ``torch.autograd.grad(create_graph=not first_order)``, the query loss at
  the adapted weights, ``backward``; then clip + one Adam step (the learner's defaults);
- anil: the same with the head adapted only; the body features of the support batch are computed *once* and
  the head's loss is taken on them in each inner step (the way a hand-written ANIL saves work, and what
  megatron's ANIL does through ``Detector.body_features`` + ``Detector.head_loss``);
- reptile: snapshot the weights, k inner steps on support+query with the plugin's default inner optimiser
  (plain SGD; Adam(beta1=0) when that default is ``adam``), delta, interpolate (eps = 1);
- proto: prototypes from the support box features, the cosine classifier swapped in, query loss, backward,
  one Adam step;
- finetune: one plain Adam step on the support batch, then one on the query batch, per episode;
- maml-ckpt (only when named in ``--learners``): second-order MAML with ``checkpoint_inner_steps``, against the
  plain second-order bare loop, so its overhead is what the option costs in time and its peak memory what it saves.

The detector's weights are restored to the same snapshot before every timed step, so learner and reference
see the same weights (and the same SimOTA assignments). Runs are interleaved (ABBA order over repeats) so that
machine-load drift hits both alike. Time per meta-step: median of the timed steps after one warm-up, in process
CPU seconds on CPU (robust on a shared machine; use 1 thread) or synchronised wall seconds on CUDA. Peak memory
per meta-step: on CUDA ``torch.cuda.max_memory_allocated`` growth over the step; on CPU the peak resident-set
growth during one step, sampled every millisecond (tracemalloc does not see torch's allocator). Overhead:
median learner time / median bare time, and "paired", the median of the per-repeat ratios (each pair runs
back to back, so drift of a shared machine cancels; trust it more when the two disagree). "update
mismatch": the relative difference between the weight updates of the learner's and the bare loop's step from
the same weights: 0 or rounding-sized (they do the same computation, so the timings compare like with like;
ANIL with several inner steps sums the same gradient in another order, and Adam's first step magnifies rounding
in near-zero gradients to ~1e-4). A mismatch above :data:`MISMATCH_TOLERANCE` fails the benchmark (exit status 1):
the bare loop no longer does what the plugin does, so its timings compare different work. Every bare loop
implements the plugin's *default* options (:data:`BARE_LOOP_OPTIONS`); when a plugin's default changes, the
benchmark stops before timing anything (exit status 2) and names the option to follow.

Defaults: YOLOX-tiny at 256 px, meta-batch 2, support 4 + query 4, inner steps 1 (``--quick``: 128 px, fewer
timed steps). Synthetic episodes (bright boxes on a dark background, 1-3 boxes per image, 3 classes), so no
data set is generated or read.

    python benchmarks/bench_learners.py [--quick] [--input-size N] [--inner-steps K] [--device cpu|cuda]
                                        [--threads N] [--learners maml,anil,...]

Prints a table and writes benchmarks/out/bench_learners.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_detector import make_batch  # noqa: E402  (same folder; shared synthetic data)
from peak_memory import PeakMemory  # noqa: E402

from megatron.api.learner import LearnerContext  # noqa: E402
from megatron.types import Batch, Episode  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
NUM_CLASSES = 3
INNER_LR, OUTER_LR, GRAD_CLIP, TEMPERATURE = 0.01, 1e-3, 10.0, 10.0
LEARNERS = ("maml", "maml-fo", "reptile", "anil", "proto", "finetune")
#: also accepted by --learners: second-order MAML with checkpoint_inner_steps (its bare loop is plain second-order
#: MAML, so its overhead is the time the option costs, and its peak memory what it saves)
OPTIONAL = ("maml-ckpt",)
ANIL_PAPER_SPEEDUP = 1.7
ANIL_AIM_SPEEDUP = 3.0  # over second-order MAML at 3 inner steps (issue 15)
#: the largest relative difference between the learner's and the bare loop's weight update that still counts as
#: "the same computation" (rounding; Adam's first step magnifies it in near-zero gradients to ~1e-4)
MISMATCH_TOLERANCE = 1e-3
#: the options each bare loop implements, which must be the plugin's defaults (checked before timing); reptile's
#: inner optimiser is read from the plugin's default and both choices are implemented
BARE_LOOP_OPTIONS = {
    "maml": {"first_order": False, "inner_groups": None, "checkpoint_inner_steps": False},
    "maml-fo": {"inner_groups": None, "checkpoint_inner_steps": False},
    "maml-ckpt": {"first_order": False, "inner_groups": None},
    "anil": {"first_order": False},
    "reptile": {"eps_start": 1.0},
    "proto": {"temperature": TEMPERATURE},
    "finetune": {"episodes_per_step": 1},
}


# --- data ---------------------------------------------------------------------------------------------
def make_episodes(meta_batch: int, support: int, query: int, size: int, device: torch.device) -> list[Episode]:
    eps = []
    for t in range(meta_batch):
        s = make_batch(support, size, NUM_CLASSES, device, seed=100 * t + 1)
        q = make_batch(query, size, NUM_CLASSES, device, seed=100 * t + 2)
        eps.append(Episode(task_name=f"synthetic-{t}", support=s, query=q, categories=["a", "b", "c"]))
    return eps


class Prepared:
    """An episode as a bare loop holds it: normalised inputs and mmdet data samples, built once."""

    def __init__(self, det, episode: Episode) -> None:
        self.s_in, self.s_smp = det.normalise(episode.support.images), det.data_samples(episode.support)
        self.q_in, self.q_smp = det.normalise(episode.query.images), det.data_samples(episode.query)
        both = Batch(images=torch.cat([episode.support.images, episode.query.images]),
                     boxes=episode.support.boxes + episode.query.boxes,
                     labels=episode.support.labels + episode.query.labels,
                     meta=episode.support.meta + episode.query.meta)
        self.sq_in, self.sq_smp = det.normalise(both.images), det.data_samples(both)
        self.s_labels = torch.cat([lab.reshape(-1).long() for lab in episode.support.labels]).to(self.s_in.device)


# --- the bare references ------------------------------------------------------------------------------
class HeadLoss(nn.Module):
    """``bbox_head.loss(features, samples)`` as a forward, so ``functional_call`` can swap the head's weights."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, feats, samples):
        return self.head.loss(feats, samples)


class References:
    """Hand-written meta-steps on ``det.model`` (no megatron code inside the timed loop)."""

    def __init__(self, det, episodes: list[Episode], inner_steps: int) -> None:
        self.det, self.model = det, det.model
        self.eps = [Prepared(det, e) for e in episodes]
        self.k = inner_steps
        self.head_loss = HeadLoss(self.model.bbox_head)
        self.opts: dict[str, torch.optim.Optimizer] = {}

    def total(self, raw: dict) -> torch.Tensor:
        return self.model.parse_losses(raw)[0]

    def opt(self, key: str) -> torch.optim.Optimizer:
        if key not in self.opts:  # kept across steps, as the learners keep their outer optimiser
            self.opts[key] = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=OUTER_LR)
        return self.opts[key]

    def finish(self, opt: torch.optim.Optimizer) -> None:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], GRAD_CLIP)
        opt.step()

    def maml(self, first_order: bool, key: str | None = None) -> None:
        model, n = self.model, len(self.eps)
        opt = self.opt(key or ("maml-fo" if first_order else "maml"))
        opt.zero_grad(set_to_none=True)
        theta = dict(model.named_parameters())
        for e in self.eps:
            buffers = {b: t.clone() for b, t in model.named_buffers()}  # BN running stats left untouched
            params = theta
            for _ in range(self.k):
                loss = self.total(torch.func.functional_call(
                    model, {**buffers, **params}, (e.s_in, e.s_smp), {"mode": "loss"}))
                grads = torch.autograd.grad(
                    loss, list(params.values()), create_graph=not first_order, allow_unused=True)
                params = {name: p if g is None else p - INNER_LR * (g.detach() if first_order else g)
                          for (name, p), g in zip(params.items(), grads)}
            query = self.total(torch.func.functional_call(
                model, {**buffers, **params}, (e.q_in, e.q_smp), {"mode": "loss"}))
            (query / n).backward()
        self.finish(opt)

    def anil(self) -> None:
        model, n = self.model, len(self.eps)
        opt = self.opt("anil")
        opt.zero_grad(set_to_none=True)
        head = {f"head.{name}": p for name, p in model.bbox_head.named_parameters()}
        for e in self.eps:
            feats = model.extract_feat(e.s_in)  # body once per episode: the inner loop only changes the head
            params = head
            for _ in range(self.k):
                loss = self.total(torch.func.functional_call(self.head_loss, params, (feats, e.s_smp)))
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
                params = {name: p if g is None else p - INNER_LR * g for (name, p), g in zip(params.items(), grads)}
            query = self.total(torch.func.functional_call(self.head_loss, params, (model.extract_feat(e.q_in), e.q_smp)))
            (query / n).backward()
        self.finish(opt)

    def reptile(self) -> None:
        model = self.model
        live = model.state_dict(keep_vars=True)
        with torch.no_grad():
            theta = {name: t.detach().clone() for name, t in live.items()}
            delta = {name: torch.zeros_like(t) for name, t in theta.items() if t.is_floating_point()}
        params = [p for p in model.parameters() if p.requires_grad]
        for i, e in enumerate(self.eps):
            if i:
                with torch.no_grad():
                    for name, t in theta.items():
                        live[name].copy_(t)
            opt = reptile_inner_optimizer(params)
            for _ in range(self.k):
                opt.zero_grad(set_to_none=True)
                self.total(model.loss(e.sq_in, e.sq_smp)).backward()
                torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                opt.step()
            with torch.no_grad():
                for name, d in delta.items():
                    d += live[name] - theta[name]
        with torch.no_grad():  # eps = 1 (the default eps_start, progress 0)
            for name, d in delta.items():
                live[name].copy_(theta[name] + d / len(self.eps))

    def proto(self) -> None:
        from megatron_plugins.learners.proto import class_prototypes

        det, model, n = self.det, self.model, len(self.eps)
        opt = self.opt("proto")
        opt.zero_grad(set_to_none=True)
        for e in self.eps:
            protos = class_prototypes(det._box_features(e.s_in, e.s_smp), e.s_labels, NUM_CLASSES)
            det.set_prototypes(protos, TEMPERATURE)
            try:
                (self.total(model.loss(e.q_in, e.q_smp)) / n).backward()
            finally:
                det.set_prototypes(None)
        self.finish(opt)

    def finetune(self) -> None:
        opt = self.opt("finetune")
        for e in self.eps:
            for inputs, samples in ((e.s_in, e.s_smp), (e.q_in, e.q_smp)):
                opt.zero_grad(set_to_none=True)
                self.total(self.model.loss(inputs, samples)).backward()
                self.finish(opt)

    def step(self, learner: str) -> Callable[[], None]:
        return {
            "maml": lambda: self.maml(False), "maml-fo": lambda: self.maml(True), "anil": self.anil,
            "maml-ckpt": lambda: self.maml(False, key="maml-ckpt"),  # own optimiser state, as its learner has
            "reptile": self.reptile, "proto": self.proto, "finetune": self.finetune,
        }[learner]


def reptile_inner_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """A fresh inner optimiser per task, the one Reptile's options default to."""
    from megatron_plugins.learners.reptile import Reptile

    if Reptile.Options().inner_optimizer == "adam":
        return torch.optim.Adam(params, lr=INNER_LR, betas=(0.0, 0.999))
    return torch.optim.SGD(params, lr=INNER_LR)


# --- the learners ---------------------------------------------------------------------------------------
def build_learner(name: str, det, ctx: LearnerContext):
    from megatron_plugins.learners.anil import ANIL
    from megatron_plugins.learners.finetune import Finetune
    from megatron_plugins.learners.maml import MAML
    from megatron_plugins.learners.proto import Proto
    from megatron_plugins.learners.reptile import Reptile

    if name in ("maml", "maml-fo", "maml-ckpt"):
        return MAML(det, MAML.Options(first_order=name == "maml-fo", checkpoint_inner_steps=name == "maml-ckpt"), ctx)
    if name == "anil":
        return ANIL(det, ANIL.Options(), ctx)
    if name == "reptile":
        learner = Reptile(det, Reptile.Options(), ctx)
        learner.set_progress(0.0)
        return learner
    if name == "proto":
        return Proto(det, Proto.Options(temperature=TEMPERATURE), ctx)
    if name == "finetune":
        return Finetune(det, None, ctx)
    raise ValueError(f"unknown learner {name!r}; choose from {', '.join(LEARNERS + OPTIONAL)}")


# --- measuring ------------------------------------------------------------------------------------------
def plugin_classes() -> dict[str, type]:
    from megatron_plugins.learners.anil import ANIL
    from megatron_plugins.learners.finetune import Finetune
    from megatron_plugins.learners.maml import MAML
    from megatron_plugins.learners.proto import Proto
    from megatron_plugins.learners.reptile import Reptile

    return {"maml": MAML, "maml-fo": MAML, "maml-ckpt": MAML, "anil": ANIL, "reptile": Reptile, "proto": Proto,
            "finetune": Finetune}


def stale_bare_loops(learners: list[str]) -> list[str]:
    """One line per option whose plugin default differs from what that learner's bare loop implements."""
    problems = []
    for name in learners:
        defaults = plugin_classes()[name].Options().model_dump()
        for option, assumed in BARE_LOOP_OPTIONS[name].items():
            if defaults.get(option) != assumed:
                problems.append(f"{name}: the bare loop implements {option}={assumed!r} but the plugin's default is "
                                f"{defaults.get(option)!r}; make References.{name.split('-')[0]} follow the default")
    return problems


def mismatches(results: list[dict]) -> list[str]:
    return [f"{r['learner']}: update mismatch {r['update_mismatch']:.1e} > {MISMATCH_TOLERANCE:.0e}" for r in results
            if not r["update_mismatch"] <= MISMATCH_TOLERANCE]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 px (unless --input-size) and 2 timed steps per mode")
    ap.add_argument("--input-size", type=int, default=None, help="image size (default 256; 128 with --quick)")
    ap.add_argument("--inner-steps", type=int, default=1, help="inner steps of maml/anil/reptile (default 1)")
    ap.add_argument("--meta-batch", type=int, default=2)
    ap.add_argument("--support", type=int, default=4)
    ap.add_argument("--query", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per mode (default 4; 2 with --quick)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--learners", default=",".join(LEARNERS),
                    help=f"comma-separated subset; also {', '.join(OPTIONAL)} (second-order MAML, inner steps checkpointed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.input_size or (128 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 4)
    learners = [name.strip() for name in args.learners.split(",") if name.strip()]
    for name in learners:
        if name not in LEARNERS + OPTIONAL:
            ap.error(f"unknown learner {name!r}; choose from {', '.join(LEARNERS + OPTIONAL)}")
    stale = stale_bare_loops(learners)
    if stale:
        print("bench_learners: a bare loop no longer follows its plugin's defaults:\n  " + "\n  ".join(stale),
              file=sys.stderr)
        sys.exit(2)

    from megatron_plugins.detectors.yolox import YOLOX

    torch.manual_seed(0)
    det = YOLOX(NUM_CLASSES, size).to(device).train()
    episodes = make_episodes(args.meta_batch, args.support, args.query, size, device)
    refs = References(det, episodes, args.inner_steps)
    snapshot = copy.deepcopy(det.state_dict())
    ctxs = {name: LearnerContext(device=device, inner_steps=args.inner_steps, inner_lr=INNER_LR, outer_lr=OUTER_LR,
                                 outer_optimizer="adam", grad_clip=GRAD_CLIP) for name in learners}
    objs = {name: build_learner(name, det, ctxs[name]) for name in learners}
    modes: dict[tuple[str, str], Callable[[], None]] = {}
    for name in learners:
        modes[(name, "learner")] = (lambda learner: lambda: learner.meta_step(episodes))(objs[name])
        modes[(name, "bare")] = refs.step(name)

    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def run(fn: Callable[[], None]) -> float:
        det.load_state_dict(snapshot)  # same weights for every mode (restoring is not timed)
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - t

    console = Console(width=150)
    console.print(f"[bold]bench_learners[/]: YOLOX-tiny {size}px, meta-batch {args.meta_batch}, support "
                  f"{args.support} + query {args.query}, inner steps {args.inner_steps}, {device}, "
                  f"{args.threads} thread(s), {repeats} timed step(s) per mode after 1 warm-up")
    for fn in modes.values():  # warm-up: allocator, lazy imports, optimiser state
        run(fn)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in modes}
    for r in range(repeats):  # interleaved; ABBA order so neither side always runs first
        for name in learners:
            order = ("learner", "bare") if r % 2 == 0 else ("bare", "learner")
            for side in order:
                times[(name, side)].append(run(modes[(name, side)]))
    memory: dict[tuple[str, str], float] = {}
    updates: dict[tuple[str, str], torch.Tensor] = {}
    for key, fn in modes.items():
        if device.type == "cuda":
            det.load_state_dict(snapshot)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run(fn)
            memory[key] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        else:
            for p in det.parameters():  # grads from the previous step would otherwise count as baseline
                p.grad = None
            with PeakMemory(interval_s=0.001, trim=True) as rss:
                run(fn)
            memory[key] = rss.peak / 2**20
        # the weight update this step made, to check that learner and bare loop compute the same thing
        updates[key] = torch.cat([(p.detach() - snapshot[n].to(p.dtype)).flatten().double().cpu()
                                  for n, p in det.named_parameters() if n in snapshot])

    spent = {}
    for name in learners:  # images forwarded + backwarded per meta-step, as the compute account charges them
        acc = ctxs[name].compute
        spent[name] = acc.spent / (1 + repeats + 1)
    results = []
    for name in learners:
        lt, bt = statistics.median(times[(name, "learner")]), statistics.median(times[(name, "bare")])
        results.append({
            "learner": name, "seconds_per_meta_step": {"learner": lt, "bare": bt},
            "all_seconds": {"learner": times[(name, "learner")], "bare": times[(name, "bare")]},
            "overhead": lt / bt,
            # median of the per-repeat ratios: each pair ran back to back, so slow drift of the machine cancels
            "overhead_paired": statistics.median(
                a / b for a, b in zip(times[(name, "learner")], times[(name, "bare")])),
            # ||update_learner - update_bare|| / ||update_bare|| from the same weights: ~0 means the same passes
            "update_mismatch": float((updates[(name, "learner")] - updates[(name, "bare")]).norm()
                                     / updates[(name, "bare")].norm().clamp_min(1e-30)),
            "update_norm_bare": float(updates[(name, "bare")].norm()),
            "peak_memory_mib": {"learner": memory[(name, "learner")], "bare": memory[(name, "bare")]},
            "images_charged_per_meta_step": spent[name],
        })
    by_name = {r["learner"]: r for r in results}
    anil = None
    if "maml" in by_name and "anil" in by_name:
        m, a = by_name["maml"]["seconds_per_meta_step"], by_name["anil"]["seconds_per_meta_step"]
        anil = {"learner": m["learner"] / a["learner"], "bare": m["bare"] / a["bare"], "paper": ANIL_PAPER_SPEEDUP}

    table = Table(title=f"learner meta-step vs bare PyTorch (YOLOX-tiny {size}px, {device}, {args.threads} thread(s); "
                        f"aim: overhead <= 1.10)")
    for col in ("learner", "s/meta-step", "bare s", "overhead", "paired", "peak MiB", "bare MiB", "images charged",
                "update mismatch"):
        table.add_column(col, justify="right")
    for r in results:
        s, mem = r["seconds_per_meta_step"], r["peak_memory_mib"]
        table.add_row(r["learner"], f"{s['learner']:.3f}", f"{s['bare']:.3f}", f"{r['overhead']:.3f}",
                      f"{r['overhead_paired']:.3f}",
                      f"{mem['learner']:.0f}", f"{mem['bare']:.0f}", f"{r['images_charged_per_meta_step']:.0f}",
                      f"{r['update_mismatch']:.1e}")
    console.print(table)
    if anil is not None:
        anil["aim"] = ANIL_AIM_SPEEDUP
        console.print(
            f"ANIL speed-up over MAML (second order, {args.inner_steps} inner step(s)): megatron "
            f"{anil['learner']:.2f}x, bare {anil['bare']:.2f}x (aim at 3 inner steps: >= {ANIL_AIM_SPEEDUP:.0f}x; paper: "
            f"{ANIL_PAPER_SPEEDUP}x per training iteration, few-shot image classification with a 4-conv network). Like the "
            "bare loop, megatron's ANIL computes the support batch's body features once per episode and runs only the "
            "head at each inner step (Detector.body_features + head_loss); the outer backward still runs through the "
            "whole body. The saving grows with the inner steps: with 1 step there is nothing to reuse.")
    checkpointing = None
    if "maml" in by_name and "maml-ckpt" in by_name:
        m, c = by_name["maml"], by_name["maml-ckpt"]
        checkpointing = {"peak_saving": 1 - c["peak_memory_mib"]["learner"] / m["peak_memory_mib"]["learner"],
                         "time_ratio": c["seconds_per_meta_step"]["learner"] / m["seconds_per_meta_step"]["learner"]}
        console.print(f"checkpoint_inner_steps (second-order MAML, {args.inner_steps} inner step(s)): peak memory "
                      f"{c['peak_memory_mib']['learner']:.0f} MiB vs {m['peak_memory_mib']['learner']:.0f} MiB "
                      f"({100 * checkpointing['peak_saving']:.0f}% less) for {checkpointing['time_ratio']:.2f}x the time "
                      "(aim: >= 30% less for <= 1.5x).")
    peaks = {name: by_name[name]["peak_memory_mib"]["learner"] for name in ("maml", "maml-fo", "finetune") if name in by_name}
    if "maml" in peaks and len(peaks) > 1:
        console.print("peak memory per meta-step: " + ", ".join(f"{n} {v:.0f} MiB" for n, v in peaks.items())
                      + f" (second-order MAML keeps the graphs of all {args.inner_steps} inner steps for the outer backward)")
    OUT.mkdir(parents=True, exist_ok=True)
    record = {
        "device": str(device), "threads": args.threads, "quick": args.quick, "torch": torch.__version__,
        "platform": platform.platform(), "detector": "yolox tiny", "input_size": size,
        "meta_batch": args.meta_batch, "support": args.support, "query": args.query,
        "inner_steps": args.inner_steps, "timed_steps": repeats,
        "clock": "wall (cuda synchronised)" if device.type == "cuda" else "process CPU time",
        "memory": "cuda max_memory_allocated growth" if device.type == "cuda" else "peak RSS growth (1 ms sampling)",
        "results": results, "anil_speedup_over_maml": anil, "checkpoint_inner_steps": checkpointing,
    }
    record["mismatch_tolerance"] = MISMATCH_TOLERANCE
    record["failed"] = mismatches(results)
    (OUT / "bench_learners.json").write_text(json.dumps(record, indent=2) + "\n")
    if record["failed"]:
        console.print("[bold red]FAILED[/]: the learner and its bare loop updated the weights differently, so the "
                      "timings compare different work:\n  " + "\n  ".join(record["failed"]))
        sys.exit(1)


if __name__ == "__main__":
    main()
