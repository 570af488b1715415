"""report.html: one self-contained page per run, after every stage; opened in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import copy_run
from test_package import target_file

from edgetl.cli import main
from edgetl.report import write_report

pytestmark = pytest.mark.slow

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars"]  # fmt: skip


def images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def assert_self_contained(page: str) -> None:
    assert "<script" not in page
    for link in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert link.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "#")), link[:60]


@pytest.fixture(scope="module")
def packaged(exported_run, tmp_path_factory):
    """A copy of the exported run, packaged into RUN/bundles by the CLI (which writes the report)."""
    run_dir = copy_run(exported_run[1], tmp_path_factory.mktemp("report") / "run")
    result = CliRunner().invoke(main, ["-q", "package", str(run_dir), "--target", target_file(run_dir.parent)])
    assert result.exit_code == 0, result.output
    return run_dir


def test_report_after_finetune_shows_training_classes_and_mistakes(toy_run, tmp_path):
    run_dir = copy_run(toy_run[1], tmp_path / "run")
    page = write_report(run_dir).read_text()
    assert_self_contained(page)
    for title in ("Training", "Per class", "Misclassified validation images", "Parity", "Provenance"):
        assert f"<h2>{title}" in page
    assert "Not checked yet: <code>edgetl export RUN</code>" in page
    assert "memory-mapped from the image cache" in page and "image cache in" in page  # how the data was loaded
    metrics = json.loads((run_dir / "metrics.json").read_text())
    wrong = metrics["val"]["misclassified"]
    assert len(wrong) == metrics["val"]["count"] - round(metrics["val"]["top1"] * metrics["val"]["count"])
    assert all(w["label"] != w["predicted"] and 0 < w["confidence"] <= 1 for w in wrong)
    # two charts, and one thumbnail per misclassified image (the dataset is at hand)
    assert len(images(page)) == 2 + len(wrong)
    assert page.count('class="tile"') == len(wrong)


def test_report_after_package_shows_parity_bundles_and_provenance(packaged):
    page = (packaged / "report.html").read_text()
    assert_self_contained(page)
    parity = json.loads((packaged / "parity.json").read_text())
    for name, artifact in parity["artifacts"].items():
        assert f"<code>{name}</code>" in page
        assert f"{100 * artifact['agreement']:.2f} %" in page
    assert page.count('class="badge pass"') >= sum(a["passed"] for a in parity["artifacts"].values())
    assert "<h2>Bundles</h2>" in page and "rpi4-test" in page
    manifest = json.loads((packaged / "manifest.json").read_text())
    assert manifest["stages"]["finetune"]["data"]["fingerprint"] in page
    calibration = manifest["stages"]["export"]["calibration"]
    assert f"default, {calibration['count']} images, sha256 {calibration['sha256'][:16]}" in page
    for name, entry in manifest["files"].items():
        assert entry["sha256"] in page, name
    listed = sum(len(a.get("disagreements", [])) for a in parity["artifacts"].values())
    assert page.count('class="tile"') >= listed


def test_report_command(packaged, tmp_path):
    (packaged / "report.html").unlink()
    result = CliRunner().invoke(main, ["report", str(packaged), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"report": str(packaged / "report.html")}
    assert (packaged / "report.html").is_file()
    missing = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert missing.exit_code == 1 and "is not an edgetl run" in missing.stderr
    assert "Traceback" not in missing.output


DAMAGE = {
    "metrics-corrupt": ("metrics.json", lambda p: p.write_text("{not json"), "metrics.json cannot be read",
                        "<code>metrics.json</code> is missing or damaged"),
    "metrics-list": ("metrics.json", lambda p: p.write_text("[]"), "metrics.json is damaged: it holds a list",
                     "<code>metrics.json</code> is missing or damaged"),
    "metrics-missing": ("metrics.json", lambda p: p.unlink(), "metrics.json is missing",
                        "<code>metrics.json</code> is missing or damaged"),
    "parity-corrupt": ("parity.json", lambda p: p.write_bytes(b"\xff\x00"), "parity.json cannot be read",
                       "<code>parity.json</code> is missing or damaged"),
    "model-deleted": ("model.pt", lambda p: p.unlink(), "model.pt is missing (the manifest lists it",
                      "MISSING</span>"),
    "model-changed": ("model_int8.tflite", lambda p: p.write_bytes(p.read_bytes()[:100]),
                      "model_int8.tflite differs from the manifest", "DIFFERS</span>"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_run_says_what_is_damaged_on_the_page_and_on_stderr(packaged, tmp_path, case):
    name, damage, problem, in_section = DAMAGE[case]
    run = copy_run(packaged, tmp_path / "run")
    damage(run / name)
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert f"edgetl: WARNING: report: {problem}" in result.stderr, result.stderr
    page = (run / "report.html").read_text()
    assert page.index("This run is damaged or incomplete") < page.index('<div class="cards">')
    assert problem in page.replace("&#x27;", "'") and in_section in page
    assert "No fine-tuning in this run yet" not in page and "Not checked yet" not in page


def test_a_bundle_option_that_is_not_a_bundle_is_an_error(packaged, tmp_path):
    (tmp_path / "not-a-bundle").mkdir()
    for folder in (tmp_path / "not-a-bundle", tmp_path / "nowhere"):
        result = CliRunner().invoke(main, ["report", str(packaged), "--bundle", str(folder)])
        assert result.exit_code == 1 and f"--bundle {folder} is not an edgetl bundle" in result.stderr
        assert "Traceback" not in result.output


def test_an_intact_run_has_no_problems_box(packaged):
    result = CliRunner().invoke(main, ["report", str(packaged)])
    assert result.exit_code == 0 and "WARNING" not in result.stderr, result.stderr
    assert "damaged or incomplete" not in (packaged / "report.html").read_text()


def test_a_moved_dataset_leaves_names_instead_of_broken_images(toy_run, tmp_path):
    run_dir = copy_run(toy_run[1], tmp_path / "run")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"]["finetune"]["data"]["root"] = str(tmp_path / "gone")
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    page = write_report(run_dir).read_text()
    wrong = json.loads((run_dir / "metrics.json").read_text())["val"]["misclassified"]
    assert page.count('<div class="missing">not found</div>') == len(wrong)
    assert len(images(page)) == 2


# A checker put at the top of a copy of the page: it records script and resource errors (a picture
# that does not decode fires "error"), console.error calls, and on load every <img> that did not
# decode; the verdict goes into the title, which --dump-dom prints.
CHECKER = """<script>
window.__errors = [];
window.addEventListener("error",
  e => window.__errors.push(e.message || (e.target && e.target.tagName) || "error"), true);
