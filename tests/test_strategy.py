"""Transfer strategies: layer-wise rates, progressive unfreezing, the auto choice and its evidence, resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TOY_CONFIG

from edgetl.config import RACE, FinetuneConfig
from edgetl.errors import ConfigError
from edgetl.train import finetune as train_module
from edgetl.train.model import EdgeClassifier
from edgetl.train.optim import build_optimizer
from edgetl.train.strategy import choose, first_trainable

pytestmark = pytest.mark.slow


def toy(**settings) -> FinetuneConfig:
    return FinetuneConfig.build(TOY_CONFIG, {"head_epochs": 1, "finetune_epochs": 3, **settings})


def test_layer_wise_rates_follow_the_formula():
    torch.manual_seed(0)
    model = EdgeClassifier(3, 0.35)
    cfg = toy(strategy="full", layer_decay=0.5, lr=1e-2)
    optimizer, _ = build_optimizer(model, cfg, 2, 0, steps_per_epoch=4, strategy="full")
    rates = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    blocks = len(model.features)
    assert rates["head"] == pytest.approx(cfg.phase2_head_lr)
    for index in range(blocks):
        assert rates[f"features.{index}"] == pytest.approx(cfg.phase2_head_lr * 0.5 ** (blocks - index))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_whole_trains_every_block_at_the_heads_rate():
    model = EdgeClassifier(3, 0.35)
    cfg = toy(strategy="whole", lr=1e-2)
    optimizer, _ = build_optimizer(model, cfg, 2, 0, steps_per_epoch=4, strategy="whole")
    rates = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert rates == {"head": pytest.approx(1e-3), "backbone": pytest.approx(1e-3)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert [first_trainable("whole", cfg, model, e) for e in range(3)] == [0, 0, 0]


def test_the_race_is_configurable_and_checked():
    assert toy().race == RACE == ("feature-extraction", "whole")
    assert toy(race=["feature-extraction", "whole"]).race == ("feature-extraction", "whole")  # as JSON reads back
    assert toy(race=("full",)).to_dict()["race"] == ["full"]
    for bad in ((), ("auto",), ("full", "full"), ("everything",)):
        with pytest.raises(ConfigError, match="invalid race"):
            toy(race=bad)


def test_first_trainable_block_per_strategy():
    model = EdgeClassifier(3, 0.35)
    blocks = len(model.features)  # 19
    cfg = toy(unfreeze_epochs=3)
    assert [first_trainable("full", cfg, model, e) for e in range(4)] == [blocks - 7, blocks - 13, 0, 0]
    assert first_trainable("feature-extraction", cfg, model, 0) == blocks
    assert first_trainable("partial", cfg, model, 5) == (2 * blocks) // 3


def _record_trainable(monkeypatch) -> list[list[int]]:
    """Per epoch, the features blocks whose parameters received gradients."""
    real = train_module.train_one_epoch
    seen: list[list[int]] = []

    def recording(forward, *args, **kwargs):
        stats = real(forward, *args, **kwargs)
        model = getattr(forward, "module", forward)
        if kwargs.get("desc", "").startswith("epoch"):
            seen.append([i for i, block in enumerate(model.features)
                         if any(p.grad is not None for p in block.parameters())])  # fmt: skip
        return stats

    monkeypatch.setattr(train_module, "train_one_epoch", recording)
    return seen


def test_progressive_unfreezing_thaws_top_down(toy_data, tmp_path, monkeypatch):
    seen = _record_trainable(monkeypatch)
    train_module.finetune(toy_data, tmp_path / "r", toy(strategy="full", unfreeze_epochs=3))
    blocks = 19
    assert seen == [[], list(range(blocks - 7, blocks)), list(range(blocks - 13, blocks)), list(range(blocks))]
    rows = (tmp_path / "r" / "history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == ["1", "2", "2", "2"]


def test_feature_extraction_never_trains_the_backbone(toy_data, tmp_path, monkeypatch):
    seen = _record_trainable(monkeypatch)
    train_module.finetune(toy_data, tmp_path / "r", toy(strategy="feature-extraction"))
    assert seen == [[], [], [], []]


def test_auto_records_its_evidence(toy_data, tmp_path):
    result = train_module.finetune(toy_data, tmp_path / "r", toy(strategy="auto"))
    decision = json.loads((tmp_path / "r" / "metrics.json").read_text())["strategy"]
    assert decision["requested"] == "auto" and decision["used"] in RACE
    assert list(decision["candidates"]) == list(RACE) and decision["probe_epochs"] == 2
    for evidence in decision["candidates"].values():
        assert 0 <= evidence["val_acc"] <= 1 and evidence["seconds"] > 0 and evidence["epochs"] == 2
    assert decision["used"] in decision["reason"] and result.strategy == decision
    from edgetl.rundir import read_manifest

    assert read_manifest(tmp_path / "r")["stages"]["finetune"]["strategy"]["used"] == decision["used"]


def test_the_race_runs_each_lane_as_its_own_run_would(toy_data, tmp_path, monkeypatch):
    """Raced three ways: feature extraction's two epochs (no backbone block), then full's two (thawing top-down),
    whole's two (every block), then the winner continues: the epochs of the run are the winner's, not repeated."""
    seen = _record_trainable(monkeypatch)
    race = ("feature-extraction", "full", "whole")
    train_module.finetune(toy_data, tmp_path / "r", toy(strategy="auto", unfreeze_epochs=3, race=race))
    used = json.loads((tmp_path / "r" / "metrics.json").read_text())["strategy"]["used"]
    blocks = 19
    full = [list(range(blocks - 7, blocks)), list(range(blocks - 13, blocks)), list(range(blocks))]
    fe = [[], [], []]
    whole = [list(range(blocks))] * 3
    lanes = {"feature-extraction": fe, "full": full, "whole": whole}
    assert seen == [[], *fe[:2], *full[:2], *whole[:2], lanes[used][2]]
    rows = (tmp_path / "r" / "history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "2", "3", "4"]  # one row per epoch of the run


@pytest.mark.parametrize("winner", RACE)
def test_auto_gives_the_model_of_the_strategy_it_chose(toy_data, tmp_path, monkeypatch, winner):
    """The winner's lane is continued, not retrained: auto's model is the fixed strategy's, bit for bit."""
    from edgetl.train import strategy as strategy_module
    from edgetl.train.checkpoint import load_checkpoint

    monkeypatch.setattr(strategy_module, "choose", lambda evidence, images: (winner, f"{winner} forced"))
    train_module.finetune(toy_data, tmp_path / "auto", toy(strategy="auto"))
    train_module.finetune(toy_data, tmp_path / "fixed", toy(strategy=winner))
    auto, _ = load_checkpoint(tmp_path / "auto")
    fixed, _ = load_checkpoint(tmp_path / "fixed")
    for key, value in fixed.state_dict().items():
        assert torch.equal(value, auto.state_dict()[key]), key
    histories = [(tmp_path / run / "history.csv").read_text().splitlines() for run in ("auto", "fixed")]
    assert [row.split(",")[4:6] for row in histories[0]] == [row.split(",")[4:6] for row in histories[1]]


