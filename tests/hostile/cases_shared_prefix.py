"""Hostile inputs for ttscale.attention.SharedPrefixDecode (multi-level shared-prefix decode: a paged
attention call per level, merged by merge_attention_states_). Results are compared with dense float64
attention of each branch over the concatenation of the keys of every level it belongs to."""
import torch

from ttscale.attention import Level, SharedPrefixDecode
from hostile_harness import EITHER, case, raises
from hostile_inputs import INF, NAN, i32, i64, like_ref, meta
from ttscale.reference.attention import attention_ref
from ttscale.reference.paged_attention import gather_kv

OP = "SharedPrefixDecode"
PLAN_CASTS = ("SharedPrefixDecode.plan() converts every page-table tensor with .to(torch.int32) without "
              "checking its dtype or range: int64 entries past 2^31 wrap around (2^32 + 1 becomes page 1, which "
              "is then read as if it had been asked for) and float tables are truncated, where paged_attention "
              "itself refuses anything but int32")


def _setup(n=3, ps=4):
    """16 pages; a 3-page shared prefix (12 tokens) and one private page per branch."""
    g = torch.Generator().manual_seed(2)
    kc, vc = torch.randn(16, ps, 2, 64, generator=g), torch.randn(16, ps, 2, 64, generator=g)
    q = torch.randn(n, 4, 64, generator=g)
    levels = [Level.shared(n, i32(0, 1, 2), ps), Level.per_branch(i32(0, 1, 2, 3), i32(5, 6, 7), i32(2, 3, 1))]
    return q, kc, vc, levels


def _ref(q, kc, vc, levels):
    """Each branch's attention over the keys of all its levels, in float64."""
    outs, lses = [], []
    for n in range(q.shape[0]):
        ks, vs = [], []
        for lv in levels:
            qo = lv.qo_indptr.tolist()
            grp = max(j for j in range(len(qo) - 1) if qo[j] <= n < qo[j + 1]) if qo[-1] > n else None
            if grp is None:
                continue
            ks.append(gather_kv(kc, lv.kv_indptr.int(), lv.kv_indices.int(), lv.kv_last_page_len.int(), grp))
            vs.append(gather_kv(vc, lv.kv_indptr.int(), lv.kv_indices.int(), lv.kv_last_page_len.int(), grp))
        o, l = attention_ref(q[None, n:n + 1], torch.cat(ks)[None], torch.cat(vs)[None])
        outs.append(o[0, 0])
        lses.append(l[0, 0])
    return torch.stack(outs), torch.stack(lses)


def _vs_ref(q, kc, vc, levels, what, nan_exact=True):
    out, lse = SharedPrefixDecode().plan(levels).run(q, kc, vc, return_lse=True)
    ro, rl = _ref(q, kc, vc, levels)
    like_ref(out, ro, what + " (output)", 1e-4, nan_exact=nan_exact)
    like_ref(lse, rl, what + " (LSE)", 1e-3)
    return out, lse


def _run(levels, q=None, kc=None, vc=None):
    q0, kc0, vc0, _ = _setup()
    return lambda: SharedPrefixDecode().plan(levels).run(q0 if q is None else q, kc0 if kc is None else kc,
                                                        vc0 if vc is None else vc)


# ---------------------------------------------------------------- dtype
@case(OP, "dtype/q_float64")
def _():
    q, kc, vc, levels = _setup()
    raises(_run(levels, q=q.double()), "q must be one of")


@case(OP, "dtype/q_differs_from_cache")
def _():
    q, kc, vc, levels = _setup()
    raises(_run(levels, q=q.bfloat16()), "k_cache dtype")


@case(OP, "dtype/kv_indices_float", xfail=PLAN_CASTS)
def _():
    q, kc, vc, _ = _setup()
    raises(_run([Level(i32(0, 3), i32(0, 2), torch.tensor([0.0, 1.7]), i32(4))]), "kv_indices", types=EITHER)


