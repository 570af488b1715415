"""All text edgetl prints: each command's result rendered for a terminal (``--json`` prints the
result's ``to_dict()`` instead). Functions here format; they read no files and decide nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def finetune_summary(result: Any) -> str:
    """What ``edgetl finetune`` prints."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"run:        {result.run_dir}",
        f"classes:    {len(result.classes)} ({', '.join(result.classes[:8])}"
        f"{', ...' if len(result.classes) > 8 else ''})",
        f"val top-1:  {pct(result.best_val_acc)} (best epoch {result.best_epoch} of "
        f"{result.epochs_run}{', stopped early' if result.stopped_early else ''})",
        f"by phase:   head-only {pct(result.phase1_val_acc)}, fine-tuned {pct(result.phase2_val_acc)}",
    ]
    strategy = result.strategy or {}
    if strategy.get("requested") == "auto":
        lines.append(f"strategy:   {strategy.get('used')} (auto: {strategy.get('reason')})")
    elif strategy:
        lines.append(f"strategy:   {strategy.get('used')}")
    if result.test_acc is not None:
        lines.append(f"test top-1: {pct(result.test_acc)} (held-out test split)")
    if result.skipped_files:
        lines.append(f"skipped:    {result.skipped_files} unreadable file(s), listed in metrics.json")
    lines.append(f"time:       {result.seconds:.0f}s on {result.device}")
    return "\n".join(lines)


def parity_lines(report: Any) -> list[str]:
    """One line per artifact: top-1, Δ, agreement (with how many differ and how many are near-ties), verdict."""
    lines = []
    for name, m in report.artifacts.items():
        verdict = "pass" if m["passed"] else "FAIL"
        ties = m.get("near_ties") or {}
        differ = ties.get("disagreements_within", 0) + ties.get("disagreements_outside", 0)
        flips = f" ({differ} differ, {ties['disagreements_within']} of them near-ties)" if differ else ""
        lines.append(
            f"  {name:<22} top-1 {100 * m['top1']:6.2f}%  Δ {m['delta_top1_pp']:+.2f} pp  "
            f"agreement {100 * m['agreement']:6.2f}%{flips}  {verdict}"
        )
    return lines


def compile_summary(accelerator: dict | None, tflm: dict | None) -> list[str]:
    """The accelerator compiler's and TFLite Micro's findings, one line each."""
    lines = []
    if accelerator and accelerator.get("compiled") and accelerator["tool"] == "vela":
        a = accelerator
        lines.append(f"vela {a['vela_version']} ({a['accelerator']}, {a['system_config']}, {a['memory_mode']}): "
                     f"{a['npu_ops']}/{a['npu_ops'] + a['cpu_ops']} ops on the NPU, SRAM {a['sram_bytes']:,} B, "
                     f"flash {a['flash_bytes']:,} B, estimated {1000 * a['inference_time_s']:.2f} ms/inference")
    elif accelerator and accelerator.get("compiled"):
        a = accelerator
        lines.append(f"edgetpu_compiler: {a['tpu_ops']}/{a['total_ops']} ops on the Edge TPU, "
                     f"on-chip {a.get('on_chip_bytes') or 0:,} B, off-chip {a.get('off_chip_bytes') or 0:,} B")
    if tflm:
        ref, default = tflm["compared"]["litert_reference_kernels"], tflm["compared"]["litert_default_kernels"]
        lines.append(f"tflite-micro {tflm['version']}: minimum arena {tflm['arena_bytes']:,} B"
                     f"{'' if tflm['arena_verified'] else ' (NOT verified)'}; on {tflm['images']} images top-1 "
                     f"{100 * tflm['top1']:.2f}%, max output difference vs LiteRT reference kernels "
                     f"{ref['max_abs_diff_steps']} steps, top-1 agreement with LiteRT (XNNPACK) "
                     f"{100 * default['agreement']:.2f}%")
    return lines


def export_text(result: Any, run_dir: str, next_steps: list[str]) -> str:
    """What ``edgetl export`` prints: sizes, the parity lines, remedies, where the report is, next steps."""
    sizes = [f"  {name:<22} {a['bytes'] / 1e6:6.2f} MB  {a['precision']}" for name, a in result.artifacts.items()]
    text = [f"exported {run_dir}:", *sizes, "parity (vs float PyTorch):", *parity_lines(result.parity)]
    text += [f"remedy: {r['remedy']}: {'pass' if r.get('passed') else 'fail'}" for r in result.remedies
             if "passed" in r]  # fmt: skip
    text.append(f"time: {result.timings['total_s']:.0f}s; parity: {run_dir}/parity.md; "
                f"the run on one page: {run_dir}/report.html")
    text += [f"next: {step}".replace("`", "") for step in next_steps]
    return "\n".join(text)


