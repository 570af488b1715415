"""`edgetl search` at toy scale: a study over input size and recipe within a budget, its results, the
winner as a normal run, pruning, the budget checked before training, the time budget, Ctrl-C and
--resume, two processes on one study, and bad input."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import TOY_CLASSES
from faults import ERROR_LINE, cli, spawn

pytest.importorskip("optuna", reason="needs the train extra (optuna)")
pytest.importorskip("tensorflow", reason="needs the export extra")

# A CPU target for the toy model: 32 px by default, 40 px too; loose parity (a from-scratch toy model
# guesses); its board's latency estimated as 3x this host's, within x/÷2.
TOY_TARGET = """
name = "toy-cpu"
description = "a CPU board for the toy model"
kind = "cpu"
runtime = "litert"
delegate = "xnnpack"
artifact = "model_int8.tflite"
threads = 1
[input]
size = 32
sizes = [40]
[parity]
max_drop = 100.0
min_agreement = 0.0
min_images = 1
[latency]
host_factor = 3.0
uncertainty = 2.0
reference = "a test's factor"
"""
# Every trial's recipe: one head epoch and two fine-tuning epochs of the from-scratch toy model.
RECIPE = ["--widths", "0.35", "--weights", "none", "--head-epochs", "1", "--finetune-epochs", "2",
          "--batch-size", "16", "--patience", "0"]  # fmt: skip
STATUSES = {"complete", "pruned", "over-budget", "parity-failed", "diverged", "failed"}


@pytest.fixture(scope="module")
def toy_data(toy_data, tmp_path_factory) -> Path:
    """A copy of the session's toy data: the search's image-cache entries (32 and 40 px) are its own."""
    import shutil

    return Path(shutil.copytree(toy_data, tmp_path_factory.mktemp("search-data") / "data"))


@pytest.fixture(scope="module")
def toy_target(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("search-target") / "toy-cpu.toml"
    path.write_text(TOY_TARGET)
    return path


@pytest.fixture(scope="module")
def toy_search(toy_data, toy_target, tmp_path_factory):
    """Three trials with the board's latency estimated (--latency-on target): (outcome, out folder)."""
    out = tmp_path_factory.mktemp("search") / "out"
    done = cli("-q", "search", str(toy_data), "--out", str(out), "--target", str(toy_target), *RECIPE,
               "--trials", "3", "--latency-on", "target", "--json")  # fmt: skip
    return done, out


def test_search_records_every_trial_and_picks_the_most_accurate_int8_model(toy_search, toy_target):
    done, out = toy_search
    assert done.code == 0, done
    payload = json.loads(done.stdout)
    summary = json.loads((out / "search.json").read_text())
    rows = summary["trials"]
    assert [r["number"] for r in rows] == [0, 1, 2] and {r["status"] for r in rows} <= STATUSES
    # the first trial is edgetl's default recipe at the largest size within budget
    assert rows[0]["params"] == {"image_size": 40, "width": 0.35, "strategy": "auto", "lr": 1e-3,
                                 "label_smoothing": 0.1}  # fmt: skip
    for row in rows:
        assert row["params"]["image_size"] in (32, 40) and row["params"]["width"] == 0.35
        assert 3e-4 <= row["params"]["lr"] <= 3e-3 and 0 <= row["params"]["label_smoothing"] <= 0.2
    complete = [r for r in rows if r["status"] == "complete"]
    assert complete, rows
    for row in complete:
        model = out / row["run_dir"] / "model_int8.tflite"
        assert row["bytes"] == model.stat().st_size and row["parity_passed"]
        # the untrained model of that shape, probed before training, predicted its size (metadata aside)
        size, width = row["params"]["image_size"], row["params"]["width"]
        probe = json.loads((out / "shapes" / f"{size}x{width:g}" / "shape.json").read_text())
        assert abs(probe["bytes"] - row["bytes"]) < 0.05 * row["bytes"], (probe["bytes"], row["bytes"])
        latency = row["latency"]  # estimated: 3x this host's figure, within x/÷2
        assert latency["how"] == "estimated" and latency["ms"] == pytest.approx(3 * latency["host_ms"], rel=1e-3)
        assert latency["low"] == pytest.approx(latency["ms"] / 2, rel=1e-3)
        assert latency["high"] == pytest.approx(latency["ms"] * 2, rel=1e-3)
        assert not (out / row["run_dir"] / "checkpoints").exists()
    best = max(complete, key=lambda r: (r["int8_top1"], -r["latency"]["ms"], -r["bytes"]))
    assert summary["best"]["number"] == best["number"] and payload["best"]["number"] == best["number"]
    assert set(summary["pareto"]) <= {r["number"] for r in rows if r.get("int8_top1") is not None}
    assert best["number"] in summary["pareto"]
    assert summary["latency_on"]["kind"] == "target" and "x/÷2" in summary["latency_on"]["how"]
    page = (out / "report.html").read_text()
    assert "<svg" in page and "Pareto front" in page and f"trial {best['number']}" in page
    assert "a test&#x27;s factor" in page or "a test's factor" in page


