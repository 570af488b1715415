"""The float model's sections: how it trained, how it does per class, which images it gets wrong."""

from __future__ import annotations

from typing import Any

from edgetl.report.thumbs import chart, tile
from edgetl.report.view import RunView, esc, pct, section, table


def training(view: RunView) -> str:
    stage = view.stages.get("finetune")
    if not stage:
        return section("training", "Training", '<p class="muted">No fine-tuning in this run yet.</p>')
    if not view.metrics:
        return section("training", "Training", '<p class="muted">The run was fine-tuned, but its record '
                       "<code>metrics.json</code> is missing or damaged (see the problems above).</p>")
    metrics, config = view.metrics, stage.get("config", {})
    stopped = " — stopped early" if metrics.get("stopped_early") else ""
    phases = f"{pct(metrics.get('phase1_best_val_acc'))} / {pct(metrics.get('phase2_best_val_acc'))}"
    facts = [
        ["epochs", f"{metrics.get('epochs_run')} ({config.get('head_epochs')} head + up to "
                   f"{config.get('finetune_epochs')} fine-tune){stopped}"],
        ["kept", f"epoch {metrics.get('best_epoch')} (lowest validation loss)"],
        ["val top-1 after phase 1 / 2", phases],
        ["image size, width", f"{config.get('image_size')} px, {config.get('width')}"],
        *_data_facts(metrics.get("data") or {}),
    ]  # fmt: skip
    body = chart(view.run_dir / "training.png", "training and validation loss and accuracy per epoch; "
                 "the dashed line is where the backbone is unfrozen")  # fmt: skip
    body += table(["", ""], [[esc(k), esc(v)] for k, v in facts], "facts")
    body += _strategy(stage.get("strategy") or metrics.get("strategy") or {})
    return section("training", "Training", body)


def _data_facts(data: dict[str, Any]) -> list[list[str]]:
    """Where the training images were and how each split was loaded (edgetl.data.cache)."""
    facts = [["training images", data["training_images"]]] if data.get("training_images") else []
    for name, entry in (data.get("cache") or {}).items():
        how = "reused from the image cache" if entry.get("reused") else "decoded into the image cache"
        size = entry.get("bytes", 0) / 2**20
        facts.append([f"{name} split", f"{how} in {entry.get('seconds', 0):.1f} s ({size:,.1f} MiB)"])
    return facts


def _strategy(decision: dict[str, Any]) -> str:
    if not decision:
        return ""
    text = f"<p><b>Strategy:</b> {esc(decision.get('used') or '–')}"
    if decision.get("requested") == "auto":
        text += f" (auto: {esc(decision.get('reason', ''))})"
    text += "</p>"
    candidates = decision.get("candidates") or {}
    if candidates:
        rows = [[esc(name), f"{e['val_loss']:.3f}", pct(e["val_acc"]), esc(e.get("epochs", "")),
                 f"{e['seconds']:.0f} s"] for name, e in candidates.items()]  # fmt: skip
        text += table(["raced", "val loss", "val top-1", "epochs", "time"], rows)
    return text


def classes(view: RunView) -> str:
    val = (view.metrics or {}).get("val") or {}
    if not val.get("count"):
        return ""
    counts = [sum(row) for row in val.get("confusion_matrix", [])]
    rows = []
    for index, (name, accuracy) in enumerate(val.get("per_class_accuracy", {}).items()):
        width = 0 if accuracy is None else round(100 * accuracy)
        bar = f'<span class="bar"><span style="width:{width}%"></span></span>'
        count = counts[index] if index < len(counts) else ""
        rows.append([esc(name), esc(count), f"{pct(accuracy)} {bar}"])
    body = (f"<p>Validation split, {val['count']} images: top-1 {pct(val.get('top1'))}"
            + (f", top-5 {pct(val.get('top5'))}" if "top5" in val else "") + ".</p>")  # fmt: skip
    body += '<div class="pair">' + chart(view.run_dir / "confusion.png", "confusion matrix, validation split")
    body += table(["class", "images", "top-1"], rows) + "</div>"
    test = (view.metrics or {}).get("test")
    if test and test.get("count"):
        body += f"<p>Held-out test split, {test['count']} images: top-1 {pct(test.get('top1'))}.</p>"
    return section("classes", "Per class", body)


def mistakes(view: RunView) -> str:
    val = (view.metrics or {}).get("val") or {}
    wrong = val.get("misclassified")
    if wrong is None:
        return ""
    if not wrong:
        return section("mistakes", "Misclassified validation images", "<p>None: every validation image is right.</p>")
    root = view.data_root
    tiles = "".join(
        tile(root, item["image"], f"<b>{esc(item['predicted'])}</b> {pct(item['confidence'], 0)}"
             f"<br>true: {esc(item['label'])}")
        for item in wrong
    )  # fmt: skip
    total = val["count"] - round(val["top1"] * val["count"])
    note = f"{len(wrong)} of {total}, surest mistakes first" if total > len(wrong) else f"all {total}, surest first"
    intro = f'<p class="muted">Float model; predicted class and its confidence, then the true class ({note}).</p>'
    return section("mistakes", "Misclassified validation images", f'{intro}<div class="gallery">{tiles}</div>')
