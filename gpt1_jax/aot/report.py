"""A compile report as text for people and as one JSON object for scripts (memory in bytes, per chip)."""

from __future__ import annotations

import math

from gpt1_jax.aot import fit
from gpt1_jax.aot.measure import StepReport
from gpt1_jax.aot.slices import GiB
from gpt1_jax.aot.steps import CompileReport

MEMORY_ROWS = (("parameters", "parameters"), ("optimizer_state", "optimizer state"), ("batch", "batch"),
               ("temporaries", "temporaries"), ("outputs", "outputs"), ("program", "program"))


def text(report: CompileReport) -> str:
    tpu = report.slice
    lines = [f"{report.run} on {tpu.describe()}",
             f"mesh: data {report.mesh['data']} x fsdp {report.mesh['fsdp']}",
             f"shapes: {report.shapes}"]
    for step in report.steps:
        lines += ["", *_step_text(step)]
    return "\n".join(lines)


def _step_text(step: StepReport) -> list[str]:
    memory = step.memory
    if step.refused:
        lines = [f"{step.name}: the compiler refused it for want of HBM ({step.compile_seconds:.0f} s): {step.refused}",
                 "  memory per chip (GiB; arguments as their shards' sizes, temporaries as the compiler counted them):"]
    else:
        lines = [f"{step.name} (compiled in {step.compile_seconds:.0f} s)", "  memory per chip (GiB):"]
    lines += [f"    {label:<16} {getattr(memory, key) / GiB:8.3f}" for key, label in MEMORY_ROWS]
    lines.append(f"    {'total':<16} {memory.total / GiB:8.3f} of {step.hbm_bytes / GiB:.3f} for programs")
    lines.append("  " + verdict(step))
    if step.refused:
        return lines
    if step.collectives:
        lines.append("  collectives per step: " + ", ".join(
            f"{kind} x{stats.count} ({stats.bytes / 2**20:,.1f} MiB)" for kind, stats in step.collectives.items()))
    else:
        lines.append("  collectives per step: none")
    lines.append(f"  FLOPs per chip: {_tera(step.model_flops)} by the model formula (matmuls), {_tera(step.xla_flops)} "
                 "by XLA's cost_analysis (which counts a loop body once: the layer scan, accumulation, loss chunks)")
    return lines


def verdict(step: StepReport) -> str:
    share = abs(step.margin) / step.hbm_bytes
    if step.fits:
        return f"FITS, {step.margin / GiB:.3f} GiB ({share:.1%} of HBM) to spare"
    return f"DOES NOT FIT, {-step.margin / GiB:.3f} GiB ({share:.1%} of HBM) over"


def suggestions_text(found: dict[str, fit.Candidate | None]) -> str:
    lines = ["What would make it fit (each compiled; one change at a time):"]
    for lever, candidate in found.items():
        if candidate is None:
            lines.append(f"  {lever}: no setting fits")
        else:
            lines.append(f"  {candidate.flags()}  ({candidate.total_bytes / GiB:.3f} GiB per chip)")
    if not any(found.values()):
        lines.append("  --fit tries them together.")
    return "\n".join(lines)


def search_text(candidate: fit.Candidate | None) -> str:
    order = ", then ".join(fit.LEVERS)
    if candidate is None:
        return (f"No config fits (searched {order}): lower train.batch_size or train.eval_batch_size, shrink the "
                "model, or take a slice with more HBM per chip.")
    return (f"First config that fits (searched {order}), {candidate.total_bytes / GiB:.3f} GiB per chip:\n"
            f"  {candidate.flags()}")


def as_json(report: CompileReport, found: dict[str, fit.Candidate | None] | None = None,
            searched: fit.Candidate | None = None, search_done: bool = False) -> dict:
    tpu = report.slice
    result = {
        "slice": {"name": tpu.name, "topology": tpu.topology, "chips": tpu.chips, "hosts": tpu.hosts,
                  "chip_kind": tpu.chip_kind, "hbm_bytes_per_chip": tpu.hbm_bytes},
        "run": report.run, "mesh": report.mesh, "shapes": report.shapes, "fits": report.fits,
        "steps": [_step_json(step) for step in report.steps],
    }
    if found is not None:
        result["suggestions"] = {lever: None if c is None else _candidate_json(c) for lever, c in found.items()}
    if search_done:
        result["fit"] = None if searched is None else _candidate_json(searched)
    return result


def _step_json(step: StepReport) -> dict:
    memory = {key: getattr(step.memory, key) for key, _ in MEMORY_ROWS}
    return {"name": step.name, "compile_seconds": step.compile_seconds,
            "memory_bytes_per_chip": {**memory, "total": step.memory.total}, "hbm_bytes_per_chip": step.hbm_bytes,
            "memory_analysis": step.memory_analysis,
            "fits": step.fits, "margin_bytes": step.margin, "refused_by_compiler": step.refused or None,
            "collectives": {kind: {"count": s.count, "bytes": s.bytes} for kind, s in step.collectives.items()},
            "flops_per_chip": {"model": step.model_flops, "xla_cost_analysis": step.xla_flops}}


def _candidate_json(candidate: fit.Candidate) -> dict:
    return {"changes": dict(candidate.changes), "flags": candidate.flags(),
            "total_bytes_per_chip": candidate.total_bytes, "fits": candidate.fits}


def _tera(flops: float) -> str:
    return "n/a" if math.isnan(flops) else f"{flops / 1e12:,.3f} TFLOP"