def test_the_winner_is_a_normal_run_that_package_takes(toy_search, toy_target):
    _, out = toy_search
    summary = json.loads((out / "search.json").read_text())
    best = next(r for r in summary["trials"] if r["number"] == summary["best"]["number"])
    assert (out / "best" / "manifest.json").read_bytes() == (out / best["run_dir"] / "manifest.json").read_bytes()
    packaged = cli("-q", "package", str(out / "best"), "--target", str(toy_target), "--json")
    assert packaged.code == 0, packaged
    bundle = Path(json.loads(packaged.stdout)["bundle_dir"])
    assert (bundle / "model_int8.tflite").read_bytes() == (out / best["run_dir"] / "model_int8.tflite").read_bytes()
    assert f"input {best['params']['image_size']}x{best['params']['image_size']}" in (bundle / "README.txt").read_text()


# ----------------------------------------------------------------------------- one trial, in-process


class FakeTrial:
    """What the objective asks of an Optuna trial, with fixed choices and a scripted pruner."""

    def __init__(self, params: dict, prune_after: int | None = None, number: int = 0):
        self.params, self.prune_after, self.number = params, prune_after, number
        self.user_attrs: dict = {}
        self.reported: list[tuple[int, float]] = []

    def suggest_categorical(self, name, choices):
        assert self.params[name] in choices
        return self.params[name]

    def suggest_float(self, name, low, high, log=False):
        assert low <= self.params[name] <= high
        return self.params[name]

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self) -> bool:
        return self.prune_after is not None and len(self.reported) >= self.prune_after

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value


PARAMS = {"image_size": 32, "width": 0.35, "strategy": "partial", "lr": 1e-3, "label_smoothing": 0.1}


def context(toy_data, target_path: Path, out: Path, cost: dict, **budget):
    """A trial context over the toy data, the shape's cost given (no probe)."""
    from edgetl.search.latency import LatencyOn
    from edgetl.search.shapes import SHAPE, Budget, Shapes
    from edgetl.search.space import Space
    from edgetl.search.study import trial_export
    from edgetl.search.trial import Context
    from edgetl.targets import load_target

    target = load_target(str(target_path))
    how, limits = LatencyOn("host"), Budget(**budget)
    shape = out / "shapes" / "32x0.35"
    shape.mkdir(parents=True)
    (shape / SHAPE).write_text(json.dumps({"size": 32, "width": 0.35, **cost, "over_budget": limits.problems(cost)}))
    recipe = {"head_epochs": 1, "finetune_epochs": 2, "batch_size": 16, "patience": 0, "decode_workers": 1}
    shapes = Shapes(out, list(TOY_CLASSES), how, limits)
    return Context(str(toy_data), out, target, Space((32,), (0.35,)), limits, shapes, how, recipe, "none",
                   trial_export(target))  # fmt: skip


def test_a_trial_the_pruner_stops_ends_after_that_epoch(toy_data, toy_target, tmp_path):
    import optuna

    from edgetl.search.trial import Objective

    ctx = context(toy_data, toy_target, tmp_path, {"bytes": 1, "latency": {"ms": 0.1}})
    trial = FakeTrial(PARAMS, prune_after=1)
    with pytest.raises(optuna.TrialPruned):
        Objective(ctx)(trial)
    record = trial.user_attrs["result"]
    assert record["status"] == "pruned" and record["epochs"] == 1 and trial.reported[0][0] == 1
    assert trial.reported[0][1] == pytest.approx(-record["val_loss"])  # minus the validation loss: the study maximises
    assert not (tmp_path / "trials" / "000").exists()  # no model and no checkpoint: a pruned trial never resumes


