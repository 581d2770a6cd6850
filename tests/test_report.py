"""The claims report on a synthetic results file with known power laws: ratios, exponents, verdicts,
byte-identical regeneration, the non-ok table, and the exploration notebook executing end to end."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import committed_results

from qna_bench import analysis as A
from qna_bench import registry, report, results
from qna_bench.registry import register_layer

WINDOWS = (3, 5, 7, 9, 11)
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explore_results.ipynb"
FAMILIES = {"qna": "qna", "qna_reference": "qna", "sasa": "sasa", "swin": "swin", "swin_fused": "swin",
            "na": "neighborhood", "conv_dw": "conv", "conv_dense": "conv", "global_attn": "global",
            "qna_vit_tiny": "model", "swin_tiny": "model", "convnext_tiny": "model", "nat_tiny": "model"}
ROLES = {"qna": "subject", "qna_reference": "reference", "conv_dw": "baseline", "conv_dense": "baseline",
         "qna_vit_tiny": "subject", "convnext_tiny": "baseline"}


def synthetic_row(layer: str, window: int, mode: str = "forward", latency_s: float | None = None,
                  peak_bytes: int | None = None, status: str = "ok", reason: str | None = None, **extra) -> dict:
    """One complete result row for a tiny problem (B=1, 16×16, C=8, 2 heads) on a fake CPU."""
    ok = status == "ok"
    values = dict(
        run_id="synthetic", timestamp="2026-01-01T00:00:00+00:00", layer=layer, family=FAMILIES[layer],
        role=ROLES.get(layer, "peer"),
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
def analysis(claims_parquet) -> A.Analysis:
    return A.analyse(results.read_results(claims_parquet))


def _verdict(analysis: A.Analysis, claim: str, mode: str) -> str:
    table = analysis.verdicts
    return table[(table["claim"] == claim) & (table["mode"] == mode)]["verdict"].item()


def _growth(analysis: A.Analysis, layer: str, mode: str):
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
    slope, r2, n, rms = A.fit_growth([2, 4, 8], [1.0, 4.0, 16.0])
    assert (slope, r2, n, rms) == (pytest.approx(2.0), pytest.approx(1.0), 3, pytest.approx(0.0, abs=1e-12))
    assert A.fit_growth([3, 5], [1.0, None]) is None
    assert A.fit_growth([3, 3], [1.0, 2.0]) is None
    _, noisy_r2, _, _ = A.fit_growth([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    assert 0 < noisy_r2 < 1


def test_verdicts_follow_the_rule(analysis):
    # Forward: SASA is √k slower but Swin only 2×, and Swin needs half of QnA's memory: against the
    # strongest peer QnA is 1.73–2× faster (partly) and never leaner (does not hold); QnA grows more slowly
    # than SASA, not than Swin (partly).
    assert _verdict(analysis, "memory", "forward") == A.NOT_HOLD
    assert _verdict(analysis, "speed", "forward") == A.PARTLY
    assert _verdict(analysis, "scaling", "forward") == A.PARTLY
    # Train: Swin grows like k, QnA like k², so Swin is the strongest peer everywhere and wins.
    assert _verdict(analysis, "memory", "train") == A.NOT_HOLD
    assert _verdict(analysis, "speed", "train") == A.NOT_HOLD
    assert _verdict(analysis, "scaling", "train") == A.NOT_HOLD


def _only(rows: list[dict], drop: set[str]) -> A.Analysis:
    return A.analyse(results.read_results(_write(rows, drop)))


def _write(rows, drop) -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="qna-report-"))
    path = folder / "results.parquet"
    results.append_rows(path, [r for r in rows if r["layer"] not in drop])
    return path


def _frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a results frame in the given order (as a merged file can hold them)."""
    return results.rows_to_table(rows).to_pandas(types_mapper=results._PANDAS_TYPES.get)


def test_a_weak_peer_beaten_6x_does_not_make_the_speed_claim_hold_when_the_strongest_is_beaten_1_3x():
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += power_law_rows("sasa", "forward", (6e-3, 1.0), (1000, 1.0))  # 6× slower than QnA everywhere
    rows += power_law_rows("swin", "forward", (1.3e-3, 1.0), (1000, 1.0))  # 1.3× slower
    analysis = A.analyse(_frame(rows))
    assert _verdict(analysis, "speed", "forward") == A.PARTLY
    text = report.render(analysis)
    verdicts = text.split("## Verdicts")[1].split("Conditions:")[0]
    assert "| Speed: up to 5× faster | 16×16, C=8, 2 heads (P1) | **holds partly**: vs the strongest peer 1.30×" in verdicts
    assert "**holds**" not in verdicts.split("| Speed")[1].split("\n")[0]
    assert "Against the weakest peer (not the verdict): up to 6.00× at k=3 vs sasa." in text


