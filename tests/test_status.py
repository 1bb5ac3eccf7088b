"""The status registry: one entry per status, in funnel order; the funnel, the report, stats.json
and the CLI summary read it; README's status table documents every status."""
import pathlib
import re

from paircurate.transforms.schema import STATUS_LABELS, STATUS_ORDER, STATUS_REGISTRY, Status, funnel
from paircurate.transforms.write import count_key, summarise_counts

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_every_status_has_one_entry_with_a_unique_position():
    assert set(STATUS_REGISTRY) == set(Status)
    assert all(info.status is status for status, info in STATUS_REGISTRY.items())
    positions = [info.position for info in STATUS_REGISTRY.values()]
    assert len(set(positions)) == len(positions)
    assert all(info.stage and info.label for info in STATUS_REGISTRY.values())


def test_order_follows_the_registry_and_ok_is_last():
    by_position = sorted(STATUS_REGISTRY.values(), key=lambda info: info.position)
    assert STATUS_ORDER == [info.status.value for info in by_position]
    assert STATUS_ORDER[-1] == "ok"
    place = {status: i for i, status in enumerate(STATUS_ORDER)}
    # The funnel order of the statuses that other stages add.
    assert place["language_filtered"] == place["caption_filtered"] + 1
    assert place["tag_filtered"] == place["clip_filtered"] + 1
    assert place["duplicate_semantic"] == place["tag_filtered"] + 1


def test_funnel_of_a_ledger_lists_stages_in_registry_order():
    # A synthetic ledger: rows of a few statuses, listed out of order, counted as the run counts them.
    statuses = ["ok"] * 5 + ["clip_filtered"] * 2 + ["fetch_failed"] * 3 + ["invalid_input"] + ["duplicate_near"] * 2
    rows = [{"status": s, "error": "x: y" if s != "ok" else None} for s in reversed(statuses)]
    counts = summarise_counts(((count_key(row), 1) for row in rows))
    steps = funnel(counts["by_status"])
    assert [step["status"] for step in steps] == STATUS_ORDER[:-1]
    assert [step["stage"] for step in steps] == [STATUS_LABELS[s] for s in STATUS_ORDER[:-1]]
    removed = {step["status"]: step["removed"] for step in steps}
    assert removed["fetch_failed"] == 3 and removed["clip_filtered"] == 2 and removed["tag_filtered"] == 0
    assert steps[0]["remaining"] == len(statuses) - 1 and steps[-1]["remaining"] == 5


def test_a_status_the_registry_does_not_know_comes_last():
    steps = funnel({"ok": 1, "from_the_future": 2, "fetch_failed": 1})
    assert steps[-1] == {"stage": "from_the_future", "status": "from_the_future", "removed": 2, "remaining": 1}


def readme_statuses():
    text = README.read_text(encoding="utf-8")
    section = text.split("### Status vocabulary", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, re.M)


def test_readme_status_table_lists_every_status_in_funnel_order():
    listed = readme_statuses()
    assert sorted(listed) == sorted(s.value for s in Status)
    assert listed == ["ok"] + STATUS_ORDER[:-1]