@pytest.mark.parametrize(("strategy", "stop_at"), [("full", 3), ("auto", 3), ("auto", 6)])
def test_resume_in_the_middle_of_phase_2_gives_the_uninterrupted_model(toy_data, tmp_path, monkeypatch, strategy,
                                                                        stop_at):  # fmt: skip
    """full: stopped in the second epoch of phase 2 (blocks half thawed); auto: in the race (3: feature
    extraction's second epoch; nothing of phase 2 is saved) and after it (6: the winner's third epoch)."""
    from edgetl.errors import Interrupted
    from edgetl.train.checkpoint import load_checkpoint

    cfg = toy(strategy=strategy, unfreeze_epochs=3)
    train_module.finetune(toy_data, tmp_path / "whole", cfg)
    real, calls = train_module.train_one_epoch, {"n": 0}

    def interrupt(*args, **kwargs):
        if kwargs.get("desc", "").startswith("epoch"):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupt)
    with pytest.raises(Interrupted):
        train_module.finetune(toy_data, tmp_path / "split", cfg)
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    train_module.finetune(toy_data, tmp_path / "split", cfg, resume=True)
    whole, _ = load_checkpoint(tmp_path / "whole")
    split, _ = load_checkpoint(tmp_path / "split")
    for key, value in whole.state_dict().items():
        assert torch.equal(value, split.state_dict()[key]), key
    whole_choice, split_choice = (json.loads((tmp_path / run / "metrics.json").read_text())["strategy"]
                                  for run in ("whole", "split"))  # fmt: skip
    assert whole_choice["used"] == split_choice["used"]
    for name, evidence in whole_choice.get("candidates", {}).items():  # the probes' timings differ, not their scores
        assert evidence["val_acc"] == split_choice["candidates"][name]["val_acc"]


def test_choose_prefers_feature_extraction_within_the_tolerance():
    evidence = {"feature-extraction": {"val_loss": 0.303, "val_acc": 0.90, "epochs": 2},
                "full": {"val_loss": 0.300, "val_acc": 0.91, "epochs": 2},
                "whole": {"val_loss": 0.350, "val_acc": 0.91, "epochs": 2}}  # fmt: skip
    chosen, reason = choose(evidence, 100)  # 1 % worse: within the 2 % tolerance
    assert chosen == "feature-extraction" and "within 2 % of the best (full) and the cheapest" in reason
    evidence["feature-extraction"]["val_loss"] = 0.31  # 3.3 % worse
    assert choose(evidence, 100)[0] == "full"
    evidence["feature-extraction"]["val_loss"] = 0.25  # better outright
    chosen, reason = choose(evidence, 100)
    assert chosen == "feature-extraction" and "feature-extraction is the best" in reason
    assert "after 2 phase-2 epoch(s) each on 100 images" in reason and "0.250 (90.0 %)" in reason


def test_choose_takes_the_lowest_loss_among_the_backbone_lanes():
    """No tolerance between full and whole: they cost about the same, the lower loss wins (issue #30)."""
    evidence = {"feature-extraction": {"val_loss": 0.50, "val_acc": 0.80, "epochs": 2},
                "full": {"val_loss": 0.300, "val_acc": 0.90, "epochs": 2},
                "whole": {"val_loss": 0.297, "val_acc": 0.90, "epochs": 2}}  # fmt: skip
    chosen, reason = choose(evidence, 100)
    assert chosen == "whole" and reason.endswith("whole is the best")
    del evidence["whole"]
    assert choose(evidence, 100)[0] == "full"
