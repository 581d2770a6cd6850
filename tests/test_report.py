"""The claims report on a synthetic results file with known power laws: ratios, exponents, verdicts,
byte-identical regeneration, the non-ok table, and the exploration notebook executing end to end."""

from __future__ import annotations

from pathlib import Path

import jupyter_client.kernelspec
import nbclient
import nbformat
import pytest

from qna_bench import report, results

WINDOWS = (3, 5, 7, 9, 11)
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explore_results.ipynb"
FAMILIES = {"qna": "qna", "qna_reference": "qna", "sasa": "sasa", "swin": "swin", "na": "neighborhood",
            "conv_dw": "conv", "global_attn": "global"}


def synthetic_row(layer: str, window: int, mode: str = "forward", latency_s: float | None = None,
                  peak_bytes: int | None = None, status: str = "ok", reason: str | None = None, **extra) -> dict:
    """One complete result row for a tiny problem (B=1, 16×16, C=8, 2 heads) on a fake CPU."""
    ok = status == "ok"
    values = dict(
        run_id="synthetic", timestamp="2026-01-01T00:00:00+00:00", layer=layer, family=FAMILIES[layer],
        implementation=f"{layer} (synthetic)", layout="nhwc", uses_window=layer != "global_attn", layer_flags={},
        batch=1, height=16, width=16, channels=8, heads=2, window=window, stride=1, dilation=1, dtype="float32",
        device="cpu", mode=mode, seed=0, status=status, reason=reason,
        median_s=latency_s if ok else None, q25_s=latency_s * 0.95 if ok else None,
        q75_s=latency_s * 1.05 if ok else None, min_s=latency_s * 0.9 if ok else None,
        mean_s=latency_s if ok else None, n=5 if ok else None, number_per_run=1,
        times_s=[latency_s] * 5 if ok else None, threads=2, first_call_s=latency_s, peak_bytes=peak_bytes if ok else None,
        base_bytes=4096, memory_method="cpu_live_storages", memory_note="", flops=1000, flops_method="flop_counter",
        flops_analytic=None, params=100, torch_version="2.9.0", timm_version="1.0.0", natten_version="0.21.0",
        python_version="3.11.2", device_name="cpu: synthetic", cpu_model="synthetic", hostname="h", git_commit="abc123",
        point_seconds=1.0,
    )
    values.update(extra)
    return results.make_row(**values)


def power_law_rows(layer: str, mode: str, latency: tuple[float, float], memory: tuple[int, float],
                   windows=WINDOWS) -> list[dict]:
    """latency_s = a·k^e and peak_bytes = b·k^f at each window (b·k^f exact integers)."""
    (a, e), (b, f) = latency, memory
    return [synthetic_row(layer, k, mode, a * k**e, int(round(b * k**f))) for k in windows]


def claims_rows() -> list[dict]:
    """Forward: QnA ∝ k (time and memory); SASA time ∝ k^1.5, memory ∝ k² → memory ratio k (11× at k=11,
    holds), speed ratio √k (3.32× at k=11, partly). Swin grows like QnA (ratio 2 in time, 0.5 in memory).
    QnA's naive form needs k² × QnA's memory (121× at k=11) but stays outside the verdict.
    Train: QnA ∝ k²; SASA 2× slower and 3× bigger at the same exponent (partly, scaling does not hold);
    SASA runs out of memory at k=11; NA is unsupported in train."""
    rows = []
    rows += power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += power_law_rows("sasa", "forward", (1e-3, 1.5), (1000, 2.0))
    rows += power_law_rows("swin", "forward", (2e-3, 1.0), (500, 1.0))
    rows += power_law_rows("conv_dw", "forward", (1e-4, 2.0), (100, 2.0))
    rows += power_law_rows("qna_reference", "forward", (1e-3, 2.0), (1000, 3.0))
    rows += power_law_rows("qna", "train", (1e-3, 2.0), (1000, 2.0))
    rows += power_law_rows("sasa", "train", (2e-3, 2.0), (3000, 2.0), windows=WINDOWS[:-1])
    rows.append(synthetic_row("sasa", 11, "train", status="oom", reason="out of memory: cap 2.0 GiB | tried 9 GiB"))
    rows += power_law_rows("swin", "train", (1e-3, 1.0), (1000, 1.0))
    rows += power_law_rows("conv_dw", "train", (1e-4, 2.0), (100, 2.0))
    rows += [synthetic_row("na", k, "train", status="unsupported", reason="na has no train mode on cpu") for k in WINDOWS]
    return rows


