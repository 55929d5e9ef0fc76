"""benchmarks/profile_breakdown.py: kernels of a device trace grouped by name and by their fusion's output shape."""

import gzip
import json

import pytest

from benchmarks import profile_breakdown

# Lines of the optimized GPT-1 train step as an H200 compiled it (12 x 768, batch 64 x 512), shortened.
HLO = """\
  %fusion.382 = f32[64,12,512,512]{3,2,1,0} fusion(%get-tuple-element.918), kind=kCustom, calls=%fused_computation.354
  %loop_broadcast_fusion.24 = pred[12,64,12,512,512]{4,3,2,1,0} fusion(), kind=kLoop, calls=%fused_broadcast.24
  %input_reduce_fusion.9 = f32[64,12,512]{2,1,0} fusion(%a, %b), kind=kInput, calls=%fused_reduce.9
  %wrapped_select = f32[8192,40576]{1,0} fusion(%a, %b, %c), kind=kLoop, calls=%wrapped_select_computation
  %input_add_reduce_fusion = (bf16[128,3072]{1,0}, bf16[64,512,3072]{2,1,0}) fusion(%a), kind=kInput
  ROOT %tuple.1 = (f32[], f32[]) tuple(%a, %b)
"""


def write_trace(path, kernels, device="/device:GPU:0"):
    events = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
              {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": device}}]
    events += [{"ph": "X", "pid": 1, "tid": 3, "ts": 10.0 * i, "dur": dur, "name": name}
               for i, (name, dur) in enumerate(kernels)]
    events.append({"ph": "X", "pid": 7, "tid": 1, "ts": 0.0, "dur": 999.0, "name": "PjitFunction(train_step)"})
    with gzip.open(path, "wt") as out:
        json.dump({"traceEvents": events}, out)


def test_kernels_are_grouped_by_their_fusions_shapes():
    shapes = profile_breakdown.fusion_shapes(HLO)
    assert shapes["loop_broadcast_fusion.24"].startswith("pred[12,64,12,512,512]")
    assert shapes["input_add_reduce_fusion"].startswith("(bf16[128,3072]")

    def group(name):
        return profile_breakdown.group(name, profile_breakdown.shape_of(name, shapes), n_layer=12, n_ctx=512)
    assert group("fusion_382").startswith("attention softmax")
    assert group("input_reduce_fusion_9").startswith("attention softmax")
    assert group("loop_broadcast_fusion_24").startswith("filling the lax.scan")
    assert group("wrapped_select") == "elementwise on the vocabulary-wide logits"
    assert group("input_add_reduce_fusion").startswith("everything else")
    assert group("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n") == "matrix products, float32 (TF32)"
    assert group("nvjet_sm90_tst_192x192_64x3") == "matrix products, bfloat16"
    assert group("memcpy128") == "device-to-device copies"


def test_the_table_sums_the_device_kernels_only(tmp_path, capsys, monkeypatch):
    (tmp_path / "train_step.hlo.txt").write_text(HLO)
    (tmp_path / "plugins").mkdir()
    kernels = [("fusion_382", 30.0), ("nvjet_sm90_tst", 60.0), ("memcpy128", 10.0)]
    write_trace(tmp_path / "plugins" / "vm.trace.json.gz", kernels)
    monkeypatch.setattr("sys.argv", ["profile_breakdown.py", str(tmp_path), "--steps", "1"])
    profile_breakdown.main()
    out = capsys.readouterr().out
    assert "3 kernels a step" in out
    assert "| matrix products, bfloat16 | 0.1 | 60.0% |" in out
    assert "| device-to-device copies | 0.0 | 10.0% |" in out
    assert "PjitFunction" not in out


def test_a_trace_without_a_device_timeline_says_so(tmp_path):
    write_trace(tmp_path / "vm.trace.json.gz", [("ThunkExecutor::Execute", 5.0)], device="/host:CPU:other")
    with pytest.raises(SystemExit, match="no device timeline"):
        profile_breakdown.device_kernels(tmp_path / "vm.trace.json.gz")
