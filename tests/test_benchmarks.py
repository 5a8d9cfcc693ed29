"""Benchmark plumbing: the one timing helper interleaves and counts calls, the settings guard restores
process-wide state, and every CPU bench section (quick sizes) leaves threads and flush-denormal as it found them."""
import pytest
import torch

from moduleformer_exit.benchmarks.sections import SECTIONS, section_names
from moduleformer_exit.benchmarks.timing import flush_denormal_enabled, process_settings, time_calls


def test_time_calls_interleaves_after_warmup():
    calls = []
    times = time_calls({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1,
                       cuda=False)
    assert calls == ["a", "b"] * 4
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_flush_denormal_probe_matches_arithmetic():
    with process_settings(flush_denormal=True):
        assert flush_denormal_enabled()
        assert float(torch.tensor([1e-40]) * 1.0) == 0.0
    with process_settings(flush_denormal=False):
        assert not flush_denormal_enabled()
        assert float(torch.tensor([1e-40]) * 1.0) > 0.0


def test_process_settings_restores_even_on_error():
    threads, flush = torch.get_num_threads(), flush_denormal_enabled()
    with pytest.raises(RuntimeError):
        with process_settings(threads=threads + 1, flush_denormal=not flush, malloc_threshold=1 << 30):
            assert torch.get_num_threads() == threads + 1 and flush_denormal_enabled() != flush
            raise RuntimeError("boom")
    assert torch.get_num_threads() == threads and flush_denormal_enabled() == flush


@pytest.mark.parametrize("name", ["moe", "attention", "acd"])
def test_bench_sections_leave_process_settings_unchanged(name):
    torch.set_num_threads(1)
    torch.set_flush_denormal(False)
    try:
        rows = SECTIONS[name].run(True, 2)  # quick sizes, asks for 2 threads
        assert rows and all(isinstance(r, dict) for r in rows)
        keys = {k for r in rows for k in r}
        assert {k for k, _ in SECTIONS[name].table_columns()} & keys
        assert torch.get_num_threads() == 1 and not flush_denormal_enabled()
    finally:
        torch.set_flush_denormal(False)


def test_cli_looks_sections_up_in_the_table(capsys):
    from moduleformer_exit import cli

    assert set(section_names("cpu")) == {"moe", "attention", "decode", "decode_limit", "acd", "training"}
    assert set(section_names("cuda")) == {n for n, s in SECTIONS.items() if not s.on_request}
    assert {"peers", "pruning"} <= {n for n, s in SECTIONS.items() if s.on_request}
    threads = torch.get_num_threads()
    assert cli.main(["bench", "--only", "moe", "--quick", "--threads", str(threads + 1)]) == 0
    assert "MoE MLP layer" in capsys.readouterr().out
    assert torch.get_num_threads() == threads
    with pytest.raises(SystemExit, match="unknown bench section"):
        cli.main(["bench", "--only", "nope"])