def test_a_shape_over_budget_is_rejected_before_training(toy_data, toy_target, tmp_path):
    from edgetl.search.trial import Objective

    ctx = context(toy_data, toy_target, tmp_path, {"bytes": 900_000, "latency": {"ms": 5.0}},
                  max_latency_ms=1.0, max_model_bytes=500_000)  # fmt: skip
    trial = FakeTrial(PARAMS)
    assert Objective(ctx)(trial) == 0.0
    record = trial.user_attrs["result"]
    assert record["status"] == "over-budget" and record["reason"] == "5 ms > 1 ms; 900 kB > 500 kB"
    assert not trial.reported and not (tmp_path / "trials" / "000").exists()  # nothing trained


def test_the_time_budget_finishes_the_trial_under_way_with_its_best_epoch(toy_data, toy_target, tmp_path):
    from edgetl.search.trial import Objective

    ctx = context(toy_data, toy_target, tmp_path, {"bytes": 1, "latency": {"ms": 0.1}})
    ctx.deadline = time.monotonic()  # already spent: the trial stops after its first epoch
    trial = FakeTrial(PARAMS)
    value = Objective(ctx)(trial)
    record = trial.user_attrs["result"]
    assert record["status"] == "complete" and record["epochs"] == 1 and record["stopped_by_time_budget"] == 1
    assert value == record["int8_top1"] and (tmp_path / "trials" / "000" / "model_int8.tflite").is_file()
    assert record["latency"]["how"] == "host" and record["latency"]["ms"] > 0


def test_no_trial_starts_that_could_not_finish_an_epoch_in_time(toy_data, toy_target, tmp_path):
    ctx = context(toy_data, toy_target, tmp_path, {"bytes": 1, "latency": {"ms": 0.1}})
    assert ctx.room_for_a_trial()  # no time budget
    ctx.deadline, ctx.epoch_s, ctx.judge_s = time.monotonic() + 10, 8.0, 5.0
    assert not ctx.room_for_a_trial()  # an epoch and a verdict take 13 s, 10 are left
    ctx.epoch_s = 2.0
    assert ctx.room_for_a_trial()


def test_a_shape_probe_measures_the_arena_when_the_budget_has_one(tmp_path):
    """A microcontroller's arena is known before training too: TFLite Micro runs the untrained model."""
    pytest.importorskip("tflite_micro", reason="needs the mcu extra")
    from edgetl.search.latency import LatencyOn
    from edgetl.search.shapes import Budget, Shapes

    shapes = Shapes(tmp_path, list(TOY_CLASSES), LatencyOn("host"), Budget(max_arena_bytes=10_000))
    cost = shapes.cost(32, 0.35)
    assert cost["arena_bytes"] > 10_000
    assert cost["over_budget"] == [f"arena {cost['arena_bytes'] / 1000:,.0f} kB > 10 kB"]
    assert cost["bytes"] == (tmp_path / "shapes" / "32x0.35" / "model_int8.tflite").stat().st_size
    assert json.loads((tmp_path / "shapes" / "32x0.35" / "shape.json").read_text()) == cost  # probed once, kept


# ----------------------------------------------------------------------------- Ctrl-C, --resume, two processes


