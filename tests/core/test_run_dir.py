"""Run-directory resume hygiene: recipe drift (trajectory vs operational keys), JSONL truncation and orphaned
temporaries. The exclusive output lock is tested in ``test_run_dir_lock.py``."""

from __future__ import annotations

import json
import logging

import pytest

from core.errors import DinoscopeError
from core.lock import DIR_LOCK_NAME
from core.train.run_dir import (
    OPERATIONAL_KEYS,
    RECIPE_CHANGES_FILE,
    check_recipe_on_resume,
    clean_orphans,
    is_operational,
    recipe_changes,
    truncate_jsonl,
)

# ---------------------------------------------------------------------------------------------------- recipes
SAVED = {
    "optim": {"base_lr": 0.004, "epochs": 100},
    "train": {"num_workers": 4, "seed": 0},
    "crops": {"global_crops_scale": [0.32, 1.0]},
    "eval": {"every": 0, "ks": [10, 20]},
    "dist": {"stage3_max_live_parameters": 10},
}


def _with(**changes) -> dict:
    new = json.loads(json.dumps(SAVED))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        new[section][key] = value
    return new


def test_recipe_changes_lists_dotted_keys_sorted():
    new = _with(optim__base_lr=0.001, train__num_workers=8, crops__global_crops_scale=[0.4, 1.0])
    new["model"] = {"arch": "vit_small"}
    del new["train"]["seed"]
    changes = recipe_changes(SAVED, new)
    assert [c[0] for c in changes] == [
        "crops.global_crops_scale",
        "model.arch",
        "optim.base_lr",
        "train.num_workers",
        "train.seed",
    ]
    assert changes[2][1:] == (0.004, 0.001)
    assert repr(changes[1][1]) == "<absent>" and repr(changes[4][2]) == "<absent>"
    assert recipe_changes(SAVED, json.loads(json.dumps(SAVED))) == []
    assert recipe_changes({"a": {"b": True}}, {"a": {"b": 1}}) == [("a.b", True, 1)]


def test_operational_patterns():
    assert "eval.*" in OPERATIONAL_KEYS
    for key in ("train.num_workers", "dist.stage3_prefetch_bucket_size", "eval.train.params.root", "eval.ks"):
        assert is_operational(key), key
    for key in ("optim.base_lr", "train.seed", "train.num_workers_extra", "dist.zero_stage", "evaluation"):
        assert not is_operational(key), key


def test_trajectory_change_is_refused_naming_key_and_values(tmp_path):
    new = _with(optim__base_lr=0.001, train__num_workers=8)
    with pytest.raises(DinoscopeError) as err:
        check_recipe_on_resume(tmp_path, SAVED, new, allow_change=False, iteration=1250)
    assert "optim.base_lr: 0.004 -> 0.001" in err.value.message
    assert "num_workers" not in err.value.message  # operational changes are never the problem
    assert err.value.field == "optim.base_lr" and err.value.path == str(tmp_path)
    assert "--allow-recipe-change" in err.value.fix and "recipe_changes.jsonl" in err.value.fix
    assert not (tmp_path / RECIPE_CHANGES_FILE).exists()


def test_many_changes_are_listed_up_to_twenty(tmp_path):
    saved = {"optim": {f"k{i:02d}": i for i in range(25)}}
    new = {"optim": {f"k{i:02d}": i + 1 for i in range(25)}}
    with pytest.raises(DinoscopeError) as err:
        check_recipe_on_resume(tmp_path, saved, new, allow_change=False, iteration=5, path_for_errors="r.yaml")
    assert "optim.k19: 19 -> 20" in err.value.message and "optim.k20" not in err.value.message
    assert "and 5 more" in err.value.message and err.value.path == "r.yaml"


def test_operational_change_passes(tmp_path):
    new = _with(train__num_workers=8, eval__every=100, dist__stage3_max_live_parameters=20)
    changes = check_recipe_on_resume(tmp_path, SAVED, new, allow_change=False, iteration=10)
    assert [c[0] for c in changes] == ["dist.stage3_max_live_parameters", "eval.every", "train.num_workers"]
    assert not (tmp_path / RECIPE_CHANGES_FILE).exists()