@pytest.fixture(scope="module")
def claims_parquet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("claims") / "results.parquet"
    results.append_rows(path, claims_rows())
    return path


@pytest.fixture(scope="module")
def analysis(claims_parquet) -> report.Analysis:
    return report.analyse(results.read_results(claims_parquet))


def _verdict(analysis: report.Analysis, claim: str, mode: str) -> str:
    table = analysis.verdicts
    return table[(table["claim"] == claim) & (table["mode"] == mode)]["verdict"].item()


def _growth(analysis: report.Analysis, layer: str, mode: str):
    table = analysis.growth
    return table[(table["layer"] == layer) & (table["mode"] == mode)].iloc[0]


def test_growth_exponents_recover_the_power_laws(analysis):
    for layer, mode, latency, memory in (
        ("qna", "forward", 1.0, 1.0), ("sasa", "forward", 1.5, 2.0), ("conv_dw", "train", 2.0, 2.0),
        ("qna_reference", "forward", 2.0, 3.0), ("sasa", "train", 2.0, 2.0),
    ):
        row = _growth(analysis, layer, mode)
        assert row["latency_exponent"] == pytest.approx(latency, abs=1e-9)
        assert row["memory_exponent"] == pytest.approx(memory, abs=1e-9)
        assert row["latency_r2"] == pytest.approx(1.0, abs=1e-9)
    assert _growth(analysis, "sasa", "train")["memory_n"] == 4  # the oom window is left out
    na = _growth(analysis, "na", "train")
    assert na["latency_n"] == 0 and na["ok_windows"] == 0


def test_fit_growth_reports_quality_and_refuses_one_point():
    slope, r2, n = report.fit_growth([2, 4, 8], [1.0, 4.0, 16.0])
    assert (slope, r2, n) == (pytest.approx(2.0), pytest.approx(1.0), 3)
    assert report.fit_growth([3, 5], [1.0, None]) is None
    assert report.fit_growth([3, 3], [1.0, 2.0]) is None
    _, noisy_r2, _ = report.fit_growth([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    assert 0 < noisy_r2 < 1


def test_verdicts_follow_the_rule(analysis):
    assert _verdict(analysis, "memory", "forward") == report.HOLDS  # 11× vs SASA
    assert _verdict(analysis, "speed", "forward") == report.PARTLY  # √11 = 3.32×
    assert _verdict(analysis, "scaling", "forward") == report.PARTLY  # beats SASA, not Swin
    assert _verdict(analysis, "memory", "train") == report.PARTLY  # 3×
    assert _verdict(analysis, "speed", "train") == report.PARTLY  # 2×
    assert _verdict(analysis, "scaling", "train") == report.NOT_HOLD  # same exponent as SASA, Swin grows slower
    assert _verdict(analysis, "memory", "overall") == report.PARTLY
    assert _verdict(analysis, "scaling", "overall") == report.PARTLY


def _only(rows: list[dict], drop: set[str]) -> report.Analysis:
    return report.analyse(results.read_results(_write(rows, drop)))


def _write(rows, drop) -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="qna-report-"))
    path = folder / "results.parquet"
    results.append_rows(path, [r for r in rows if r["layer"] not in drop])
    return path


