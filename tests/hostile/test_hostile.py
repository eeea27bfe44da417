"""The hostile-input suite: every case of tests/hostile/cases_*.py as one test, run in a worker
process (hostile_harness.py: a crash, an abort or a hang fails that case instead of the pytest run).

Known bugs are ``xfail(strict=True)`` with a precise reason, so fixing one turns its case into an
"XPASS(strict)" failure until the mark is removed. ``TTSCALE_HOSTILE_MODULES=cases_quant`` (comma
separated) restricts the run to some case modules while working on them.
"""
import os
import sys

import pytest

# the harness and case modules are imported by name, as the worker processes import them; a
# conftest.py here would do this too, but its module name would shadow tests/conftest.py for the
# tests that import it by name (from conftest import DEVICES)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hostile_harness as H  # noqa: E402

import ttscale.ops as ops

CASES = H.load_all()
ISAS = H.supported_isas()


def _params():
    for cid, c in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        yield pytest.param(cid, marks=marks, id=cid)


@pytest.fixture(scope="session")
def hostile_runner(request):
    # every selected case (after -k / deselection) goes to the workers at the first request, so
    # that the cost of starting a worker is paid once, not per test
    selected = [item.callspec.params["cid"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_hostile_case" and hasattr(item, "callspec")]
    return H.Runner(CASES, selected)


@pytest.mark.parametrize("cid", list(_params()))
def test_hostile_case(cid, hostile_runner):
    r = hostile_runner.result(cid)
    assert r.ok, f"{cid}: {r.detail}"


# ---------------------------------------------------------------- coverage of the suite itself
PUBLIC = sorted(set(ops.__all__) | {"SharedPrefixDecode"})
CATEGORIES = ("dtype", "shape", "stride", "device", "values", "nonfinite", "aliasing", "huge", "page_table")
NEEDED = {
    # op -> the categories that apply to its inputs (a new op without cases fails here)
    "attention": ("dtype", "shape", "stride", "device", "values", "nonfinite", "aliasing", "huge"),
    "paged_attention": ("dtype", "shape", "stride", "device", "values", "page_table", "nonfinite", "aliasing", "huge"),
    "append_paged_kv": ("dtype", "shape", "stride", "device", "page_table", "aliasing", "huge"),
    "copy_pages": ("dtype", "shape", "stride", "device", "page_table", "aliasing", "huge"),
    "sparse_paged_attention": ("dtype", "shape", "stride", "device", "values", "page_table", "nonfinite", "huge"),
    "attention_mass": ("dtype", "shape", "device", "page_table", "huge"),
    "new_page_summaries": ("dtype", "shape", "stride", "device", "page_table", "nonfinite", "huge"),
    "update_page_summaries": ("dtype", "shape", "stride", "device", "page_table", "aliasing", "huge"),
    "merge_attention_states": ("dtype", "shape", "stride", "device", "nonfinite", "aliasing"),
    "merge_attention_states_": ("dtype", "shape", "stride", "device", "nonfinite", "aliasing"),
    "SharedPrefixDecode": ("dtype", "shape", "device", "page_table", "nonfinite", "huge"),
    "sample": ("dtype", "shape", "stride", "device", "values", "nonfinite", "huge"),
    "sample_from_probs": ("dtype", "shape", "stride", "device", "values", "nonfinite", "huge"),
    "token_logprobs": ("dtype", "shape", "stride", "device", "values", "nonfinite", "huge"),
    "speculative_verify": ("dtype", "shape", "stride", "device", "values", "nonfinite", "huge"),
    "quant_matmul": ("dtype", "shape", "stride", "device", "values", "nonfinite", "huge"),
    "quantize": ("dtype", "shape", "stride", "device", "values", "nonfinite"),
    "dequantize": ("shape", "values"),
    "unpack": ("values",),
    "repack": ("values",),
    "QuantizedWeight": ("values",),
    "from_gptq": ("dtype", "shape", "stride", "device", "values", "huge"),
    "from_awq": ("dtype", "shape", "device", "values"),
}
# ops whose CPU kernels are chosen per SIMD path: their non-finite cases must run on every path
ISA_DISPATCHED = ("attention", "paged_attention", "sparse_paged_attention", "merge_attention_states",
                  "merge_attention_states_", "SharedPrefixDecode", "new_page_summaries", "sample", "sample_from_probs",
                  "token_logprobs", "quant_matmul")


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_op_has_hostile_cases(name):
    if H.os.environ.get("TTSCALE_HOSTILE_MODULES"):
        pytest.skip("TTSCALE_HOSTILE_MODULES restricts the case modules")
    assert name in NEEDED, f"{name} is public but has no entry in NEEDED (tests/hostile/test_hostile.py)"
    have = {c.category for c in CASES.values() if c.op == name}
    missing = [cat for cat in NEEDED[name] if cat not in have]
    assert not missing, f"{name}: no hostile cases of categories {missing} (tests/hostile/cases_*.py)"


@pytest.mark.parametrize("name", ISA_DISPATCHED)
def test_nonfinite_cases_run_on_every_cpu_path(name):
    if H.os.environ.get("TTSCALE_HOSTILE_MODULES"):
        pytest.skip("TTSCALE_HOSTILE_MODULES restricts the case modules")
    paths = {c.isa for c in CASES.values() if c.op == name and c.category == "nonfinite"}
    assert paths >= set(ISAS), f"{name}: non-finite cases run on {sorted(p for p in paths if p)}, not on every " \
                               f"supported path {ISAS} (register them with isa=True)"


def test_case_ids_are_well_formed():
    for cid, c in CASES.items():
        op, cat = cid.split("/")[:2]
        assert op in PUBLIC, f"{cid}: {op} is not exported by ttscale.ops (or SharedPrefixDecode)"
        assert cat in CATEGORIES, f"{cid}: unknown category {cat}"
