"""egeunet/reference_results.json follows the reference note's audit: every figure carries
its status and source, and only verified or third-party figures are ever shown."""

from __future__ import annotations

import json

import pytest

from egeunet import references as refs

STATUSES = {"verified", "third-party", "unverified", "wrong"}


@pytest.fixture(scope="module")
def reference():
    return refs.load_reference_results()


def _all_entries(reference: dict) -> list[dict]:
    return [
        reference["paper"]["protocol"],
        *reference["paper"]["results"],
        *reference["paper"]["complexity"],
        *reference["reruns"]["results"],
        *reference["corrections"],
    ]


def test_every_entry_names_a_source_and_one_of_four_statuses(reference):
    for entry in _all_entries(reference):
        assert entry["source"], entry
        assert entry["status"] in STATUSES, entry


def test_unverified_and_wrong_figures_are_never_shown(reference):
    shown = refs.shown_figures(reference)
    assert set(shown["status"]) <= {"verified", "third-party"}
    # The paper's ISIC 2017 mean (no source found) appears nowhere in what is shown.
    assert 79.81 not in set(shown["miou"]) and 88.77 not in set(shown["dsc"])
    assert refs.paper_figure(reference, "isic2017", "dsc") is None
    withheld = refs.withheld_figures(reference)
    assert set(withheld["status"]) == {"unverified", "wrong"}
    assert "79.81" not in withheld.to_string()  # withheld figures are listed without values


def test_the_peer_rows_of_the_comparison_table_carry_no_values(reference):
    text = json.dumps(reference)
    for recalled in ("UTNetV2", "TransFuse", "MALUNet"):
        entries = [e for e in reference["paper"]["results"] if recalled in e.get("model", "")]
        assert entries and all(e["status"] == "unverified" for e in entries)
        assert not any(key in e for e in entries for key in refs.METRIC_KEYS)
    assert "peers" not in reference and "13.76" not in text


def test_the_wrong_lower_bound_and_seed_spread_are_gone_as_figures(reference):
    for entry in reference["reruns"]["results"]:
        assert (entry["miou"], entry["dsc"]) != (78.8, 88.2)
        assert entry["runs"] == 1  # individual runs, no ranges
    claims = {c["claim"]: c["status"] for c in reference["corrections"]}
    assert all(status == "wrong" for status in claims.values())
    assert any("78.8" in claim for claim in claims) and any("spread" in c for c in claims)


def test_reruns_are_the_individual_verified_runs_with_their_sources(reference):
    isic2018 = refs.rerun_figures(reference, "isic2018")
    assert sorted(isic2018["dsc"]) == [88.85, 89.23, 89.58]
    assert set(isic2018["status"]) == {"verified"}
    isic2017 = refs.rerun_figures(reference, "isic2017").set_index("dsc")
    assert isic2017.loc[88.07, "source"] == "JCruan519/MALUNet issue #10"
    assert "less certain" in isic2017.loc[88.07, "note"]
    assert isic2017.loc[88.70, "source"] == "JCruan519/EGE-UNet issue #21"


def test_the_paper_isic2018_figure_is_third_party_with_its_std(reference):
    figure = refs.paper_figure(reference, "isic2018", "dsc")
    assert figure == {
        "value": 89.46,
        "std": 0.07,
        "status": "third-party",
        "source": "quoted from the paper in a fork's experiment plan "
        "(Grapeless/EGE-UNet, EXPERIMENT_DOC.md)",
    }
    std_2017 = refs.reference_figures(reference, "isic2017")
    assert std_2017.loc[std_2017["kind"] == "paper", "miou_std"].tolist() == [0.10]


def test_reported_points_and_complexity_use_only_shown_figures(reference):
    complexity = refs.reported_complexity(reference)
    assert complexity[["model", "params", "gflops"]].values.tolist() == [
        ["EGE-UNet", 53374, 0.0721]
    ]
    points = refs.reported_points(reference, "isic2018")
    assert set(points["status"]) <= {"verified", "third-party"}
    assert (points["params"] == 53374).all()
    assert sorted(points["dsc"]) == [88.85, 89.23, 89.46, 89.58]
    assert points.loc[points["dsc"] == 89.46, "label"].item() == "paper (third-party)"