def test_allowed_change_is_recorded(tmp_path):
    new = _with(optim__base_lr=0.001, train__num_workers=8)
    new["model"] = {"arch": "vit_small"}
    changes = check_recipe_on_resume(tmp_path, SAVED, new, allow_change=True, iteration=1250)
    assert ("optim.base_lr", 0.004, 0.001) in changes and len(changes) == 3
    check_recipe_on_resume(tmp_path, SAVED, new, allow_change=True, iteration=2500)
    lines = [json.loads(line) for line in (tmp_path / RECIPE_CHANGES_FILE).read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1250, 2500]
    assert lines[0]["changes"] == [["model.arch", "<absent>", "vit_small"], ["optim.base_lr", 0.004, 0.001]]
    assert lines[0]["operational"] == [["train.num_workers", 4, 8]] and lines[0]["time"] > 0
    check_recipe_on_resume(tmp_path, SAVED, new, allow_change=True, iteration=3000, record=False)
    assert len((tmp_path / RECIPE_CHANGES_FILE).read_text().splitlines()) == 2


def test_checkpoint_without_recipe_is_accepted_with_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="core.train.run_dir"):
        assert check_recipe_on_resume(tmp_path, None, SAVED, allow_change=False, iteration=1) == []
    assert any("stores no recipe" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------- logs, orphans
def test_truncate_jsonl_drops_later_lines_and_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    keep = [
        b'{"iteration": 0, "loss": 1.5}',
        b'{"note": "no iteration: kept"}',
        b'{"iteration":10,"loss":1.25000}',
        b"",
        b'{"iteration": 20, "loss": 1.0}',
    ]
    later = [b'{"iteration": 21, "loss": 0.9}', b'{"iteration": 30, "loss": 0.8}']
    path.write_bytes(b"\n".join(keep + later) + b'\n{"iteration": 31, "lo')
    path.chmod(0o640)
    assert truncate_jsonl(path, after_iteration=20) == 3
    assert path.read_bytes() == b"\n".join(keep) + b"\n"
    assert path.stat().st_mode & 0o777 == 0o640
    before = path.stat().st_mtime_ns
    assert truncate_jsonl(path, after_iteration=20) == 0
    assert path.stat().st_mtime_ns == before  # nothing to drop: not rewritten
    assert truncate_jsonl(tmp_path / "missing.jsonl", after_iteration=5) == 0
    assert not (tmp_path / "missing.jsonl").exists()
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_truncate_jsonl_terminates_complete_last_record(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}')
    assert truncate_jsonl(path, after_iteration=5, key="step") == 0
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n'


def test_clean_orphans_removes_only_temporaries(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".step_00000010.tmp-xyz").mkdir(parents=True)
    (ckpts / ".step_00000010.tmp-xyz" / "teacher.pt").write_bytes(b"x")
    (ckpts / "step_00000005").mkdir()
    (ckpts / "step_00000005" / ".inner.tmp-1").write_text("")  # inside a step directory: not our business
    (ckpts / "latest").write_text("step_00000005\n")
    (ckpts / ".latest.tmp-q1").write_text("step_00000010\n")
    (tmp_path / ".config.yaml.tmp-abc").write_text("x")
    keep = [
        tmp_path / "config.yaml",
        tmp_path / "metrics.jsonl",
        tmp_path / DIR_LOCK_NAME,
        tmp_path / ".hidden",
        tmp_path / "notes.tmp-1",
        tmp_path / "sub" / ".x.tmp-2",
    ]
    for path in keep:
        path.parent.mkdir(exist_ok=True)
        path.write_text("")
    removed = clean_orphans(tmp_path)
    assert sorted(removed) == sorted(
        [tmp_path / ".config.yaml.tmp-abc", ckpts / ".step_00000010.tmp-xyz", ckpts / ".latest.tmp-q1"]
    )
    assert not any(p.exists() for p in removed)
    assert all(p.exists() for p in keep)
    assert (ckpts / "step_00000005" / ".inner.tmp-1").exists() and (ckpts / "latest").exists()
    assert clean_orphans(tmp_path) == [] and clean_orphans(tmp_path / "nope") == []