def _wait_for(path: Path, proc, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_an_interrupted_search_resumes_in_two_processes_sharing_the_study(toy_data, toy_target, tmp_path):
    out = tmp_path / "out"
    args = ["search", str(toy_data), "--out", str(out), "--target", str(toy_target), *RECIPE,
            "--latency-on", "host", "--sizes", "32", "--finetune-epochs", "4"]  # fmt: skip
    first = spawn(*args, "--trials", "3")
    _wait_for(out / "trials" / "000" / "checkpoints" / "last.pt", first)  # trial 0 finished an epoch
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    assert "edgetl: error: search interrupted; 1 trial(s) are recorded" in stderr and "--resume" in stderr
    assert json.loads((out / "search.json").read_text())["trials"][0]["status"] == "interrupted"
    # two processes continue the study together: one takes the interrupted trial up where it stopped
    a, b = spawn(*args, "--trials", "3", "--resume", "--json"), spawn(*args, "--trials", "3", "--resume", "--json")
    outputs = [p.communicate(timeout=300) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outputs
    # queued again once: two processes resuming together would both queue it (and one then found it locked)
    assert "".join(err for _, err in outputs).count("continuing interrupted trial(s) 0") == 1
    rows = json.loads((out / "search.json").read_text())["trials"]
    finished = [r for r in rows if r["status"] != "interrupted"]
    assert len(finished) >= 3 and len({r["run_dir"] for r in finished}) == len(finished)
    resumed = next(r for r in finished if r["run_dir"] == "trials/000")
    assert resumed["status"] in STATUSES and resumed["number"] > 0
    assert rows[0]["status"] == "interrupted" and rows[0]["continued_as"] == resumed["number"]
    # a process that ends while the other still runs a trial exits 0 (that trial may still win), not 4
    ran = [json.loads(stdout)["trials_this_process"] for stdout, _ in outputs]
    assert all(n >= 1 for n in ran) and sum(ran) == len(finished)  # both worked on it


def test_resume_takes_over_the_trial_of_a_process_that_died_but_not_of_a_live_one(tmp_path):
    """A killed process leaves its trial "running": nobody holds its folder's lock (the kernel's), so the
    next --resume continues it; a folder another process holds, or a trial just starting, is left alone."""
    import subprocess
    import sys

    import optuna

    from edgetl.search.study import STUDY_NAME, requeue_unfinished, storage_for

    study = optuna.create_study(storage=storage_for(tmp_path, None), study_name=STUDY_NAME, direction="maximize")
    size = {"image_size": optuna.distributions.CategoricalDistribution([32, 40])}
    dead, live, _starting = (study.ask(size) for _ in range(3))
    for trial in (dead, live):
        trial.set_user_attr("run_dir", f"trials/{trial.number:03d}")
        (tmp_path / "trials" / f"{trial.number:03d}").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(120)",
                               str(tmp_path / "trials" / "001" / ".edgetl.lock")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert requeue_unfinished(study, tmp_path) == [0]
    finally:
        holder.kill()
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {0: "FAIL", 1: "RUNNING", 2: "RUNNING", 3: "WAITING"}
    again = study.get_trials()[3]
    assert again.user_attrs["resume_of"] == 0 and again.system_attrs["fixed_params"] == dead.params  # the same choices


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("extra", "code", "message"), [
    (["--target", "no-such-board"], 2, "unknown target"),
    (["--target", "x86-onnx"], 2, "edgetl search picks an int8 model; x86-onnx ships model.onnx"),
    (["--trials", "0"], 2, "Invalid value for '--trials'"),
    (["--time-budget", "0.00001"], 2, "is shorter than one epoch of the cheapest candidate"),
    (["--sizes", "48"], 2, "--sizes 48: toy-cpu takes 32, 40 only"),
    (["--sizes", "3x"], 2, "expected a comma-separated list"),
    (["--latency-on", "moon"], 2, "--latency-on 'moon': expected host, target or ssh:HOST"),
    (["--target", "coral-edgetpu", "--latency-on", "target"], 2, "coral-edgetpu gives no factor"),
    (["--max-latency-ms", "0.00001"], 4, "no candidate fits the budget: the cheapest, 32 px at width 0.35, needs"),
    (["--resume"], 1, "there is no search to resume in"),
    (["--storage", "nosuchdb://x"], 2, "--storage nosuchdb://x: "),
])  # fmt: skip
def test_bad_input_is_one_line(toy_data, toy_target, tmp_path, extra, code, message):
    args = ["search", str(toy_data), "--out", str(tmp_path / "out"), "--target", str(toy_target), *RECIPE, *extra]
    done = cli("-q", *args)
    assert done.code == code, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]) and message in lines[0], done


def test_a_folder_with_a_search_is_not_overwritten(toy_search, toy_data, toy_target):
    _, out = toy_search
    done = cli("search", str(toy_data), "--out", str(out), "--target", str(toy_target), *RECIPE)
    assert done.code == 1 and f"{out} already holds a search" in done.stderr and "--resume" in done.stderr, done