@case(OP, "dtype/qo_indptr_bool", xfail=PLAN_CASTS)
def _():
    q, kc, vc, _ = _setup(n=1)
    raises(_run([Level(torch.tensor([False, True]), i32(0, 1), i32(0), i32(4))], q=q), "qo_indptr", types=EITHER)


# ---------------------------------------------------------------- shape
@case(OP, "shape/no_levels")
def _():
    raises(lambda: SharedPrefixDecode().plan([]), "needs at least one level", types=(ValueError,))


@case(OP, "shape/levels_cover_different_branch_counts")
def _():
    raises(_run([Level.shared(3, i32(0), 4), Level.per_branch(i32(0, 1, 2), i32(5, 6), i32(4, 4))]),
           "levels[1].qo_indptr ends at 2 branches but levels[0] has 3", types=(ValueError,))


@case(OP, "shape/q_rows_not_branches")
def _():
    q, kc, vc, levels = _setup()
    raises(_run(levels, q=q[:2]), "q must be [num_branches=3", types=(ValueError,))


@case(OP, "shape/q_2d")
def _():
    q, kc, vc, levels = _setup()
    raises(_run(levels, q=q[:, 0]), "q must be [num_branches=3", types=(ValueError,))


@case(OP, "shape/kv_indptr_wrong_length")
def _():
    raises(_run([Level(i32(0, 3), i32(0, 1, 2), i32(0, 1), i32(4))]), "levels[0].kv_indptr must have one entry per group",
           types=(ValueError,))


@case(OP, "shape/qo_indptr_2d")
def _():
    raises(_run([Level(i32(0, 3)[None], i32(0, 1), i32(0), i32(4))]), "levels[0].qo_indptr must be 1-D",
           types=(ValueError,))


@case(OP, "shape/run_before_plan")
def _():
    q, kc, vc, _ = _setup()
    raises(lambda: SharedPrefixDecode().run(q, kc, vc), "before plan()")


@case(OP, "shape/head_dim_96")
def _():
    raises(_run(_setup()[3], q=torch.randn(3, 4, 96), kc=torch.randn(16, 4, 2, 96), vc=torch.randn(16, 4, 2, 96)),
           "head_dim")


# ---------------------------------------------------------------- device
@case(OP, "device/q_meta")
def _():
    q, kc, vc, levels = _setup()
    raises(_run(levels, q=meta(q)), "same device")


@case(OP, "device/v_cache_meta")
def _():
    q, kc, vc, levels = _setup()
    raises(_run(levels, vc=meta(vc)), "same device")


# ---------------------------------------------------------------- page table
@case(OP, "page_table/qo_indptr_not_monotone")
def _():
    raises(_run([Level(i32(0, 2, 1, 3), i32(0, 1, 2, 2), i32(0, 1), i32(4, 4, 0))]),
           "levels[0].qo_indptr must start at 0 and be non-decreasing")


@case(OP, "page_table/qo_indptr_not_starting_at_0")
def _():
    raises(_run([Level(i32(1, 3), i32(0, 1), i32(0), i32(4))]), "must start at 0")


@case(OP, "page_table/page_out_of_range")
def _():
    raises(_run([Level.shared(3, i32(0, 16), 4)]), "kv_indices[1] = 16")


@case(OP, "page_table/last_page_len_past_page_size")
def _():
    raises(_run([Level.shared(3, i32(0, 1), 5)]), "kv_last_page_len[0] = 5")


@case(OP, "page_table/kv_indptr_end_not_nnz")
def _():
    raises(_run([Level(i32(0, 3), i32(0, 3), i32(0, 1), i32(4))]), "kv_indptr must end")


@case(OP, "page_table/group_without_pages_is_valid", isa=True)
def _():
    # branch 1 has no private page (an empty group contributes LSE -inf and leaves the merge as it was)
    q, kc, vc, _ = _setup()
    levels = [Level.shared(3, i32(0, 1, 2), 2), Level.per_branch(i32(0, 1, 1, 2), i32(5, 7), i32(2, 0, 1))]
    _vs_ref(q, kc, vc, levels, "a branch without private pages")


