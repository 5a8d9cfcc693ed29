"""``search validate-proxy`` end to end through the project's trainer (3 tiny models, 2 steps): results, table and
the per-model result cache."""
import json
import math
import os

from moduleformer_exit.accounting import parameter_counts
from moduleformer_exit.configuration import ModuleFormerConfig
from moduleformer_exit.search.objectives import PROXIES


def test_validate_proxy_trains_ranks_and_caches(tmp_path, capsys):
    from moduleformer_exit.search.validate import main

    args = ["--out", str(tmp_path), "--configs", "3", "--steps", "2", "--batch-size", "2", "--block-size", "16",
            "--vocab-size", "300", "--heldout-blocks", "4"]
    assert main(args) == 0
    report = json.loads((tmp_path / "proxy_validation.json").read_text())
    assert len(report["models"]) == 3 and {row["proxy"] for row in report["spearman"]} == set(PROXIES)
    assert report["best_proxy"] == report["spearman"][0]["proxy"]
    for model in report["models"]:
        assert math.isfinite(model["ppl"]) and model["ppl"] > 1
        config = ModuleFormerConfig.from_pretrained(str(tmp_path / "runs" / model["id"] / "final"))
        assert model["active"] == parameter_counts(config)["active"]  # proxies of the model actually trained
        assert model["tokens"] == 2 * 2 * 16
    stamps = {m["id"]: os.path.getmtime(tmp_path / "runs" / m["id"] / "result.json") for m in report["models"]}
    assert main(args) == 0  # rerun: every model comes from its result.json, nothing is retrained
    assert stamps == {i: os.path.getmtime(tmp_path / "runs" / i / "result.json") for i in stamps}
    assert "best proxy:" in capsys.readouterr().out
