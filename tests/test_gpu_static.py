"""The static GPU gate's parsing and verdict (benchmarks/gpu_static.py): ptxas -v logs, TTGIR layout conversions
inside loops, the pass/fail rules, the table. Pure functions on recorded text: no compile, no GPU (the gate itself
runs as `make check-gpu-static` in CI)."""

from __future__ import annotations

import pytest

from benchmarks.gpu_static import (
    ACCEPTED_SPILLS,
    REG_LIMIT,
    count_layout_conversions,
    format_table,
    loop_conversions_between_threads,
    parse_ptxas_log,
    row_problems,
)

# ptxas -v of two entries, as triton 3.9's ptxas-blackwell prints it (sm_90a), the second with spills.
PTXAS_LOG = """\
ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function '_warp_bwd_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _warp_bwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 184 registers, used 1 barriers, 632 bytes cmem[0]
ptxas-blackwell info    : Compile time = 173.154 ms
ptxas info    : Compiling entry function '_cos_bwd_kernel' for 'sm_80'
ptxas info    : Function properties for _cos_bwd_kernel
    24 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, 612 bytes cmem[0]
"""

# The shape of triton's TTGIR for the old warp backward: conversions before the channel loop (hoisted) and in it.
TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [2], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>
module attributes {"ttg.num-warps" = 4 : i32} {
  tt.func public @_warp_bwd_kernel(%arg0: !tt.ptr<f32>) attributes {noinline = false} {
    %1 = ttg.convert_layout %m_108 : tensor<256xi1, #blocked> -> tensor<256xi1, #blocked1> loc(#loc66)
    %r = tt.make_range {end = 256 : i32, start = 0 : i32} : tensor<256xi32, #blocked> loc(#loc1)
    %gw:2 = scf.for %_c = %c0_i32 to %C step %c1_i32 iter_args(%a = %b, %c = %d) -> (f32, f32)  : i32 {
      %26 = ttg.convert_layout %24 : tensor<256xf32, #blocked> -> tensor<256xf32, #blocked1> loc(#loc66)
      %x = scf.if %cond -> (f32) {
        %27 = ttg.convert_layout %25 : tensor<256xf32, #blocked> -> tensor<256xf32, #blocked1> loc(#loc66)
        scf.yield %z : f32 loc(#loc3)
      } else {
        scf.yield %w : f32 loc(#loc3)
      } loc(#loc4)
      scf.yield %p, %q : f32, f32 loc(#loc5)
    } loc(#loc6)
    %9 = ttg.convert_layout %m_146 : tensor<256xi1, #blocked> -> tensor<256xi1, #blocked1> loc(#loc66)
    tt.return loc(#loc7)
  } loc(#loc8)
} loc(#loc9)
"""


def _row(**kw) -> dict:
    row = {"triton": "3.9.0", "arch": "sm_90", "family": "warp", "kernel": "_warp_bwd_kernel", "variant": "bwd 3D",
           "dtype": "fp32", "num_warps": 8, "regs": 80, "spill_stores": 0, "spill_loads": 0, "stack": 0,
           "smem": 0, "loop_converts": 0, "inputs_written": [], "error": None}
    row.update(kw)
    return row


def test_parse_ptxas_log_reads_registers_spills_barriers_per_entry():
    info = parse_ptxas_log(PTXAS_LOG)
    assert info["_warp_bwd_kernel"] == {"arch": "sm_90a", "regs": 184, "barriers": 1, "stack": 0,
                                        "spill_stores": 0, "spill_loads": 0}
    assert info["_cos_bwd_kernel"] == {"arch": "sm_80", "regs": 255, "barriers": 0, "stack": 24,
                                       "spill_stores": 12, "spill_loads": 8}
    assert parse_ptxas_log("ptxas fatal   : Unsupported .version 9.4") == {}


def test_count_layout_conversions_separates_loop_bodies_from_the_rest():
    # 4 in all: one before the loop, one in its body, one in an scf.if nested in it, one after it.
    assert count_layout_conversions(TTGIR) == (4, 2)
    assert count_layout_conversions(TTGIR.replace("scf.for", "scf.execute_region")) == (4, 0)
    assert count_layout_conversions("") == (0, 0)


# The cosine backward's channel loop with channels-last inputs (triton 3.9, sm_90, trimmed): #blocked1 -> #blocked3
# keeps every element on its thread (only sizePerThread differs along the dim each thread holds whole): a register
# renaming; #blocked1 -> #blocked2 spreads dim 0 over warps: data moves between threads.
TTGIR_CL = """\
#blocked1 = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [1, 4], order = [1, 0]}>
#blocked2 = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [1, 32], warpsPerCTA = [2, 2], order = [1, 0]}>
#blocked3 = #ttg.blocked<{sizePerThread = [4, 1], threadsPerWarp = [1, 32], warpsPerCTA = [1, 4], order = [0, 1]}>
module {
    %m = ttg.convert_layout %x : tensor<4x256xi1, #blocked1> -> tensor<4x256xi1, #blocked2> loc(#loc1)
    scf.for %c0 = %c0_i32 to %C0 step %c4_i32  : i32 {
  %a = ttg.convert_layout %pa : tensor<4x256x!tt.ptr<f32>, #blocked1> -> tensor<4x256x!tt.ptr<f32>, #blocked3>
  %b = ttg.convert_layout %pb : tensor<4x256x!tt.ptr<f32>, #blocked1> -> tensor<4x256x!tt.ptr<f32>, #blocked2>
  %g = ttg.convert_layout %g : tensor<256xf32, #blocked1> -> tensor<256xf32, #ttg.slice<{dim = 0, parent = #blocked3}>>
    } loc(#loc5)
} loc(#loc6)
"""


def test_loop_conversions_between_threads_leave_out_register_renamings():
    assert count_layout_conversions(TTGIR_CL) == (4, 3)
    # in the loop: the renaming to #blocked3 is free; #blocked2 (warps over dim 0) and the slice layout are not
    assert loop_conversions_between_threads(TTGIR_CL) == 2
    assert loop_conversions_between_threads(TTGIR_CL.replace("#blocked2>", "#blocked3>")) == 1


def test_a_clean_row_passes():
    assert row_problems(_row()) == []
    assert row_problems(_row(regs=REG_LIMIT)) == []


@pytest.mark.parametrize(("kw", "needle"), [
    ({"regs": 184, "num_warps": 4}, "184 registers > 128 (at 4 warps)"),
    ({"spill_stores": 12, "spill_loads": 8, "dtype": "bf16"}, "spills 12 B stored / 8 B loaded in bf16"),
    ({"loop_converts": 16}, "16 layout conversions inside a loop"),
    ({"inputs_written": ["flow_ptr"]}, "input(s) flow_ptr reported as written"),
    ({"regs": None}, "no ptxas register count"),
])
def test_each_rule_fails_a_row(kw, needle):
    probs = row_problems(_row(**kw))
    assert len(probs) == 1 and needle in probs[0], probs


def test_rules_that_depend_on_dtype_and_kernel():
    # fp64 variants exist for gradcheck only: spills there are allowed; registers still count.
    assert row_problems(_row(dtype="fp64", spill_stores=8, spill_loads=8)) == []
    assert row_problems(_row(dtype="fp64", regs=200)) != []
    # Layout conversions are a rule for the warp kernels (atomics); the cosine kernels' final reduction needs some.
    assert row_problems(_row(kernel="_cos_fwd_kernel", family="cosine", loop_converts=3)) == []
    # The cosine backward: loop conversions between threads fail (channels-last inputs with contiguous gradients:
    # 6 of them, 24 bar.sync), register renamings (same element-to-thread map) pass.
    bwd = _row(kernel="_cos_bwd_kernel", family="cosine", loop_converts=18)
    assert row_problems({**bwd, "loop_converts_between_threads": 6}) == [
        "6 layout conversions inside a loop move data between threads (shared memory + barriers)"]
    assert row_problems({**bwd, "loop_converts_between_threads": 0}) == []


def test_an_accepted_spill_passes_up_to_its_bytes_only():
    (triton, arch, kernel, variant), most = next(iter(ACCEPTED_SPILLS.items()))
    row = _row(triton=triton, arch=arch, kernel=kernel, variant=variant, family="cosine", spill_stores=4,
               spill_loads=most - 4)
    assert row_problems(row) == []
    assert row_problems({**row, "spill_loads": most}) != []
    assert row_problems({**row, "arch": "sm_90"}) != []  # only where it was looked at


def test_a_compile_error_is_the_only_reason_given():
    assert row_problems(_row(error="CompilationError: boom", regs=None)) == ["compile error: CompilationError: boom"]


def test_table_has_one_line_per_variant_and_one_column_per_triton_and_target():
    rows = [_row(), _row(arch="sm_80", regs=90), _row(triton="3.6.0", regs=200, num_warps=4),
            _row(variant="fwd 2D", kernel="_warp_fwd_kernel", smem=16)]
    for r in rows:
        r["problems"] = row_problems(r)
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["kernel", "variant", "dtype", "3.9.0", "sm_90", "3.9.0", "sm_80", "3.6.0", "sm_90"]
    body = [ln.split() for ln in lines[2:4]]
    assert body[0][-3:] == ["80/0/0", "90/0/0", "200/0/0!"]
    assert body[1][-3:] == ["80/0/16", "-", "-"]