def test_rows_at_one_and_two_threads_are_never_paired():
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    rows = [{**r, "threads": 1} for r in rows]
    rows += power_law_rows("swin", "forward", (1e-2, 1.0), (1000, 1.0))  # threads=2
    frame = A.with_roles(_frame(rows))
    assert not len(A.pair_with_subject(frame))
    analysis = A.analyse(frame)
    assert not len(analysis.ratios)
    assert set(analysis.problems["threads"]) == {1, 2}
    assert set(analysis.verdicts["verdict"]) == {A.NOT_TESTED}


def test_a_peer_measured_at_two_windows_gives_no_scaling_vote():
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += power_law_rows("sasa", "forward", (1e-3, 3.0), (1000, 3.0), windows=(3, 5))
    rows += [synthetic_row("sasa", k, status="timeout", reason="budget") for k in (7, 9, 11)]
    analysis = A.analyse(_frame(rows))
    comparisons = analysis.comparisons
    assert list(comparisons["n"]) == [2, 2] and comparisons["vote"].isna().all()
    assert _verdict(analysis, "scaling", "forward") == A.NOT_TESTED
    assert "no vote: 2 shared windows" in report.render(analysis)


def test_a_poor_fit_is_shown_and_does_not_vote():
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    zigzag = [1e-3 * k * (4 if i % 2 else 1) for i, k in enumerate(WINDOWS)]
    rows += [synthetic_row("sasa", k, "forward", t, 1000 * k**2) for k, t in zip(WINDOWS, zigzag)]
    analysis = A.analyse(_frame(rows))
    latency = analysis.comparisons[analysis.comparisons["metric"] == "latency"].iloc[0]
    assert latency["vote"] is None and latency["why"] == "poor fit" and latency["peer_poor"]
    memory = analysis.comparisons[analysis.comparisons["metric"] == "memory"].iloc[0]
    assert memory["vote"] is True
    assert _verdict(analysis, "scaling", "forward") == A.HOLDS


def test_a_new_reference_layer_of_an_unknown_family_appears_in_no_verdict():
    name = "oracle_for_test"
    register_layer(name, role="reference", family="brand_new", implementation="test")(lambda problem: None)
    try:
        rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
        rows += power_law_rows("swin", "forward", (2e-3, 1.0), (2000, 1.0))
        base = A.analyse(_frame(rows))
        # Its rows come without a role (an older file): the registry supplies it.
        rows += [{**r, "layer": name, "family": "brand_new", "role": None}
                 for r in power_law_rows("swin", "forward", (1e-1, 1.0), (10**6, 1.0))]
        analysis = A.analyse(_frame(rows))
        assert analysis.frame.loc[analysis.frame["layer"] == name, "role"].unique().tolist() == ["reference"]
        assert analysis.verdicts.equals(base.verdicts)
        assert name not in set(analysis.comparisons["layer"])
        text = report.render(analysis).split("## Verdicts")[1].split("### How the verdicts")[0]
        assert name not in text
    finally:
        registry._REGISTRY.pop(name)


def test_a_remeasured_point_wins_by_timestamp_not_file_order():
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    newer = synthetic_row("qna", 3, "forward", 9.0, 10**9, timestamp="2027-01-01T00:00:00+00:00")
    older = synthetic_row("qna", 3, "forward", 5.0, 10**8, timestamp="2025-01-01T00:00:00+00:00")
    frame = _frame([newer, *rows, older])
    latest = A.latest_rows(frame)
    assert len(latest) == 5
    assert float(latest.loc[latest["window"] == 3, "median_s"].item()) == 9.0
    assert "7 rows (2 superseded by a newer measurement of the same point; 5 used)" in report.render(A.analyse(frame))


