"""`ttscale demo --simulate` end to end on a tiny grid: table rows for every (strategy, budget),
accuracy in [0, 1], compute growing with the budget, PNG and JSON written."""
import json

from ttscale import demo


def test_demo_simulate_small_grid(tmp_path, capsys):
    png, js = tmp_path / "d.png", tmp_path / "d.json"
    rc = demo.main(["--simulate", "--problems", "4", "--budgets", "1,2,4", "--strategies", "majority,beam,rebase",
                    "--plot", str(png), "--json", str(js), "--no-progress"])
    assert rc == 0
    assert png.stat().st_size > 1000
    rows = json.loads(js.read_text())["rows"]
    assert [(r["strategy"], r["n"]) for r in rows] == [(s, n) for s in ("majority", "beam", "rebase")
                                                       for n in (1, 2, 4)]
    for s in ("majority", "beam", "rebase"):
        rs = [r for r in rows if r["strategy"] == s]
        assert all(0 <= r["accuracy"] <= 1 for r in rs)
        assert rs[0]["gen_tokens"] < rs[1]["gen_tokens"] < rs[2]["gen_tokens"]
    out = capsys.readouterr().out
    assert "accuracy" in out and "rebase" in out