def test_verdicts_on_crafted_data_hold_and_fail():
    # Without Swin, QnA grows more slowly than every attention peer in forward mode: scaling holds.
    assert _verdict(_only(claims_rows(), {"swin"}), "scaling", "forward") == report.HOLDS
    # QnA slower and bigger than every attention peer: nothing holds, however lean it is against convs.
    rows = power_law_rows("qna", "forward", (1e-2, 2.0), (10**6, 2.0))
    rows += power_law_rows("sasa", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += power_law_rows("conv_dw", "forward", (1e-1, 3.0), (10**8, 3.0))
    lost = _only(rows, set())
    for claim in ("memory", "speed", "scaling", ):
        assert _verdict(lost, claim, "forward") == report.NOT_HOLD
        assert _verdict(lost, claim, "overall") == report.NOT_HOLD
    # Only convolutions next to QnA: the claims are about attention, so nothing is tested.
    alone = _only(power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
                  + power_law_rows("conv_dw", "forward", (1e-3, 1.0), (1000, 1.0)), set())
    assert _verdict(alone, "memory", "forward") == report.NOT_TESTED


def test_global_attention_counts_for_ratios_but_not_for_scaling():
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += power_law_rows("global_attn", "forward", (1e-3, 0.0), (10**5, 0.0))
    analysis = _only(rows, set())
    assert _verdict(analysis, "memory", "forward") == report.HOLDS  # 10^5 / 3000 = 33×
    assert _verdict(analysis, "scaling", "forward") == report.NOT_TESTED
    text = report.render(analysis)
    assert "not compared (ignore the window): global_attn" in text


def test_report_states_the_largest_ratios_and_exponents(claims_parquet, tmp_path):
    path = report.write_report(claims_parquet, tmp_path)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    # Memory: SASA/QnA = k → 11.00× at k=11; speed: √11 = 3.32×; the naive form (121×) is not the headline.
    assert "Largest against an attention peer: **11.00× at k=11, 16×16 (P1), forward, vs sasa**" in text
    assert "Largest against an attention peer: **3.32× at k=11, 16×16 (P1), forward, vs sasa**" in text
    assert "| qna_reference | QnA naive form | forward | 121.00× | 11 | 16×16 | P1 |" in text
    assert "| P1 | forward | sasa | attention peer | yes | 5/5 | 1.50 | 1.000 | 5 | 2.00 | 1.000 | 5 |" in text
    assert "| P1 | train | na | attention peer | yes | 0/5 | n/a | n/a | 0 | n/a | n/a | 0 |" in text
    assert "QnA is ≥10× leaner than: sasa (k = 11 at 16×16 (P1); up to 11.00× at k=11, 16×16 (P1))" in text
    assert "Convolutions (outside the verdict)" in text
    assert "na unsupported at 16×16 (P1), k=3, 5, 7, 9, 11; sasa oom at 16×16 (P1), k=11" in text
    # Header: environment, and no date of generation.
    for fact in ("cpu: synthetic", "2.9.0", "0.21.0", "abc123", "| threads | 2 |", "50 rows"):
        assert fact in text
    assert "2026-01-01" not in text
    # The verdict table: claims × modes.
    assert "| claim | forward | train | overall |" in text
    assert "**holds**: best 11.00× at k=11, 16×16 (P1) vs sasa" in text
    for name in ("latency.png", "memory.png", "ratio_to_qna.png", "pareto.png"):
        assert f"]({name})" in text
        assert (tmp_path / name).stat().st_size > 0


def test_the_strongest_peer_at_each_point_bounds_what_qna_gains(analysis):
    # Forward speed: SASA is √k slower, Swin 2× slower; the faster of them is SASA at k=3 (√3), Swin after.
    text = report.render(analysis)
    assert "against the strongest peer at each point, 1.73× to 2.00×" in text
    assert ("Against the strongest attention peer at each point (the fastest one measured there: sasa at 1 point, "
            "swin at 4 points), QnA is 1.73× at worst (k=3, 16×16 (P1), vs sasa) and 2.00× at k=5, 16×16 (P1) at best "
            "(vs swin); never ≥5× faster than every peer measured at a point") in text
    # Forward memory: Swin needs half of QnA's memory at every k, so against the strongest peer QnA loses.
    assert "against the strongest peer at each point, 0.50× to 0.50×" in text


def test_non_ok_rows_are_listed_with_their_reasons(analysis):
    text = report.render(analysis)
    assert "## Points without a measurement" in text
    assert "| P1 | train | sasa | 11 | oom | out of memory: cap 2.0 GiB \\| tried 9 GiB |" in text
    assert "| P1 | train | na | 3 | unsupported | na has no train mode on cpu |" in text
    assert "| na | unsupported | 5 |" in text
    # The ratio grid shows why a cell is empty.
    assert "| sasa | attention peer | 3.00 | 3.00 | 3.00 | 3.00 | oom |" in text


def test_regenerating_gives_identical_bytes(claims_parquet, tmp_path):
    first = report.write_report(claims_parquet, tmp_path / "a", draw=False).read_bytes()
    second = report.write_report(claims_parquet, tmp_path / "b", draw=False).read_bytes()
    assert first == second
    # Row order in the file does not matter either.
    shuffled = tmp_path / "shuffled.parquet"
    results.append_rows(shuffled, list(reversed(claims_rows())))
    assert report.write_report(shuffled, tmp_path / "c", draw=False).read_bytes() == first


def test_a_later_measurement_of_the_same_point_wins(tmp_path):
    rows = claims_rows()
    rows.append(synthetic_row("sasa", 11, "forward", 1e-3 * 11**1.5, 1000 * 11**2 * 2, threads=1,
                              timestamp="2026-02-01T00:00:00+00:00"))
    analysis = _only(rows, set())
    text = report.render(analysis)
    assert "51 rows (1 superseded by a later measurement of the same point; 50 used)" in text
    assert "Largest against an attention peer: **22.00× at k=11" in text


def test_cli_writes_the_report(claims_parquet, tmp_path, capsys):
    report.main([str(claims_parquet), "--out", str(tmp_path), "--no-figures"])
    assert (tmp_path / "report.md").is_file() and not list(tmp_path.glob("*.png"))
    assert str(tmp_path / "report.md") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.parquet")])


def test_notebook_executes_against_a_results_file(claims_parquet, tmp_path, monkeypatch):
    specs = jupyter_client.kernelspec.KernelSpecManager().find_kernel_specs()
    assert "python3" in specs, f"no python3 kernel spec (found {sorted(specs)}); install ipykernel in the venv"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it cleared"
    monkeypatch.setenv("QNA_BENCH_RESULTS", str(claims_parquet))
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    texts = "".join(str(o.get("data", {}).get("text/markdown", "")) + str(o.get("text", "")) for o in outputs)
    assert "11.00× at k=11" in texts
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 4


def test_noisy_timings_and_missing_memory_are_called_out():
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += power_law_rows("global_attn", "forward", (1e-3, 0.0), (10**5, 0.0))
    quiet = report.render(_only(rows, set()))
    assert "No warning: every timed point" in quiet and "**Caution:**" not in quiet
    assert "| global_attn | global | attention peer | global_attn (synthetic) | no |" in quiet
    busy = {"load_avg": 7.5} if "load_avg" in results.COLUMNS else {}
    rows.append(synthetic_row("sasa", 3, "forward", 2e-3, None, n=1, q25_s=1e-3, q75_s=3e-3, memory_method="unavailable",
                              memory_note="the CPU storage tracker cannot see inside flex attention", **busy))
    noisy = report.render(_only(rows, set()))
    assert "1 of 11 timed points have fewer than 3 timing replicates" in noisy
    assert "1 of 11 timed points have a timing spread (q75 − q25) / median above 25%" in noisy
    if busy:
        assert "1 of 11 timed points started with the 1-minute load average above their thread count + 1" in noisy
    assert "**Caution:** the timings on this device are noisy" in noisy
    # One noisy point among many is listed, but does not put the verdicts under a caution.
    many = rows + power_law_rows("swin", "forward", (2e-3, 1.0), (500, 1.0), windows=tuple(range(3, 63, 2)))
    listed = report.render(_only(many, set()))
    assert "1 of 41 timed points have a timing spread (q75 − q25) / median above 25%" in listed
    assert "**Caution:**" not in listed
    assert "| P1 | forward | sasa | 3 | unavailable | the CPU storage tracker cannot see inside flex attention |" in noisy
    # The speed table also gives the ratio the spread supports: SASA's q25 over QnA's q75.
    assert "| sasa | attention peer | forward | 0.67× | 3 | 16×16 | P1 | 0.32× |" in noisy


COMMITTED_REPORTS = sorted((Path(__file__).resolve().parent.parent / "results").rglob("report.md"))


@pytest.mark.parametrize("committed", COMMITTED_REPORTS, ids=lambda p: str(p.parent.relative_to(p.parents[2])))
def test_committed_reports_regenerate_from_their_parquet(committed, tmp_path):
    """The reference reports under results/ are what `python -m qna_bench.report` writes from the parquet
    beside them, table for table (the figures section only lists the PNGs drawn next to it)."""
    regenerated = report.write_report(committed.parent / results.RESULTS_FILE, tmp_path, draw=False).read_text()
    text = committed.read_text(encoding="utf-8")
    body, _, figures = text.partition("\n\n## Figures")
    assert body + "\n" == regenerated
    for name in ("latency.png", "memory.png", "pareto.png"):
        assert f"]({name})" in figures and (committed.parent / name).is_file()
