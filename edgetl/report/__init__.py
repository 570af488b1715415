"""One page per run: ``report.html``, self-contained (images and charts embedded, no network, no
JavaScript), written by ``edgetl report RUN`` and at the end of finetune, export and package.

It reads only what the earlier stages wrote (the manifest, metrics.json, parity.json, benchmark.json,
the charts and the bundles' manifests) and the dataset's image files for thumbnails; it needs neither
torch nor TensorFlow.
"""

from edgetl.report.page import write_report

__all__ = ["write_report"]