def test_round_times_give_the_ratio_its_geometric_mean_and_spread():
    assert A.round_ratios([2.0, 3.0, 4.0], [1.0, 1.0, 2.0]) == (pytest.approx(12 ** (1 / 3)), 2.0, 3.0, 3)
    assert A.round_ratios(None, [1.0]) is None
    assert A.round_ratios([1.0, 2.0], [1.0]) is None


def test_verdicts_are_given_per_head_size():
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += power_law_rows("swin", "forward", (6e-3, 1.0), (1000, 1.0))
    rows += [{**r, "channels": 16, "heads": 2} for r in power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))]
    rows += [{**r, "channels": 16, "heads": 2} for r in power_law_rows("swin", "forward", (2e-3, 1.0), (1000, 1.0))]
    analysis = A.analyse(_frame(rows))
    speed = analysis.verdicts[analysis.verdicts["claim"] == "speed"].set_index("problem")["verdict"]
    assert speed.to_dict() == {"P1": A.HOLDS, "P2": A.PARTLY}
    text = report.render(analysis)
    assert ("**Speed: up to 5× faster**, overall **holds partly** — head dim 4 (P1): holds; head dim 8 (P2): holds "
            "partly — **the verdict depends on the head size**.") in text


def test_each_familys_best_implementation_wins_the_most_windows_per_metric_and_references_are_never_chosen():
    rows = power_law_rows("qna", "forward", (1e-3, 1.0), (1000, 1.0))
    rows += power_law_rows("qna_reference", "forward", (1e-4, 1.0), (10, 1.0))  # the fastest, but a reference
    rows += power_law_rows("swin", "forward", (2e-3, 1.0), (500, 1.0))
    # swin_fused is faster than swin at 3 of 5 windows and always needs more memory.
    rows += [synthetic_row("swin_fused", k, "forward", (1e-3 if k <= 7 else 3e-3) * k, 2000 * k) for k in WINDOWS]
    rows += power_law_rows("conv_dense", "forward", (1e-4, 2.0), (50, 2.0))
    rows += power_law_rows("conv_dw", "forward", (1e-5, 2.0), (100, 2.0))
    rows += [synthetic_row("na", k, status="unsupported", reason="none") for k in WINDOWS]
    frame = A.with_roles(_frame(rows))
    latency = A.family_leaders(frame, "median_s").set_index("group")
    assert latency["layer"].to_dict() == {"baseline": "conv_dw", "neighborhood": "na", "swin": "swin_fused"}
    assert latency.loc["swin", "wins"] == 3 and latency.loc["neighborhood", "wins"] == 0
    memory = A.family_leaders(frame, "peak_bytes").set_index("group")["layer"].to_dict()
    assert memory == {"baseline": "conv_dense", "neighborhood": "na", "swin": "swin"}
    assert sorted(A.shown_by_default(frame, "median_s")["layer"]) == ["conv_dw", "na", "qna", "swin_fused"]


def model_rows() -> list[dict]:
    """A models run: QnA-ViT, Swin-T and ConvNeXt-T in both modes at batch 4, NAT forward only."""
    image = dict(batch=4, height=224, width=224, channels=3, heads=1, uses_window=False)
    rows = []
    for layer, forward_s, train_s, memory, params, flops in (
        ("qna_vit_tiny", 0.2, 0.8, 100 * 2**20, 16_000_000, 2 * 2.5e9 * 4),
        ("swin_tiny", 0.4, 1.2, 150 * 2**20, 28_300_000, 2 * 4.5e9 * 4),
        ("convnext_tiny", 0.5, 2.4, 200 * 2**20, 28_600_000, 2 * 4.4e9 * 4),
    ):
        rows.append(synthetic_row(layer, 7, "forward", forward_s, memory, params=params, flops=int(flops), **image))
        rows.append(synthetic_row(layer, 7, "train", train_s, 4 * memory, params=params, flops=int(3 * flops), **image))
    rows.append(synthetic_row("nat_tiny", 7, "forward", 2.0, None, params=28_000_000, flops=None,
                              flops_analytic=int(2 * 4.3e9 * 4), **image))
    rows.append(synthetic_row("nat_tiny", 7, "train", status="unsupported", reason="no CPU backward", **image))
    return rows


