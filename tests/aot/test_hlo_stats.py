"""Reading an optimized program: argument bytes as laid out, and the collectives one execution runs."""

from gpt1_jax.aot import hlo_stats

# A hand-written module in the form XLA prints for a TPU: tiled layouts, a loop whose condition is `i < 12`,
# an asynchronous all-gather pair, and a reduce-scatter written as a fusion around an all-reduce.
LAYOUT = "(f32[12,768]{1,0:T(8,128)}, s32[]{:T(128)}, bf16[3,100]{1,0:T(8,128)(2,1)})->f32[]{:T(128)}"
PROGRAM = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={@LAYOUT@}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[]{:T(128)} parameter(0)
  %b = f32[]{:T(128)} parameter(1)
  ROOT %sum = f32[]{:T(128)} add(%a, %b)
}

%cond (p: (s32[], f32[16,64])) -> pred[] {
  %p = (s32[]{:T(128)}, f32[16,64]{1,0:T(8,128)}) parameter(0)
  %limit = s32[]{:T(128)} constant(12)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %limit), direction=LT
}

%all-reduce-scatter.1 (input: f32[64,64]) -> f32[16,64] {
  %input = f32[64,64]{1,0:T(8,128)} parameter(0)
  %all-reduce.9 = f32[64,64]{1,0:T(8,128)} all-reduce(%input), replica_groups={{0,1,2,3}}, to_apply=%add
  %offset = u32[]{:T(128)} constant(0)
  ROOT %slice = f32[16,64]{1,0:T(8,128)} dynamic-slice(%all-reduce.9, %offset, %offset), dynamic_slice_sizes={16,64}
}

%body (q: (s32[], f32[16,64])) -> (s32[], f32[16,64]) {
  %q = (s32[]{:T(128)}, f32[16,64]{1,0:T(8,128)}) parameter(0)
  %x = f32[16,64]{1,0:T(8,128)} get-tuple-element(%q), index=1
  %ag = f32[64,64]{1,0:T(8,128)} all-gather(%x), dimensions={0}, replica_groups={{0,1,2,3}}
  %rs = f32[16,64]{1,0:T(8,128)} fusion(%ag), kind=kCustom, calls=%all-reduce-scatter.1
  %j = s32[]{:T(128)} get-tuple-element(%q), index=0
  ROOT %next = (s32[]{:T(128)}, f32[16,64]{1,0:T(8,128)}) tuple(%j, %rs)
}

ENTRY %main (arg0: f32[12,768], arg1: s32[], arg2: bf16[3,100]) -> f32[] {
  %arg0 = f32[12,768]{1,0:T(8,128)} parameter(0)
  %arg1 = s32[]{:T(128)} parameter(1)
  %start = (f32[12,768]{1,0:T(8,128)}, f32[48,768]{1,0:T(8,128)}) all-gather-start(%arg0), dimensions={0}
  %done = f32[48,768]{1,0:T(8,128)} all-gather-done(%start)
  %init = (s32[]{:T(128)}, f32[16,64]{1,0:T(8,128)}) tuple(%arg1, %arg1)
  %loop = (s32[]{:T(128)}, f32[16,64]{1,0:T(8,128)}) while(%init), condition=%cond, body=%body
  %ar = f32[12,768]{1,0:T(8,128)} all-reduce(%arg0), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %out = f32[]{:T(128)} constant(0)
}
""".replace("@LAYOUT@", LAYOUT)


def test_arguments_are_measured_as_laid_out_in_tiles():
    assert hlo_stats.entry_argument_bytes(PROGRAM) == [16 * 768 * 4, 128 * 4, 8 * 128 * 2]
    assert hlo_stats.laid_out_bytes("pred", "12,16,512", "2,1,0:T(32,128)(4,1)") == 12 * 32 * 512


def test_collectives_are_counted_per_execution_with_loop_trips_and_fused_reduce_scatters():
    found = hlo_stats.collectives(PROGRAM)
    assert set(found) == {"all-gather", "all-reduce", "reduce-scatter"}
    # The async pair once (its gathered output), plus one gather per iteration of the 12-trip loop.
    assert found["all-gather"] == hlo_stats.CollectiveStats(1 + 12, 48 * 768 * 4 + 12 * 64 * 64 * 4)
    # The reduce-scatter fusion counts as one reduce-scatter (its full input), not as the all-reduce inside it.
    assert found["reduce-scatter"] == hlo_stats.CollectiveStats(12, 12 * 64 * 64 * 4)
    assert found["all-reduce"] == hlo_stats.CollectiveStats(1, 12 * 768 * 4)