def check_text(report: Any, run_dir: str) -> str:
    """What ``edgetl check`` prints: on what the verdict stands, then the parity lines."""
    data = report.data
    float_top1 = 100 * report.float_metrics["top1"]
    head = (f"parity on {data['count']} images ({data['source']}, sha256 {data['sha256'][:12]}); "
            f"float top-1 {float_top1:.2f}%")
    return "\n".join([head, *parity_lines(report),
                      f"parity: {run_dir}/parity.md; the run on one page: {run_dir}/report.html"])


def on_target_text(record: dict[str, Any], run_dir: str) -> str:
    """What ``edgetl check --on-target`` prints: where it ran, the verdict, the difference from the host."""
    steps = record.get("max_output_diff_steps")
    diff = f"{record['max_output_diff']:.4f}" + (f" = {steps} output steps" if steps is not None else "")
    versions = ", ".join(f"{k} {v}" for k, v in sorted((record["where"].get("versions") or {}).items()))
    verdict = "PASS" if record["passed"] else "FAIL"
    return "\n".join([
        f"{record['target']} on {record['described']}: {verdict} on {record['count']} images "
        f"({record['seconds']:.0f} s{', reused' if record.get('reused') else ''})",
        f"  top-1 {100 * record['top1']:.2f}% (Δ {record['delta_top1_pp']:+.2f} pp vs float), agreement with float "
        f"{100 * record['agreement']:.2f}%, with the host's int8 {100 * record['agreement_with_host']:.2f}%",
        f"  largest output difference from the host's int8 on the host's input crops ({record.get('kernel_images')} "
        f"images): {diff}; {record['images_over_one_step'] or 0} images over one step",
        f"  on the device's own crops: up to {record.get('pipeline_max_output_diff_steps')} steps, "
        f"{record.get('pipeline_images_over_one_step')} images over one step; " + (
            "the runtime resamples each photo itself" if record["inputs_differing"] is None else
            f"{record['inputs_differing']} input crops made differently (up to {record['input_diff_max']} levels)"),
        f"  software: Python {record['where'].get('python')}, {versions}",
        f"on-target verdicts: {run_dir}/parity.md (Where it runs)",
    ])  # fmt: skip


def board_bench_text(result: dict[str, Any], run_dir: Any) -> str:
    """What ``edgetl bench BUNDLE --ssh HOST`` prints: the board, its software, latency per thread count."""
    device = result.get("device", {})
    versions = ", ".join(f"{k} {v}" for k, v in sorted(device.get("versions", {}).items()))
    lines = [f"{result['host']}: {device.get('board')} ({device.get('machine')}), Python {device.get('python')}, "
             f"{versions}", f"{'threads':>7} {'invoke median':>14} {'p90':>8} {'frame median':>13}"]  # fmt: skip
    for r in result.get("results", []):
        lines.append(f"{r['threads']:>7} {r['invoke_ms_median']:>11.2f} ms {r['invoke_ms_p90']:>5.2f} ms "
                     f"{r['frame_ms_median']:>10.2f} ms")  # fmt: skip
    if run_dir is not None:
        lines.append(f"recorded in {run_dir}/benchmark.md (Where it runs) and report.html")
    return "\n".join(lines)


def qat_text(record: dict[str, Any], out_dir: str) -> str:
    """What ``edgetl qat`` prints: float and simulated int8 accuracy before and after."""

    def line(row: dict) -> str:
        sim = row["simulated_int8"]
        return (f"float top-1 {100 * row['float']['top1']:.2f}%, simulated int8 top-1 {100 * sim['top1']:.2f}% "
                f"(agreement with the original float model {100 * sim['agreement']:.2f}%)")  # fmt: skip

    return "\n".join([f"before: {line(record['before'])}", f"after:  {line(record['after'])}",
                      f"new run: {out_dir} ({record['seconds']:.0f}s); next: edgetl export {out_dir}"])  # fmt: skip


def targets_table(targets: list[Any]) -> str:
    rows = [f"{t.name:<15} {t.runtime:<12} {t.precision:<8} {t.description}" for t in targets]
    return "\n".join([f"{'NAME':<15} {'RUNTIME':<12} {'PRECISION':<8} DESCRIPTION", *rows])


def target_text(target: Any) -> str:
    text = [f"{target.name}: {target.description}", f"file: {target.source}"]
    for key, value in target.to_dict().items():
        if isinstance(value, dict):
            text.append(f"[{key}]")
            text += [f"  {k} = {v!r}" for k, v in value.items()]
        elif key not in ("name", "description"):
            text.append(f"{key} = {value!r}")
    return "\n".join(text)


