"""``edgetl search``: the most accurate int8 model that fits a target's latency, size and memory budget.

An Optuna study walks the accuracy/latency curve MobileNetV2's paper describes (input resolution,
width) together with the recipe (strategy, learning rate, label smoothing):

- :mod:`edgetl.search.space`: what a trial may choose, and the first trial (edgetl's default recipe at
  the largest resolution within budget);
- :mod:`edgetl.search.shapes`: the cost of a model shape known before training (an untrained model of
  that shape converted to int8: its bytes and latency), so over-budget trials never train;
- :mod:`edgetl.search.latency`: latency on this host, on the board over ssh, or estimated from the
  host's with the target's documented factor;
- :mod:`edgetl.search.trial`: one trial, a normal fine-tune in ``DIR/trials/NNN`` pruned on its
  validation loss, exported and checked by the parity gate;
- :mod:`edgetl.search.study`: the study in ``DIR/study.journal`` (resumable, shared by processes);
- :mod:`edgetl.search.results`: ``DIR/search.json``, the Pareto front and ``DIR/best/``;
- :mod:`edgetl.search.page`: ``DIR/report.html``.
"""