@case(OP, "page_table/three_levels_and_shared_pages_twice", isa=True)
def _():
    q, kc, vc, _ = _setup(n=4)
    levels = [Level.shared(4, i32(0, 1), 4),
              Level(i32(0, 2, 4), i32(0, 2, 3), i32(2, 3, 2), i32(3, 4)),  # page 2 in both groups
              Level.per_branch(i32(0, 1, 2, 3, 4), i32(9, 10, 11, 12), i32(1, 2, 3, 4))]
    _vs_ref(q, kc, vc, levels, "three levels")


# ---------------------------------------------------------------- huge
@case(OP, "huge/kv_indices_int64_2^32+1", xfail=PLAN_CASTS)
def _():
    raises(_run([Level.shared(3, i64(0, 2**32 + 1), 4)]), "kv_indices", types=EITHER)


@case(OP, "huge/kv_indptr_int64_2^32+2", xfail=PLAN_CASTS)
def _():
    raises(_run([Level(i32(0, 3), i64(0, 2**32 + 2), i32(0, 1), i32(4))]), "kv_indptr", types=EITHER)


@case(OP, "huge/qo_indptr_int64_2^40")
def _():
    # 2^40 branches cannot match q's 3 rows, and nothing is sized by the branch count
    raises(_run([Level(i64(0, 2**40), i32(0, 2), i32(0, 1), i32(2))]), "q must be [num_branches=1099511627776")


@case(OP, "huge/last_page_len_2^40")
def _():
    # refused by torch while Level.shared builds the int32 tensor (the message names the overflow)
    raises(lambda: _run([Level.shared(3, i32(0, 1), 2**40)])(), "int32 without overflow", types=(RuntimeError,))


@case(OP, "huge/page_2^31-1_of_expanded_cache_is_read", isa=True)
def _():
    # 2^31 logical pages backed by one page of memory (stride 0): the last one is read like page 0
    q, kc, vc, _ = _setup()
    kce, vce = kc[:1].expand(2**31, 4, 2, 64), vc[:1].expand(2**31, 4, 2, 64)
    out = SharedPrefixDecode().plan([Level.shared(3, i32(2**31 - 1), 4)]).run(q, kce, vce)
    want, _ = _ref(q, kc, vc, [Level.shared(3, i32(0), 4)])
    like_ref(out, want, "page 2^31-1 of an expanded cache", 1e-4)


# ---------------------------------------------------------------- non-finite (every CPU path)
@case(OP, "nonfinite/nan_prefix_key_poisons_every_branch", isa=True)
def _():
    q, kc, vc, levels = _setup()
    kc[1, 1, 1, 5] = NAN  # a shared prefix key of KV head 1: heads 2, 3 of every branch
    out, _ = _vs_ref(q, kc, vc, levels, "NaN in the shared prefix")
    assert out[:, 2:].isnan().all() and torch.isfinite(out[:, :2]).all(), "case setup"


@case(OP, "nonfinite/poison_past_each_level_end_never_read", isa=True)
def _():
    q, kc, vc, levels = _setup()
    vc[6, 3] = INF     # past branch 1's 3-token private page
    kc[7, 1:] = NAN    # past branch 2's 1-token private page
    kc[3], vc[4] = NAN, INF  # pages no level lists
    out, _ = _vs_ref(q, kc, vc, levels, "poison outside every level")
    assert torch.isfinite(out).all(), "case setup"


@case(OP, "nonfinite/nan_query_of_one_branch", isa=True)
def _():
    q, kc, vc, levels = _setup()
    q[2, 0, 9] = NAN
    _vs_ref(q, kc, vc, levels, "NaN query of one branch")


@case(OP, "nonfinite/inf_value_in_private_page", isa=True)
def _():
    q, kc, vc, levels = _setup()
    vc[5, 1, 0, 3] = -INF  # branch 0's private token 1
    _vs_ref(q, kc, vc, levels, "-inf value seen by one branch", nan_exact=False)