def package_text(result: Any) -> str:
    """What ``edgetl package`` prints: the bundle, its files, the compilers' findings, any override."""
    lines = [f"bundle:  {result.bundle_dir}", f"archive: {result.archive} (sha256 {result.archive_sha256})"]
    lines += [f"  {rel:<32} {entry['size']:>10,} B" for rel, entry in result.files.items()]
    lines += compile_summary(result.accelerator, result.tflm)
    on_target = result.on_target or {}
    if on_target.get("skipped"):
        lines.append(f"on target: not checked ({on_target['skipped']})")
    elif on_target:
        lines.append(f"on target: {'PASS' if on_target['passed'] else 'FAIL'} on {on_target['described']}: top-1 "
                     f"{100 * on_target['top1']:.2f}%, agreement with float {100 * on_target['agreement']:.2f}%, "
                     f"with the host's int8 {100 * on_target['agreement_with_host']:.2f}% ({on_target['count']} "
                     "images)")  # fmt: skip
    if result.forced:
        lines.append("WARNING: packaged with --force although parity failed")
    for failure in result.parity.get("failed_verdicts") or []:
        lines.append(f"WARNING: packaged although it failed parity on {failure}")
    if result.parity.get("evidence_waived"):
        lines.append(f"WARNING: packaged on weak parity evidence: {result.parity['evidence_waived']}")
    return "\n".join(lines)


def verify_text(bundle: str, problems: list[str]) -> str:
    return f"{bundle}: ok" if not problems else "\n".join([f"{bundle}: FAILED", *[f"  {p}" for p in problems]])


def demo_summary(result: Any) -> str:
    """What ``edgetl demo`` prints: where everything went, the parity lines and the device's answers."""
    ft = result.finetune
    lines = [
        f"data:      {result.data}",
        f"weights:   {result.weights}",
        f"run:       {result.run_dir}  (model.pt, metrics.json, training.png, confusion.png, "
        "manifest.json)",
        f"val top-1: {100 * ft['best_val_acc']:.1f}% (head only: "
        f"{100 * (ft['phase1_val_acc'] or 0):.1f}%)",
    ]
    if ft.get("test_acc") is not None:
        lines.append(f"test top-1: {100 * ft['test_acc']:.1f}% (held-out generated test split)")
    if result.export:
        for name, p in result.export["parity"].items():
            lines.append(
                f"export:    {name:<21} top-1 {100 * p['top1']:.1f}%  Δ {p['delta_top1_pp']:+.2f} pp  "
                f"agreement {100 * p['agreement']:.1f}%  {'pass' if p['passed'] else 'FAIL'}"
            )
        for r in result.export["remedies"]:
            if "passed" in r:
                lines.append(f"remedy:    {r['remedy']}: {'pass' if r['passed'] else 'fail'}")
        lines.append(f"parity:    {result.run_dir / 'parity.md'}")
    if result.bundle:
        lines.append(f"bundle:    {result.bundle['archive']} ({result.bundle['archive_bytes']:,} bytes, "
                     f"sha256 {result.bundle['archive_sha256'][:16]}…)")  # fmt: skip
        for p in result.predictions:
            lines.append(f"device:    {Path(p['source']).name} (true: {p['true']}) -> {p['label']} "
                         f"{p['score']:.2f}  {p['latency_ms']:.1f} ms")  # fmt: skip
    lines += [f"note:      {note}" for note in result.notes]
    return "\n".join(lines)


def search_summary(result: Any) -> str:
    """What ``edgetl search`` prints: the winner, the front, where everything is."""
    summary = result.summary
    counts: dict[str, int] = {}
    for row in summary["trials"]:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = [f"search {result.out}: {len(summary['trials'])} trial(s) "
             f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); {len(result.ran)} run by this process",
             f"latency: {summary['latency_on']['how']}"]  # fmt: skip
    best = result.best
    if best is None and result.running_elsewhere:
        lines.append(f"no trial has produced an int8 model within budget yet; {result.running_elsewhere} trial(s) "
                     f"still run in other processes: search.json and best/ follow when they finish")  # fmt: skip
    elif best is None:
        lines.append("no trial produced an int8 model within budget that passed parity (exit 4)")
    else:
        p, latency = best["params"], best["latency"]
        spread = f" ({latency['low']:.3g}-{latency['high']:.3g})" if latency["low"] != latency["high"] else ""
        lines += [f"best: trial {best['number']}: {p['image_size']} px, width {p['width']:g}, {p['strategy']}, "
                  f"lr {p['lr']:.2g}, label smoothing {p['label_smoothing']:.2f}",
                  f"      int8 top-1 {100 * best['int8_top1']:.2f}% (validation), {latency['ms']:.3g} ms{spread}, "
                  f"{best['bytes'] / 1000:,.0f} kB",
                  f"      a normal run: {result.out / 'best'}  (edgetl package {result.out / 'best'} --target "
                  f"{summary['target']})"]  # fmt: skip
    lines += [f"pareto front: trials {', '.join(map(str, summary['pareto'])) or '-'}",
              f"report: {result.out / 'report.html'}   every trial: {result.out / 'search.json'}"]
    return "\n".join(lines)