def test_a_models_run_gets_a_models_section_instead_of_the_layer_claims():
    analysis = A.analyse(_frame(model_rows()))
    assert set(analysis.frame["kind"]) == {"model"} and not len(analysis.verdicts)
    models = analysis.models.set_index(["layer", "mode"])
    assert models.loc[("swin_tiny", "forward"), "images_per_s"] == pytest.approx(10.0)  # batch 4 / 0.4 s
    assert models.loc[("qna_vit_tiny", "train"), "images_per_s"] == pytest.approx(5.0)
    assert models.loc[("nat_tiny", "forward"), "gmacs"] == pytest.approx(4.3)  # the closed form: no counted FLOPs
    assert models.loc[("swin_tiny", "forward"), "published_params_m"] == 28.3  # quoted by the registry entry
    text = report.render(analysis)
    assert "## Verdicts" not in text and "## Growth" not in text and "## Measurements" not in text
    assert "| qna_vit_tiny | subject | 20.00 | 5.00 | 100.0 | 400.0 | 16.00 | 16.0 (1.00×) | 2.50 | 2.5 (1.00×) |" in text
    assert "| nat_tiny | peer | 2.00 | unsupported | n/a (not measured) | unsupported | 28.00 |" in text
    assert "4.30 (closed form) | 4.3 (1.00×) |" in text
    against = text.split("#### Against qna_vit_tiny")[1]
    assert "| swin_tiny | peer | 2.00× | 1.50× | 1.50× | 1.50× | 1.77× | 1.80× |" in against
    assert "| nat_tiny | peer | 10.00× | unsupported | n/a | unsupported |" in against


def test_a_file_of_layers_and_models_gets_both_and_keeps_the_models_out_of_the_verdicts(analysis):
    mixed = A.analyse(_frame([*claims_rows(), *model_rows()]))
    assert mixed.verdicts.equals(analysis.verdicts)
    assert not set(mixed.ratios["layer"]) & {"swin_tiny", "nat_tiny", "convnext_tiny"}
    text = report.render(mixed)
    assert "## Verdicts" in text and "## Models" in text


def test_peers_without_a_number_are_named(analysis):
    text = report.render(analysis)
    assert "Peers without a number where QnA has one (in no ratio): na unsupported at k = 3–11; sasa oom at k = 11." in text
    assert "## Points without a measurement" in text
    assert "| P1 | train | sasa | 11 | oom | out of memory: cap 2.0 GiB \\| tried 9 GiB |" in text
    assert "| sasa | peer | 3.00 | 3.00 | 3.00 | 3.00 | oom |" in text


def test_the_report_states_its_rules_and_the_per_family_table(claims_parquet, tmp_path):
    path = report.write_report(claims_parquet, tmp_path)
    text = path.read_text()
    assert "### How the verdicts are decided" in text
    assert "the claim **holds** if QnA is at least T times better than the" in text
    assert "#### Speed: up to 5× faster: per peer family (each family's strongest member at each window)" in text
    assert "| sasa | P1 | forward | sasa ×5 | 1.73× to 3.32× | nowhere | nowhere | holds partly |" in text
    assert "| P1 | forward | qna_reference | reference | yes | 5/5 | 2.00 | 1.000 | 5 | 3.00 | 1.000 | 5 |" in text
    for fact in ("cpu: synthetic", "2.9.0", "0.21.0", "abc123", "| threads | 2 |", "50 rows"):
        assert fact in text
    assert "2026-01-01" not in text
    for name in ("latency.png", "memory.png", "ratio_to_qna.png", "pareto.png"):
        assert f"]({name})" in text
        assert (tmp_path / name).stat().st_size > 0


def test_regenerating_gives_identical_bytes(claims_parquet, tmp_path):
    first = report.write_report(claims_parquet, tmp_path / "a", draw=False).read_bytes()
    second = report.write_report(claims_parquet, tmp_path / "b", draw=False).read_bytes()
    assert first == second
    # Row order in the file does not matter either.
    shuffled = tmp_path / "shuffled.parquet"
    results.append_rows(shuffled, list(reversed(claims_rows())))
    assert report.write_report(shuffled, tmp_path / "c", draw=False).read_bytes() == first


def test_cli_writes_the_report(claims_parquet, tmp_path, capsys):
    report.main([str(claims_parquet), "--out", str(tmp_path), "--no-figures"])
    assert (tmp_path / "report.md").is_file() and not list(tmp_path.glob("*.png"))
    assert str(tmp_path / "report.md") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.parquet")])