const realError = console.error; console.error = (...a) => { window.__errors.push(a.join(" ")); realError(...a); };
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  const errors = window.__errors;
  document.title = `CHECK images=${imgs.length} broken=${broken} errors=${errors.length} ` + errors.join("|");
});
</script>"""


def browse(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


@pytest.mark.skipif(BROWSER is None, reason="no chromium: `apt-get install chromium` (make test does where it can)")
def test_the_page_loads_in_a_real_browser_on_a_laptop_and_a_phone(packaged, tmp_path):
    page = (packaged / "report.html").read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("<head>", "<head>" + CHECKER, 1))
    dom = browse("--virtual-time-budget=10000", "--dump-dom", checked.as_uri(), profile=tmp_path / "p1").stdout
    title = re.search(r"<title>(CHECK [^<]*)</title>", dom)
    assert title, dom[:500]
    assert title.group(1).startswith(f"CHECK images={len(images(page))} broken=0 errors=0"), title.group(1)
    assert "console" not in title.group(1)
    from PIL import Image, ImageStat

    for name, size in (("laptop", "1280,1800"), ("phone", "412,1800")):
        shot = tmp_path / f"{name}.png"
        browse(f"--window-size={size}", f"--screenshot={shot}", (packaged / "report.html").as_uri(),
               profile=tmp_path / name)  # fmt: skip
        with Image.open(shot) as picture:
            assert picture.size == tuple(int(v) for v in size.split(","))
            assert max(ImageStat.Stat(picture.convert("L")).stddev) > 20  # text and charts, not a blank page


@pytest.mark.skipif(BROWSER is None, reason="no chromium: `apt-get install chromium` (make test does where it can)")
def test_the_browser_check_sees_a_broken_image(tmp_path):
    """The check above can fail: a picture that does not decode is counted."""
    page = tmp_path / "broken.html"
    page.write_text(f'<!doctype html><html><head>{CHECKER}<title>x</title></head><body>'
                    '<img src="data:image/png;base64,iVBORw0KGgoAAAAN"></body></html>')  # fmt: skip
    dom = browse("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), profile=tmp_path / "p").stdout
    assert "CHECK images=1 broken=1 errors=1" in dom, dom[:300]
