"""``moduleformer-exit search`` end to end on a tiny space (real CPU measurements) and the proxy-validation pieces."""
import csv
import json

import numpy as np
import pytest

from moduleformer_exit import ModuleFormerConfig
from moduleformer_exit.accounting import parameter_counts
from moduleformer_exit.cli import main
from moduleformer_exit.search.measure import MeasureSettings, measure_config

TINY_SPACE = {
    "fixed": {"vocab_size": 64, "gating_size": 8, "kernel_backend": "torch", "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0},
    "dimensions": {"n_layer": [1, 2, 3], "n_embd": [16, 32], "n_head": [1, 2], "att_hidden": [8, 16],
                   "ffd_hidden": [16, 32], "n_att_experts": [1, 2, 4], "k_att": [1, 2], "n_mlp_experts": [2, 4],
                   "k_mlp": [1, 2]},
    "exits": {"min_layer": 1},
    "pruning": {"keep_fractions": [0.5, 1.0]},
}
FAST = ["--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
        "--no-progress", "--init", "4"]


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(TINY_SPACE))
    return str(path)


def test_search_writes_front_configs_csv_and_plot(tmp_path, space_file, capsys):
    out = tmp_path / "run"
    assert main(["search", "--out", str(out), "--candidates", "6", "--space", space_file, "--device", "cpu",
                 *FAST]) == 0
    pareto = json.loads((out / "pareto.json").read_text())
    with open(out / "evaluated.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == pareto["evaluated"] == 6
    assert pareto["front"] and sum(r["on_front"] == "True" for r in rows) == len(pareto["front"])
    # the front is non-dominated over the CSV's own numbers (proxy up, latency and memory down)
    proxy = pareto["proxy"]
    assert pareto["objectives"] == [proxy, "decode_ms", "peak_memory_mb"]
    pts = np.array([[float(r[proxy]), -float(r["decode_ms"]), -float(r["peak_memory_mb"])] for r in rows])
    for r, p in zip(rows, pts):
        dominated = any((q >= p).all() and (q > p).any() for q in pts)
        assert (r["on_front"] == "True") == (not dominated)
    from moduleformer_exit.training.recipe import load_recipe

    for member in pareto["front"]:
        config = ModuleFormerConfig.from_json_file(str(out / member["config"]))
        assert config.n_layer == member["row"]["n_layer"]
        assert parameter_counts(config)[proxy] == member["objectives"][proxy]
        recipe = load_recipe("tiny", ["model=" + (out / member["config"]).read_text()])
        assert recipe["model"]["n_embd"] == config.n_embd
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run with a larger budget resumes: the first 6 come from the cache
    assert main(["search", "--out", str(out), "--candidates", "8", "--space", space_file, *FAST]) == 0
    assert json.loads((out / "pareto.json").read_text())["cache_hits"] == 6
    assert "(6 from the cache)" in capsys.readouterr().out


def test_search_with_exits_and_pruning(tmp_path, space_file):
    out = tmp_path / "run"
    assert main(["search", "--out", str(out), "--candidates", "4", "--space", space_file, "--exits", "--pruning",
                 *FAST]) == 0
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["objectives"][3:] == [f"exit_{pareto['proxy']}", "exit_decode_ms"]
    for member in pareto["front"]:
        row = member["row"]
        assert len(row["exit_decode_ms_by_layer"]) == row["n_layer"]
        assert row["exit_decode_ms"] == row["exit_decode_ms_by_layer"][row["exit_layer"] - 1]
        config = ModuleFormerConfig.from_json_file(str(out / member["config"]))  # the pruned config
        assert (config.n_att_experts, config.n_mlp_experts) == (row["kept_att_experts"], row["kept_mlp_experts"])


def test_invalid_space_is_a_clear_cli_error(tmp_path, capsys):
    bad = dict(TINY_SPACE, dimensions={**TINY_SPACE["dimensions"], "k_att": [8]})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    assert main(["search", "--out", str(tmp_path / "x"), "--space", str(path), *FAST]) == 2
    assert "k_att choice(s) [8] exceed every n_att_experts choice" in capsys.readouterr().err
    assert main(["search", "--out", str(tmp_path / "x"), "--candidates", "0", *FAST]) == 2
    assert "--candidates (0)" in capsys.readouterr().err


def test_measure_reports_weights_and_positive_latencies():
    config = ModuleFormerConfig(**TINY_SPACE["fixed"], n_layer=2, n_embd=32, n_head=2, att_hidden=16, ffd_hidden=32,
                                n_att_experts=4, k_att=2, n_mlp_experts=4, k_mlp=2)
    out = measure_config(config, MeasureSettings(prompt_len=4, new_tokens=3, repeats=2, warmup=1), exits=True)
    assert out["param_bytes"] == 4 * parameter_counts(config)["total"]
    assert out["decode_ms"] > 0 and out["prefill_ms"] > 0 and out["peak_memory_mb"] >= 0
    assert len(out["exit_decode_ms"]) == 2 and 0 < out["exit_decode_ms"][0] < out["exit_decode_ms"][1]
    with pytest.raises(ValueError, match="repeats"):
        MeasureSettings(repeats=0)


def test_spearman_table_and_validation_picks():
    from moduleformer_exit.search.validate import pick_architectures, spearman_table

    base = {"total": 0, "non_embedding": 0, "active": 0, "active_non_embedding": 0, "forward_flops": 0}
    ppl = [50.0, 40.0, 30.0, 20.0]
    results = [dict(base, total=t, non_embedding=-t, active=t, active_non_embedding=t, forward_flops=f, ppl=p)
               for t, f, p in zip([1, 2, 3, 4], [1, 3, 2, 4], ppl)]
    table = {row["proxy"]: row["spearman_rho"] for row in spearman_table(results)}
    assert table["total"] == pytest.approx(1.0) and table["non_embedding"] == pytest.approx(-1.0)
    # flops ranks [1, 3, 2, 4] vs quality ranks [1, 2, 3, 4]: 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    assert table["forward_flops"] == pytest.approx(0.8)
    archs = pick_architectures(10, seed=0)
    assert len({a.arch_id for a in archs}) == 10
    assert pick_architectures(10, seed=0) == archs