def test_notebook_executes_against_a_results_file(claims_parquet, tmp_path, monkeypatch):
    # The notebook tools are test extras: a machine without them (a bare GPU image) still runs the rest.
    jupyter_client = pytest.importorskip("jupyter_client.kernelspec", reason="the notebook test needs jupyter_client")
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    specs = jupyter_client.KernelSpecManager().find_kernel_specs()
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
    assert "| global_attn | global | peer | global_attn (synthetic) | no |" in quiet
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
    assert "sasa no memory reading at k = 3" in noisy


COMMITTED_REPORTS = committed_results("report.md")


@pytest.mark.parametrize("committed", COMMITTED_REPORTS, ids=lambda p: str(p.parent.relative_to(p.parents[2])))
def test_committed_reports_regenerate_from_their_parquet(committed, tmp_path):
    """The reference reports under results/ are what `python -m qna_bench.report` writes from the parquet
    beside them, table for table (the figures section only lists the PNGs drawn next to it)."""
    regenerated = report.write_report(committed.parent / results.RESULTS_FILE, tmp_path, draw=False).read_text()
    text = committed.read_text(encoding="utf-8")
    body, _, figures = text.partition("\n\n## Figures")
    assert body + "\n" == regenerated
    linked = set(re.findall(r"\]\(([^)]+\.png)\)", figures))
    assert linked and linked == {p.name for p in committed.parent.glob("*.png")}  # no stale figure


def test_the_setup_shows_the_plans_the_qna_rows_record_and_says_when_a_row_recorded_none():
    """What ran, read from each row's layer_flags: a report of an old file says "not recorded" instead
    of printing today's choices."""
    fft = {"convolutions": "direct", "numerators": "fft", "numerator_grads": "fft", "kernel_grads": "fft",
           "fft_chunk_bytes": "2097152"}
    direct = {"convolutions": "direct", "numerators": "direct"}
    rows = [
        synthetic_row("qna", 3, "forward", 1e-3, 1000, layer_flags={"impl": "fast", "plan": direct, "plan_name": "direct",
                                                                   "plan_source": "tuned", "plan_fell_back": False}),
        synthetic_row("qna", 5, "forward", 1e-3, 1000, layer_flags={"impl": "fast", "plan": direct, "plan_name": "direct",
                                                                   "plan_source": "cache", "plan_fell_back": False}),
        synthetic_row("qna", 9, "train", 1e-3, 1000, layer_flags={"impl": "fast", "plan": fft, "plan_name": "fft",
                                                                 "plan_source": "tuned", "plan_fell_back": True}),
        synthetic_row("qna", 11, "train", 1e-3, 1000, layer_flags={"impl": "fast", "num_queries": 2}),
        synthetic_row("qna_reference", 3, "forward", 1e-3, 1000, layer_flags={"impl": "reference"}),
        synthetic_row("conv_dw", 3, "forward", 1e-3, 1000),
    ]
    table = report.plan_rows(_frame(rows).assign(problem="P1"))
    assert table == [
        ["P1", "qna", "forward", "3, 5", "direct", "cache, tuned", ""],
        ["P1", "qna", "train", "9", "fft (numerators fft, numerator_grads fft, kernel_grads fft)", "tuned", "9"],
        ["P1", "qna", "train", "11", "not recorded", "", ""],
    ]
    text = report.header_section(_only(rows, set()))
    assert "### QnA's plans" in text and "not recorded" in text and "tuned thresholds" not in text


def test_the_family_table_names_the_backend_that_ran_and_says_when_it_is_a_fallback():
    """A GPU verdict must say that the neighbourhood family was NATTEN's flex fallback, not its kernels."""
    rows = [synthetic_row("qna", k, "forward", 1e-3, 1000) for k in (3, 5)]
    rows += [synthetic_row("na", k, "forward", 4e-3, 4000, layer_flags={
        "backend": "NATTEN flex-fna", "fallback": "libnatten is not installed here"}) for k in (3, 5)]
    rows += [synthetic_row("swin", k, "forward", 2e-3, 2000) for k in (3, 5)]
    text = report.render(A.analyse(_frame(rows)))
    family_rows = [line for line in text.splitlines() if line.startswith("| neighborhood |")]
    assert family_rows and all("na: NATTEN flex-fna (fallback: libnatten is not installed here)" in line
                               for line in family_rows)
    assert "| what ran |" in text
