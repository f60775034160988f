"""The cost model of a training step: for each part of the step, the least work its algorithm
must do (flops of its matrix products, bytes of its elementwise passes) for the model's layer
shapes, against the time the part measurably takes, so that each part reads as a multiple of
its floor.

    python -m bench.cost_model --size small --threads 1          # the three step_time models
    python -m bench.cost_model --models autoencoder --configs sgd,ekfac-e10-stagger --steps 20

Parts (per step, summed over the preconditioned layers; a layer is ``d_out × d̄_in`` with
``d̄_in = d_in + 1`` with a bias, seen by ``N`` examples of ``R`` positions each, ``T = N·R`` rows;
the form modelled is the reference path of ``ekfac_triton.kernels`` on CPU, with each layer's
projection in the form its last step used, ``EigenbasisCurvature.last_projection``):

| part (profiler range) | floor |
|---|---|
| forward + backward (the bench's own ranges) | ``6·T·d_in·d_out`` flops per layer (forward, input- and weight-gradient products) |
| ``factors``: the factor EMAs | ``2·T·(d̄_in² + d_out²)`` flops (``X̄ᵀX̄`` as a GEMM) + read/write of A and G |
| ``scalings``: EKFAC's per-example S | projections ``2·T·(d_out² + d̄_in²)`` + ``2·N·d_out·d̄_in`` (R = 1: ``(Q_outᵀĝ)²ᵀ(Q_inᵀā)²``) or ``2·T·d_out·d̄_in`` (R > 1: per-example gradients) flops, + read/write of S |
| ``direction``: ``Q_out[(Q_outᵀ∇W̄Q_in)/(S+λ)]Q_inᵀ`` | projection ``2·d_out·d̄_in·(d̄_in + d_out)`` from the gradient, or ``2·N·d_out·d̄_in`` from the rows (``(ĜQ_out)ᵀ(ĀQ_in)/N``, plus ``2·N·(d_out² + d̄_in²)`` for the row projections when no per-example scaling made them), + back-projection ``2·d_out·d̄_in·(d̄_in + d_out)``, flops; the division reads P and S and writes P |
| ``refresh``: eigendecompositions | ``4·d³`` flops per factor (Householder tridiagonalisation + back-transformation), amortised over ``eigen_every`` |
| ``check`` / ``finite_check``: the non-finite checks | read every tensor checked once |
| ``update``: momentum and the parameter step | read p, direction, buffer; write p, buffer |

Floors in time use the machine's own rates, measured once in the same run: the flop/s of a
``1024×1024`` fp32 GEMM and the bytes/s of a 64 MB tensor copy (read + write). Measured times are
the ``ekfac::<part>`` ranges of :mod:`ekfac_triton.step.maths` (``PROFILE_RANGES``) under
``torch.profiler``; within each range the time of its matrix products (``aten::mm``/``bmm``/
``addmm``/... self time) is split from the rest (elementwise passes, copies, Python), so a part
reads as "GEMM time / flop floor" and "other time / byte floor". The profiler inflates short
ops; the table states the step time with and without it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ekfac_triton import EKFAC
from ekfac_triton.step import maths

from .environment import command_line, environment
from .runner import torch_threads
from .step_time import MODELS, SIZES, Config, configurations, make_workload

__all__ = ["LayerDims", "Rates", "floors", "layer_dims", "machine_rates", "main", "measure_parts", "part_floors"]

#: aten ops counted as matrix products inside a range
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::dot",
                      "aten::mv", "aten::addmv", "aten::_linalg_eigh", "aten::linalg_eigh",
                      "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
                      "aten::_slow_conv2d_backward"})
#: flops of a symmetric eigendecomposition with vectors, per d³ (the floor's convention)
EIGH_FLOPS_PER_D3 = 4.0
DEFAULT_CONFIGS = ("sgd", "adamw", "ekfac-e10-stagger", "kfac-e10-stagger")
STEP_PARTS = ("forward", "backward", "optimizer")


# -- the layer shapes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerDims:
    """One preconditioned layer as the cost model sees it: ``d_out × d_in`` (+ a bias column),
    ``examples`` (N) of ``positions`` (R) rows each, ``conv``: unfolded patches as inputs."""

    name: str
    d_out: int
    d_in: int
    bias: bool
    examples: int   # N
    positions: int  # R
    conv: bool = False  # its inputs are unfolded patches (the statistics phase writes them)

    @property
    def d_in_bar(self) -> int:
        return self.d_in + int(self.bias)

    @property
    def rows(self) -> int:
        return self.examples * self.positions


def layer_dims(model: nn.Module, inputs: torch.Tensor) -> list[LayerDims]:
    """The ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` with the examples and positions one
    forward of ``inputs`` gives them (examples: the first dimension of the output)."""
    dims: list[LayerDims] = []
    hooks = []

    def hook(name: str, module: nn.Module):
        def record(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            n = out.shape[0] if out.dim() > 1 else 1
            if isinstance(module, nn.Conv2d):
                d_in = module.in_channels // module.groups * math.prod(module.kernel_size)
                r = out.shape[-2] * out.shape[-1]
                dims.append(LayerDims(name, module.out_channels, d_in, module.bias is not None, n, r, conv=True))
            else:
                r = out.numel() // (module.out_features * n)
                dims.append(LayerDims(name, module.out_features, module.in_features, module.bias is not None, n, r))
        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.append(module.register_forward_hook(hook(name, module)))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return dims


# -- the floors ----------------------------------------------------------------------------------------
def part_floors(layer: LayerDims, eigen_every: int | None, itemsize: int = 4,
                scalings: bool = True, form: str | None = None) -> dict[str, dict[str, float]]:
    """The floor of each part of the step for one layer: ``{part: {"flops": ..., "bytes": ...}}``
    (module docstring; ``eigen_every`` None: no refresh part; ``scalings`` False: no estimated
    S, as K-FAC; ``form``: ``"rows"`` when the projection was formed from the captured rows,
    else from the gradient matrix)."""
    o, i, t, n = layer.d_out, layer.d_in_bar, layer.rows, layer.examples
    w = o * i
    back = 2.0 * w * (i + o)
    projection = (2.0 * n * w + (0.0 if scalings else 2.0 * n * (o * o + i * i))) if form == "rows" else back
    scaling_product = 2 * n * w if layer.positions == 1 else 2 * t * w
    out = {
        "forward+backward": dict(flops=6.0 * t * layer.d_in * o, bytes=0.0),
        # a convolution's patches are unfolded once (written); a linear layer's inputs are used as they are
        "collect": dict(flops=0.0, bytes=float(t * layer.d_in * itemsize) if layer.conv else 0.0),
        "factors": dict(flops=2.0 * t * (i * i + o * o), bytes=3.0 * (i * i + o * o) * itemsize),
        "scalings": dict(flops=2.0 * t * (o * o + i * i) + scaling_product, bytes=3.0 * w * itemsize),
        "direction": dict(flops=projection + back, bytes=3.0 * w * itemsize),
        "check": dict(flops=0.0, bytes=(w + t * (layer.d_in + o)) * itemsize),
        "finite_check": dict(flops=0.0, bytes=(w + i * i + o * o + w) * itemsize),
        "update": dict(flops=0.0, bytes=5.0 * w * itemsize),
    }
    if not scalings:
        del out["scalings"]
    if eigen_every:
        out["refresh"] = dict(flops=EIGH_FLOPS_PER_D3 * (i ** 3 + o ** 3) / eigen_every, bytes=0.0)
    return out


def floors(layers: Sequence[LayerDims], eigen_every: int | None, itemsize: int = 4,
           scalings: bool = True, forms: dict[str, str | None] | None = None) -> dict[str, dict[str, float]]:
    """:func:`part_floors` summed over ``layers`` (``forms``: each layer's projection form, by name)."""
    total: dict[str, dict[str, float]] = {}
    for layer in layers:
        form = (forms or {}).get(layer.name)
        for part, f in part_floors(layer, eigen_every, itemsize, scalings, form).items():
            acc = total.setdefault(part, dict(flops=0.0, bytes=0.0))
            acc["flops"] += f["flops"]
            acc["bytes"] += f["bytes"]
    return total


@dataclass(frozen=True)
class Rates:
    """The machine's reference rates, measured in the run."""

    gemm_flops_per_s: float
    copy_bytes_per_s: float

    def seconds(self, floor: dict[str, float]) -> float:
        """The floor's time at these rates: flops at the GEMM rate plus bytes at the copy rate."""
        return floor["flops"] / self.gemm_flops_per_s + floor["bytes"] / self.copy_bytes_per_s


def machine_rates(gemm_n: int = 1024, copy_mb: int = 64, repeats: int = 5) -> Rates:
    """Best-of-``repeats`` fp32 GEMM flop/s (``gemm_n``² matrices) and copy bytes/s (read + write
    of ``copy_mb`` MB) at the current thread setting."""
    a, b = torch.randn(gemm_n, gemm_n), torch.randn(gemm_n, gemm_n)
    src = torch.empty(copy_mb * 2**20 // 4).uniform_()
    dst = torch.empty_like(src)
    a @ b
    dst.copy_(src)
    gemm, copy = math.inf, math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        gemm = min(gemm, time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        copy = min(copy, time.perf_counter() - t0)
    return Rates(2.0 * gemm_n ** 3 / gemm, 2.0 * src.numel() * 4 / copy)


# -- the measurement ----------------------------------------------------------------------------------
def _range_times(events: Any) -> dict[str, dict[str, float]]:
    """Per range name: total time (µs), time of the matrix products inside it, occurrences."""
    out: dict[str, dict[str, float]] = {}

    def gemm_inside(ev: Any) -> float:
        total = 0.0
        for child in ev.cpu_children:
            if child.name in GEMM_OPS:
                total += child.cpu_time_total  # with its children (a GEMM's own sub-ops)
            else:
                total += gemm_inside(child)
        return total

    for ev in events:
        name = ev.name
        if not (name.startswith("ekfac::") or name.startswith("bench::")):
            continue
        key = name.split("::", 1)[1]
        acc = out.setdefault(key, dict(total_us=0.0, gemm_us=0.0, count=0))
        acc["total_us"] += ev.cpu_time_total
        acc["gemm_us"] += gemm_inside(ev)
        acc["count"] += 1
    return out


def measure_parts(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss_fn: Any,
                  cfg: Config, warmup: int, steps: int) -> dict[str, Any]:
    """Run ``warmup`` steps, ``steps`` timed steps without ranges, then ``steps`` profiled steps
    with the step's ranges on; per part the mean time per step (ms) and its GEMM share."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = cfg.make_optimizer(model)
    nb = len(batches)
    rf = torch.profiler.record_function

    def one_step(i: int, ranges: bool) -> None:
        x, y = batches[i % nb]
        opt.zero_grad(set_to_none=True)
        if ranges:
            with rf("bench::forward"):
                loss = loss_fn(model(x), y)
            with rf("bench::backward"):
                loss.backward()
            with rf("bench::optimizer"):
                opt.step()
        else:
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

    try:
        for i in range(warmup):
            one_step(i, False)
        plain = []
        for i in range(warmup, warmup + steps):
            t0 = time.perf_counter()
            one_step(i, False)
            plain.append((time.perf_counter() - t0) * 1e3)
        maths.PROFILE_RANGES = True
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for i in range(warmup + steps, warmup + 2 * steps):
                    one_step(i, True)
                profiled_ms = (time.perf_counter() - t0) * 1e3 / steps
        finally:
            maths.PROFILE_RANGES = False
        ranges = _range_times(prof.events())
        forms = ({layer.name: getattr(layer.curvature, "last_projection", None) for layer in opt.preconditioner.layers}
                 if isinstance(opt, EKFAC) else {})
        with torch.no_grad():
            x, y = batches[0]
            final_loss = float(loss_fn(model(x), y))
    finally:
        if isinstance(opt, EKFAC):
            opt.remove_hooks()
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
    parts = {k: dict(ms=v["total_us"] / 1e3 / steps, gemm_ms=v["gemm_us"] / 1e3 / steps,
                     calls_per_step=v["count"] / steps) for k, v in ranges.items()}
    return dict(step_ms=statistics.fmean(plain), step_median_ms=statistics.median(plain),
                profiled_step_ms=profiled_ms, parts=parts, final_loss=final_loss, forms=forms)


# -- one configuration's table -------------------------------------------------------------------------
#: the floor part each measured range is compared with
_FLOOR_OF = {"forward": "forward+backward", "backward": "forward+backward", "factors": "factors",
             "scalings": "scalings", "direction": "direction", "refresh": "refresh", "check": "check",
             "finite_check": "finite_check", "update": "update"}


def rows_for(model_name: str, cfg: Config, dims: Sequence[LayerDims], measured: dict[str, Any],
             rates: Rates, n_params: int) -> list[dict[str, Any]]:
    """One row per part of ``cfg``'s step: floor (flops, bytes, ms), measured ms (GEMM / other)."""
    curvature = cfg.kind in ("ekfac", "kfac", "tekfac")
    eigen_every = cfg.hparams.get("eigen_every") if curvature else None
    fl = floors(dims, eigen_every, scalings=cfg.kind != "kfac", forms=measured.get("forms"))
    if not curvature:  # the torch optimizers: one elementwise pass over the parameters
        passes = 5.0 if cfg.kind == "sgd" else 7.0  # SGD+momentum: p, g, m in; p, m out. AdamW: + v in/out
        fl = {"forward+backward": fl["forward+backward"], "optimizer": dict(flops=0.0, bytes=passes * 4 * n_params)}
    parts = measured["parts"]
    rows = []
    fb = parts.get("forward", {}).get("ms", 0.0) + parts.get("backward", {}).get("ms", 0.0)
    if curvature:  # the whole optimizer.step() against the sum of its parts' floors
        fl["optimizer"] = {k: sum(v[k] for part, v in fl.items() if part != "forward+backward")
                           for k in ("flops", "bytes")}
    order = (["forward+backward"] + [p for p in maths.RANGES if p in parts or p in fl]
             + ["optimizer"] if curvature else ["forward+backward", "optimizer"])
    for part in order:
        if part in ("directions",):  # the per-job ranges are the part; this one adds only the loop
            continue
        if part == "forward+backward":
            ms, gemm = fb, parts.get("forward", {}).get("gemm_ms", 0.0) + parts.get("backward", {}).get("gemm_ms", 0.0)
        elif part in parts:
            ms, gemm = parts[part]["ms"], parts[part]["gemm_ms"]
        else:
            ms, gemm = 0.0, 0.0
        floor = fl.get(part if part in fl else _FLOOR_OF.get(part, part))
        f_flops = floor["flops"] if floor else 0.0
        f_bytes = floor["bytes"] if floor else 0.0
        flop_ms = f_flops / rates.gemm_flops_per_s * 1e3
        byte_ms = f_bytes / rates.copy_bytes_per_s * 1e3
        floor_ms = flop_ms + byte_ms
        rows.append(dict(model=model_name, config=cfg.name, part=part, floor_gflop=f_flops / 1e9,
                         floor_mb=f_bytes / 2**20, floor_ms=floor_ms, ms=ms, gemm_ms=gemm, other_ms=ms - gemm,
                         over_floor=ms / floor_ms if floor_ms > 0 else None,
                         gemm_over_flop_floor=gemm / flop_ms if flop_ms > 0 else None,
                         other_over_byte_floor=(ms - gemm) / byte_ms if byte_ms > 0 else None))
    return rows


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def markdown(rows: list[dict[str, Any]], runs: list[dict[str, Any]], env: dict[str, Any], rates: Rates,
             descs: dict[str, str], dims: dict[str, list[LayerDims]]) -> str:
    lines = [f"Cost model, {env['device_name']} ({env['device']}, {env['threads']} torch threads), torch "
             f"{env['torch']}, {env['date']}.", f"Command: `{env['command']}`",
             f"Machine reference (same run): fp32 GEMM {rates.gemm_flops_per_s / 1e9:.1f} GFLOP/s (1024³), copy "
             f"{rates.copy_bytes_per_s / 1e9:.2f} GB/s (64 MB, read + write).",
             "Floors: the reference form on CPU, each layer's projection as its last step formed it (the module "
             "docstring of `bench/cost_model.py`; 'rows' below: layers whose projection came from the rows); "
             "'× floor' = measured / floor time; GEMM / other = the range's matrix-product time against the flop "
             "floor, the rest against the byte floor. Data: synthetic (timing only).", ""]
    for m, d in descs.items():
        lines.append(f"- `{m}`: {d}; layers (d_out × d̄_in, N×R): "
                     + ", ".join(f"{l.d_out}×{l.d_in_bar} ({l.examples}×{l.positions})" for l in dims[m]))
    lines += ["", "| model | config | step ms | step ms profiled | mean/SGD | rows |", "|---|---|---:|---:|---:|---:|"]
    sgd = {r["model"]: r["step_ms"] for r in runs if r["config"] == "sgd"}
    for r in runs:
        ratio = r["step_ms"] / sgd[r["model"]] if r["model"] in sgd else None
        forms = r.get("forms") or {}
        rows_used = f"{sum(f == 'rows' for f in forms.values())}/{len(forms)}" if forms else "–"
        lines.append(f"| {r['model']} | {r['config']} | {r['step_ms']:.2f} | {r['profiled_step_ms']:.2f} | "
                     f"{_f(ratio, '.2f')} | {rows_used} |")
    lines += ["", "| model | config | part | floor GFLOP | floor MB | floor ms | measured ms | × floor | GEMM ms | "
              "GEMM × flop floor | other ms | other × byte floor |", "|---|---|---|" + "---:|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['config']} | {r['part']} | {r['floor_gflop']:.4f} | {r['floor_mb']:.2f} | "
                     f"{r['floor_ms']:.3f} | {r['ms']:.3f} | {_f(r['over_floor'], '.1f')} | {r['gemm_ms']:.3f} | "
                     f"{_f(r['gemm_over_flop_floor'], '.1f')} | {r['other_ms']:.3f} | "
                     f"{_f(r['other_over_byte_floor'], '.1f')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cost_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma-separated configurations of bench.step_time")
    p.add_argument("--size", default="small", choices=SIZES)
    p.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (the CUDA ranges are not timed yet)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=12)
    p.add_argument("--steps", type=int, default=20, help="timed steps, then as many profiled steps")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/cost_model/cpu")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"error: unknown model {m!r} (--models): choose from {MODELS}")
    known = {c.name: c for c in configurations(10**9)}
    cfgs = []
    for name in [c for c in args.configs.split(",") if c]:
        if name not in known:
            raise SystemExit(f"error: unknown configuration {name!r} (--configs): choose from {sorted(known)}")
        cfgs.append(known[name])
    device = torch.device(args.device)
    with torch_threads(args.threads):
        env = environment(device, command_line("bench.cost_model", argv))
        rates = machine_rates()
        rows, runs, descs, dims = [], [], {}, {}
        for m in models:
            work = make_workload(m, False, device, size=args.size)
            descs[m] = work.description
            dims[m] = layer_dims(work.model, work.batches[0][0])
            n_params = sum(p.numel() for p in work.model.parameters())
            for cfg in cfgs:
                warmup = max(args.warmup, cfg.period or 0)
                steps = args.steps if not cfg.period else cfg.period * max(1, round(args.steps / cfg.period))
                measured = measure_parts(work.model, work.batches, work.loss_fn, cfg, warmup, steps)
                runs.append(dict(model=m, config=cfg.name, optimizer=cfg.describe(), warmup=warmup, steps=steps,
                                 **{k: v for k, v in measured.items() if k != "parts"}, parts=measured["parts"]))
                rows += rows_for(m, cfg, dims[m], measured, rates, n_params)
    table = markdown(rows, runs, env, rates, descs, dims)
    print(table)
    result = dict(environment=env, rates=asdict(rates), layers={m: [asdict(l) for l in ls] for m, ls in dims.items()},
                  descriptions=descs, runs=runs, rows=rows)
    if not args.no_write:
        out = args.out or Path(__file__).resolve().parent / "results" / "cost_model" / "cpu"
        out.mkdir(parents=True, exist_ok=True)
        stem = f"cost_model_{args.size}"
        (out / f"{stem}.md").write_text(table)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {out / (stem + '.md')}, {out / (stem + '.json')}")
    return result


if __name__ == "__main__":
    main()
