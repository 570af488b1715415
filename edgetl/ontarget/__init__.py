"""Verified where it runs: the bundle's own runtime on the target's CPU and software — emulated
(qemu-user over a Debian arm64 userland and the wheels a board's pip resolves) or on a real board over
ssh — judged against the float model and the host's verdict (:mod:`edgetl.ontarget.verdict`)."""
