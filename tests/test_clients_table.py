"""mergequant/quant/clients.py (what loads where, as data) against the measured serving matrix.

bench/results/serving-matrix.json is what scripts/serving_matrix.py measured by really loading each
setting in each engine; clients.VERIFIED is what quantize warns about and the card claims. They must
agree verdict for verdict, so a matrix rerun that changes anything fails here until the table follows.
Fast: no engine is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergequant.quant import clients

ROOT = Path(__file__).resolve().parents[1]
MATRIX_JSON = ROOT / "bench" / "results" / "serving-matrix.json"


@pytest.fixture(scope="module")
def measured() -> dict:
    return json.loads(MATRIX_JSON.read_text(encoding="utf-8"))


def test_matrix_covers_every_setting_of_the_table(measured):
    rows = {r["id"]: r for r in measured["settings"]}
    assert set(rows) == set(clients.MATRIX)
    for sid, (method, settings) in clients.MATRIX.items():
        assert (rows[sid]["method"], rows[sid]["settings"]) == (method, settings), sid


def test_table_verdicts_equal_the_measured_ones(measured):
    for row in measured["settings"]:
        got = {e: cell["status"] for e, cell in row["engines"].items() if cell["status"] != "n/a"}
        table = {e: status for e, (status, _) in clients.VERIFIED.get(row["id"], {}).items()}
        assert table == got, (row["id"], table, got)


def test_loads_means_the_same_perplexity(measured):
    tol = measured["perplexity"]["tolerance"]
    for row in measured["settings"]:
        for engine, cell in row["engines"].items():
            if cell["status"] == "loads":
                assert abs(cell["perplexity"] / row["ours"] - 1) <= tol, (row["id"], engine, cell)
            elif cell["status"] != "n/a":
                assert cell["reason"], (row["id"], engine)


def test_every_matrix_setting_is_covered_by_rows_with_its_verdicts():
    """matching() may answer for a setting with another row of its kind (group 32 -> the group-128 row);
    the verdicts it then gives must be the setting's own measured ones."""
    for sid, (method, settings) in clients.MATRIX.items():
        rows = clients.verdicts(method, settings)
        assert rows, sid
        for engine, (status, _) in clients.VERIFIED[sid].items():
            combined = "loads" if all(st == "loads" for _, st, _ in rows[engine]) else "not"
            assert combined == ("loads" if status == "loads" else "not"), (sid, engine, rows[engine])


@pytest.mark.parametrize("sid", list(clients.MATRIX))
def test_warnings_follow_the_verdicts(sid):
    method, settings = clients.MATRIX[sid]
    warnings = clients.client_warnings(method, settings)
    verified = clients.verified_clients(method, settings)
    for engine, (status, _) in clients.VERIFIED[sid].items():
        name = clients.ENGINES[engine]
        assert any(w.startswith(f"note: {name} ") for w in warnings) == (status != "loads"), (sid, engine, warnings)
        assert (clients.ENGINE_DETAIL[engine] in verified) == (status == "loads"), (sid, engine, verified)
    assert all("\n" not in w for w in warnings)


def test_asymmetric_gptq_warns_for_vllm_with_the_alternative():
    if clients.VERIFIED["gptq-w4g128-asym"]["vllm"][0] == "loads":
        pytest.skip("the matrix says vLLM loads asymmetric GPTQ")
    lines = clients.client_warnings("gptq", dict(bits=4, group_size=128, sym=False))
    assert "note: vLLM 0.32 rejects asymmetric GPTQ (gptq_v2); use --sym for a checkpoint vLLM loads" in lines, lines


def test_combined_departures_give_one_line_per_engine():
    lines = clients.client_warnings("gptq", dict(bits=3, group_size=128, sym=False, desc_act=True))
    vllm = [ln for ln in lines if ln.startswith("note: vLLM")]
    assert len(vllm) == 1 and "3-bit" in vllm[0] and "asymmetric" in vllm[0] and "--desc-act" in vllm[0], lines


def test_uncovered_settings_claim_nothing():
    assert clients.matching("awq", dict(moe=True)) == []
    assert clients.verified_clients("awq", dict(moe=True)) == []
    assert clients.client_warnings("nonsense", {}) == []


def test_quantize_prints_the_warning_and_the_card_lists_verified_clients(tmp_path):
    """The wiring: quantize's notes (run and --dry-run) and the card."""
    import torch

    from mergequant.demo import build_tiny_llama
    from mergequant.quant.quantize import QuantizeOptions, describe_quantize_plan, plan_quantize, run_quantize

    src = build_tiny_llama(tmp_path / "tiny", dtype=torch.float32, hidden=64, intermediate=128, layers=1)
    expected = clients.client_warnings("rtn", dict(bits=4, group_size=32, sym=False))
    assert expected
    plan = plan_quantize(src, QuantizeOptions(out=tmp_path / "plan", method="rtn", group_size=32, sym=False))
    assert all(w in plan.notes for w in expected), plan.notes
    assert expected[0] in describe_quantize_plan(plan)
    logged = []
    run_quantize(src, QuantizeOptions(out=tmp_path / "sym", method="rtn", group_size=32, quiet=True, fsync=False),
                 log=logged.append)
    assert not [m for m in logged if m.startswith("note: vLLM")], logged
    card = (tmp_path / "sym" / "README.md").read_text()
    verified = clients.verified_clients("rtn", dict(bits=4, group_size=32))
    assert verified and "## Verified clients" in card
    assert all(f"- {c}" in card for c in verified), card
