"""The frontier's merge (bench/bench_frontier.py --merge-into): a model trained later joins an earlier
frontier, measured beside the same reference, without the other models being trained again."""

import copy

import pytest

from bench.bench_frontier import merge_reports


def row(name: str, auc: float, per_s: float, **extra) -> dict:
    return {"name": name, "test_mean_roc_auc": auc, "serving_comments_per_s": per_s, **extra}


EARLIER = {
    "reference": "default", "test_rows": 5345, "batch_size": 32, "cpus": 2,
    "models": [row("demo", 0.9778, 1269.0, throughput_vs_reference=3.32), row("default", 0.97732639, 382.0),
               row("minilm-fold1", 0.9798, 29.0, throughput_vs_reference=0.08)],
}


def new_run(default_auc: float = 0.97732639, **settings) -> dict:
    return {"reference": "default", "test_rows": 5345, "batch_size": 32, "cpus": 2, **settings, "measured_at": "2026-12-03T20:10Z",
            "models": [row("default", default_auc, 470.0, measured_at="2026-12-03T20:10Z"),
                       row("minilm", 0.9811, 30.0, throughput_vs_reference=30 / 470, measured_at="2026-12-03T20:10Z")]}


def test_a_new_model_joins_with_the_ratio_of_its_own_run_and_the_rest_is_kept():
    earlier = copy.deepcopy(EARLIER)
    merged = merge_reports(earlier, new_run())
    assert [r["name"] for r in merged["models"]] == ["demo", "default", "minilm-fold1", "minilm"]
    assert merged["models"][:3] == EARLIER["models"]  # the reference keeps its earlier row
    minilm = merged["models"][3]
    assert minilm["throughput_vs_reference"] == pytest.approx(30 / 470)  # not 30 / 382: runs differ
    assert minilm["reference_serving_comments_per_s"] == 470.0
    assert minilm["measured_at"] == "2026-12-03T20:10Z"
    assert earlier == EARLIER  # the inputs are not changed


def test_a_model_of_the_same_name_is_replaced_in_place():
    run = new_run()
    run["models"][1]["name"] = "minilm-fold1"
    merged = merge_reports(EARLIER, run)
    assert [r["name"] for r in merged["models"]] == ["demo", "default", "minilm-fold1"]
    assert merged["models"][2]["test_mean_roc_auc"] == 0.9811


def test_another_reference_model_is_refused():
    with pytest.raises(ValueError, match="another model"):
        merge_reports(EARLIER, new_run(default_auc=0.9781))


@pytest.mark.parametrize("key, value", [("batch_size", 8), ("cpus", 16), ("test_rows", 5000)])
def test_runs_measured_another_way_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        merge_reports(EARLIER, new_run(**{key: value}))


def test_an_earlier_report_without_the_reference_is_refused():
    earlier = dict(EARLIER, models=[r for r in EARLIER["models"] if r["name"] != "default"])
    with pytest.raises(ValueError, match="no 'default' row"):
        merge_reports(earlier, new_run())


@pytest.mark.parametrize("earlier", [[], {"models": None}, {"models": [1]}, dict(EARLIER, models=[{"name": "default"}])])
def test_a_file_that_is_not_a_report_is_refused_in_one_line(earlier):
    with pytest.raises(ValueError, match="not a report"):
        merge_reports(earlier, new_run())


def test_the_check_before_measuring_refuses_other_settings_and_accepts_the_same():
    settings = {"reference": "default", "test_rows": 5345, "batch_size": 32, "cpus": 2, "models": []}
    assert merge_reports(EARLIER, settings) == EARLIER
    with pytest.raises(ValueError, match="batch_size"):
        merge_reports(EARLIER, dict(settings, batch_size=8))
